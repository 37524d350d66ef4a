"""A held-out SFT set of dictionary definitions, built from Debian's `wordnet-base` (WordNet 3.0 glosses).

    apt-get install wordnet-base
    python benchmarks/definitions_data.py --out defs          # defs/train.jsonl (400), defs/validation.jsonl (100)
    llmctl finetune model=smollm2-135m task=sft method=lora data=tiny-instruct \
        data.train=defs/train.jsonl data.validation=defs/validation.jsonl \
        train.max_steps=150 train.batch_size=8 precision=fp32 name=defs

Each record is {"prompt": "Define the noun 'bloodwort'.", "response": "Any of various plants of the family
Haemodoraceae."}: single-word nouns, verbs and adjectives (a word's first sense only), picked with a fixed seed so
the set is the same on every machine. The quantization and decode figures of issue 26 are measured on the LoRA
fine-tune this makes (`finetune/defs`).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")
PARTS = {"noun": "data.noun", "verb": "data.verb", "adjective": "data.adj"}


def glosses(part: str, path: Path) -> dict[str, str]:
    """{word: its first sense's gloss, without the usage examples} for the single-word lemmas of one data file."""
    found: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(" ") or "|" not in line:
            continue  # the licence header
        fields, gloss = line.split("|", 1)
        parts = fields.split()
        words = [parts[4 + 2 * i] for i in range(int(parts[3], 16))]
        definition = gloss.split('; "')[0].strip().rstrip(";").strip()
        for word in words:
            word = word.split("(")[0]  # adjectives carry a syntactic marker: "galore(ip)"
            if word.isalpha() and word.islower() and len(word) > 3 and word not in found and len(definition) > 10:
                found[word] = definition
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="defs", help="folder for train.jsonl and validation.jsonl")
    ap.add_argument("--count", type=int, default=500, help="definitions in all; a fifth is held out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not WORDNET.is_dir():
        raise SystemExit(f"{WORDNET} not found: apt-get install wordnet-base")
    pool = [(part, w, g) for part, name in PARTS.items() for w, g in sorted(glosses(part, WORDNET / name).items())]
    chosen = random.Random(args.seed).sample(pool, args.count)
    records = [
        {"prompt": f"Define the {part} '{word}'.", "response": gloss[0].upper() + gloss[1:].rstrip(".") + "."}
        for part, word, gloss in chosen
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    held = args.count // 5
    for name, rows in (("train", records[held:]), ("validation", records[:held])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{out / name}.jsonl: {len(rows)} definitions")


if __name__ == "__main__":
    main()
