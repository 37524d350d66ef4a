"""Writes the small CoNLL-2003-style NER fixture shipped with llmctl (train/dev/test.conll).

No gold NER data installs offline, so this builds several hundred sentences from templates and
entity lists (PER / ORG / LOC / MISC in BIO), deterministically. Training sentences use two thirds
of the names and templates; dev and test sentences draw half their entities from the other third
and use every template, so they hold entities and contexts never seen in training. Run it again to regenerate:
    python -m llmctl.assets.ner.make_fixture
Columns: token POS chunk tag (POS and chunk are placeholders, as the reader uses only the first
and last columns).
"""

import random
from pathlib import Path

PER = [
    "John Smith",
    "Maria Garcia",
    "Wei Chen",
    "Angela Merkel",
    "Tony Blair",
    "Serena Williams",
    "David Beckham",
    "Ana Lopez",
    "Peter Müller",
    "Sarah Connor",
    "Ravi Kumar",
    "Emma Watson",
    "Jacques Chirac",
    "Kofi Annan",
    "Lars Berg",
]
ORG = [
    "Microsoft",
    "the United Nations",
    "Reuters",
    "Manchester United",
    "the BBC",
    "Deutsche Bank",
    "Toyota",
    "the European Commission",
    "Google",
    "Real Madrid",
    "Greenpeace",
    "the World Bank",
    "Sony",
    "NASA",
    "Oxford University",
]
LOC = [
    "London",
    "Paris",
    "Germany",
    "New York",
    "Tokyo",
    "Brazil",
    "the Alps",
    "Madrid",
    "Kenya",
    "Lake Geneva",
    "India",
    "Sydney",
    "the Nile",
    "Canada",
    "Beijing",
]
MISC = [
    "English",
    "the Olympics",
    "French",
    "the World Cup",
    "Christmas",
    "Windows",
    "German",
    "the Grammy Awards",
    "Japanese",
    "the Tour de France",
    "Euro",
    "Brexit",
]
TEMPLATES = [
    "{PER} said on Monday that {ORG} would open an office in {LOC} .",
    "{ORG} shares rose 3 percent in {LOC} after the announcement .",
    "{PER} , a spokesman for {ORG} , declined to comment .",
    "The {MISC} team beat {ORG} 2-1 in {LOC} on Sunday .",
    "{PER} will travel to {LOC} next week for talks with {PER} .",
    "Officials in {LOC} expect {MISC} celebrations to draw large crowds .",
    "{ORG} hired {PER} as chief executive , the company said in {LOC} .",
    "{PER} won gold at {MISC} held in {LOC} .",
    "Analysts at {ORG} cut their forecast for {LOC} .",
    "The {MISC} version of the report was published by {ORG} .",
    "Police in {LOC} arrested {PER} on Friday .",
    "{PER} and {PER} met in {LOC} to discuss {MISC} .",
    "Rain delayed the match between {ORG} and {ORG} in {LOC} .",
    "{ORG} said it had no plans to leave {LOC} .",
    "Prices of {MISC} goods in {LOC} fell sharply last year .",
]


SEEN = 2 / 3  # training draws names and templates from the first two thirds only; dev/test also from the rest


def _sentence(rng: random.Random, held_out: bool) -> list[tuple[str, str]]:
    def pick(items):
        cut = int(len(items) * SEEN)
        return rng.choice(items[cut:] if held_out and rng.random() < 0.5 else items[:cut])

    out = []
    templates = TEMPLATES if held_out else TEMPLATES[: int(len(TEMPLATES) * SEEN)]
    for piece in rng.choice(templates).split():
        if piece.startswith("{") and piece.endswith("}"):
            kind = piece[1:-1]
            words = pick({"PER": PER, "ORG": ORG, "LOC": LOC, "MISC": MISC}[kind]).split()
            lead = 1 if words[0] == "the" and kind in ("ORG", "LOC", "MISC") else 0  # "the" stays outside the entity
            out += [(w, "O") for w in words[:lead]]
            out += [(w, ("B-" if i == 0 else "I-") + kind) for i, w in enumerate(words[lead:])]
        else:
            out.append((piece, "O"))
    return out


def write(folder: Path, sizes=(("train", 400), ("dev", 100), ("test", 100)), seed: int = 2003) -> None:
    rng = random.Random(seed)
    for split, n in sizes:
        lines = ["-DOCSTART- -X- -X- O", ""]
        for _ in range(n):
            lines += [f"{w} NN O {t}" for w, t in _sentence(rng, held_out=split != "train")] + [""]
        (folder / f"{split}.conll").write_text("\n".join(lines))


if __name__ == "__main__":
    write(Path(__file__).parent)
