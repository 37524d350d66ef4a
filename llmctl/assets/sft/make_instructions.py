"""Writes the small instruction set shipped with llmctl (instructions.jsonl: prompt / response).

Short factual tasks with one consistent answer style, so a LoRA SFT run on a 135 M model shows a
falling loss and a visible change in its answers within a few minutes on CPU. Regenerate with
    python -m llmctl.assets.sft.make_instructions
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Kenya": "Nairobi",
    "Canada": "Ottawa",
    "Egypt": "Cairo",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Sweden": "Stockholm",
    "Ireland": "Dublin",
    "Chile": "Santiago",
    "Cuba": "Havana",
    "Finland": "Helsinki",
    "Hungary": "Budapest",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Argentina": "Buenos Aires",
    "Denmark": "Copenhagen",
    "Belgium": "Brussels",
    "Turkey": "Ankara",
    "Australia": "Canberra",
    "India": "New Delhi",
    "China": "Beijing",
    "Mexico": "Mexico City",
}
ANTONYMS = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "early": "late",
    "open": "closed",
    "strong": "weak",
    "rich": "poor",
    "young": "old",
    "high": "low",
    "full": "empty",
    "hard": "soft",
    "long": "short",
    "wet": "dry",
    "loud": "quiet",
    "clean": "dirty",
    "thick": "thin",
    "near": "far",
    "true": "false",
}


def examples(seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for country, city in CAPITALS.items():
        out.append({"prompt": f"What is the capital of {country}?", "response": f"The capital of {country} is {city}."})
    for word, opposite in ANTONYMS.items():
        out.append(
            {
                "prompt": f"Give the opposite of the word '{word}'.",
                "response": f"The opposite of '{word}' is '{opposite}'.",
            }
        )
    for _ in range(60):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        out.append({"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."})
    for word in [
        "apple",
        "river",
        "planet",
        "garden",
        "window",
        "teacher",
        "bottle",
        "mountain",
        "pencil",
        "candle",
        "forest",
        "doctor",
        "bridge",
        "island",
        "rocket",
        "guitar",
        "market",
        "engine",
        "castle",
        "lantern",
    ]:
        out.append(
            {"prompt": f"Spell the word '{word}' backwards.", "response": f"'{word}' backwards is '{word[::-1]}'."}
        )
    rng.shuffle(out)
    return out


if __name__ == "__main__":
    path = Path(__file__).parent / "instructions.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples()))
