"""Benchmark: `llmctl pretrain` against a plain Hugging Face `Trainer` script and a `run_clm.py` /
`run_mlm.py`-style pipeline — same model shapes, tokenizer, data, steps, hyperparameters and
precision, several seeds.

    python benchmarks/vs_hf_trainer.py --shape gpt-tiny                       # BBC News, 300 steps, seeds 1 2 3
    python benchmarks/vs_hf_trainer.py --shape bert-tiny
    python benchmarks/vs_hf_trainer.py --shape gpt2-small --steps 20 --seeds 1 --eval-every 10
    python benchmarks/vs_hf_trainer.py --shape gpt-tiny --data kjv --precision bf16   # bf16 only where the CPU has it
    python benchmarks/vs_hf_trainer.py --shape gpt-tiny \
        --set model.config.n_layer=4 model.config.n_embd=256 model.config.n_head=4

Long documents (issue 26's corpus shape: Jane Austen's six novels, one file per book, from Debian's
r-cran-janeaustenr; llmctl's document split holds one book out):

    apt-get install r-cran-janeaustenr && mkdir austen && cd austen && Rscript -e 'library(janeaustenr); \
        books <- list(sense=sensesensibility, pride=prideprejudice, mansfield=mansfieldpark, emma=emma, \
        northanger=northangerabbey, persuasion=persuasion); \
        for (n in names(books)) writeLines(books[[n]], paste0(n, ".txt"))' && cd ..
    python benchmarks/vs_hf_trainer.py --shape gpt-tiny --data files --set 'data.train=austen/*.txt' \
        model.config.n_layer=4 model.config.n_embd=256 model.config.n_head=4 tokenizer.vocab_size=8192 \
        --pipelines llmctl trainer

The three pipelines, each a fresh process (so each pays its own imports and preprocessing):
- `llmctl`: `llmctl pretrain conf=<shape> ...` with its own store (packing and tokenization cache:
  the first seed fills it, later seeds reuse it, as a sweep would);
- `trainer`: a plain script — the texts tokenized in memory, joined with end-of-text, cut into
  fixed blocks (labels = inputs for causal LM; HF's masking collator for MLM), `Trainer`;
- `pipeline`: the `run_clm.py` / `run_mlm.py` recipe — `load_dataset` on jsonl files,
  `map(tokenize)`, `map(group_texts)`, `Trainer`, with datasets' on-disk cache like those scripts.

The shared settings (steps, batch, lr, warmup, schedule, weight decay, clipping, precision, seed) are
passed to each, and llmctl gets the Trainer's AdamW betas (0.9, 0.999): its default too, but the
bert-tiny preset sets 0.98 for its own lr of 3e-3. (llmctl's defaults themselves are checked against
the Trainer's by tests/test_train.py: a benchmark cannot see a default it overrides.)

All three use the tokenizer llmctl trains on the training split (the same vocabulary for everyone),
evaluate every `--eval-every` steps on the same validation blocks with the same function (llmctl's
task evaluation: for MLM the same masks), and are scored at the end by that function on the whole
validation set. Printed per pipeline: final eval loss (mean ± standard deviation, min / median over
seeds); steady training tokens/s (log windows without an evaluation); wall time from process start
— imports and tokenization included — to the last step, and until the pipeline's mean curve over
seeds (periodic evaluations on `--eval-batches` validation batches, interpolated) reaches the
plain Trainer's mean loss at the last step (where the losses at equal steps agree within the seed
spread, the time to the last step is the steadier of the two); ratios
against the Trainer and the HF pipeline; MFU: model FLOPs (6 × matmul parameters + attention, per
token, dense) × tokens/s over a matmul peak measured in this run on the same threads and precision.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPES = {"gpt-tiny": "clm", "bert-tiny": "mlm", "gpt2-small": "clm", "bert-base": "mlm"}
PIPELINES = ("llmctl", "trainer", "pipeline")


# ---------------------------------------------------------------------------------------------
# Shared setup: data, tokenizer, model config, evaluation (used by every pipeline)
# ---------------------------------------------------------------------------------------------
def compose(a):
    """llmctl's composed pretrain config for the shape (and any --set model.config.* / tokenizer.* overrides)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from llmctl.core.config import config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        return hydra_compose(config_name="pretrain", overrides=[f"conf={a.shape}", f"data={a.data}", *a.set])


def prepare_shared(a, work: Path) -> dict:
    """Data split, tokenizer and jsonl files every pipeline reads; returns their paths."""
    from llmctl.core.data import load_data
    from llmctl.core.tokenizer import train_tokenizer

    cfg = compose(a)
    data = load_data(cfg.data, task="text")
    family = cfg.model.family
    tok = train_tokenizer(
        data["train"]["text"],
        family=family,
        vocab_size=int(cfg.tokenizer.vocab_size),
        lowercase=bool(cfg.tokenizer.lowercase),
        max_len=a.seq,
        cache_root=work / "shared-cache",
        data_fp=data.fingerprint,
    )
    tok.save_pretrained(str(work / "tokenizer"))
    for split in ("train", "validation"):
        data[split].select_columns(["text"]).to_json(str(work / f"{split}.jsonl"))
    return {
        "tokenizer": str(work / "tokenizer"),
        "train": str(work / "train.jsonl"),
        "validation": str(work / "validation.jsonl"),
        "fingerprint": data.fingerprint,
    }


def model_config(a, tok):
    import transformers

    from llmctl.core.families import CONFIG_CLASS

    cfg = compose(a)
    special = {
        f"{k}_id": getattr(tok, f"{k}_id")
        for k in ("pad_token", "bos_token", "eos_token")
        if getattr(tok, f"{k}_id", None) is not None
    }
    return getattr(transformers, CONFIG_CLASS[cfg.model.family])(
        vocab_size=len(tok), **special, **dict(cfg.model.config)
    )


def evaluator(a, shared: dict, tok, eval_batches: int | None, seed: int = 0):
    """llmctl's own validation evaluation (same blocks, same MLM masks) as a function of the model."""
    import torch
    from omegaconf import OmegaConf

    from llmctl.core.data import load_data
    from llmctl.core.device import Runtime
    from llmctl.core.tasks import prepare
    from llmctl.core.train import evaluate_model

    data = load_data(
        OmegaConf.create({"train": shared["train"], "validation": shared["validation"], "dedupe": False}), task="text"
    )
    task = prepare(
        SHAPES[a.shape],
        data,
        tok,
        max_seq_len=a.seq,
        batch_size=a.batch,
        seed=0,
        cache_root=Path(shared["train"]).parent / "eval-cache",
        eval_batches=eval_batches,
    )
    rt = Runtime(device=torch.device("cpu"), precision=a.precision, reason="benchmark")
    return lambda model: evaluate_model(model, task.evaluate, rt, seed)["eval/loss"]


# ---------------------------------------------------------------------------------------------
# One run of one pipeline (a child process); writes <out>/result.json
# ---------------------------------------------------------------------------------------------
def run_llmctl(a, shared: dict, out: Path, t0: float) -> dict:
    overrides = [
        f"conf={a.shape}",
        f"data={a.data}",
        f"tokenizer.from={shared['tokenizer']}",
        f"data.max_seq_len={a.seq}",
        f"train.max_steps={a.steps}",
        f"train.batch_size={a.batch}",
        "train.grad_accum=1",
        f"train.lr={a.lr}",
        f"train.warmup_ratio={a.warmup}",
        "train.scheduler=cosine",
        f"train.weight_decay={a.weight_decay}",
        "train.betas=[0.9,0.999]",
        "train.max_grad_norm=1.0",
        f"train.eval_every={a.eval_every}",
        f"train.eval_batches={a.eval_batches}",
        f"train.log_every={a.log_every}",
        "train.save_every=0",
        f"precision={a.precision}",
        f"seed={a.seed}",
        f"output_root={a.store}",
        "name=bench",
        "device=cpu",
        *a.set,
    ]
    proc = subprocess.run([sys.executable, "-m", "llmctl", "pretrain", *overrides], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llmctl failed:\n{proc.stderr[-3000:]}")
    folder = (
        Path(a.store) / "pretrain" / "bench" / (Path(a.store) / "pretrain" / "bench" / "latest").read_text().strip()
    )
    log = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["time"] - t0, r["eval/loss"]) for r in log if "eval/loss" in r]
    steps = [(r["step"], r["time"] - t0) for r in log if "loss" in r]
    return {"model": str(folder), "evals": evals, "steps": steps, "wall": time.time() - t0}


def run_hf(a, shared: dict, out: Path, t0: float, pipeline: bool) -> dict:
    import datasets
    import torch
    import transformers
    from transformers import (
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    torch.manual_seed(a.seed)
    causal = SHAPES[a.shape] == "clm"
    tok = AutoTokenizer.from_pretrained(shared["tokenizer"])
    block = a.seq if causal else a.seq - 2

    def group(ids_lists):  # join with end-of-text / [SEP], cut into fixed blocks (run_clm's group_texts)
        sep = tok.eos_token_id if causal else tok.sep_token_id
        stream = [t for ids in ids_lists for t in (*ids, sep)]
        n = len(stream) // block * block
        blocks = [stream[i : i + block] for i in range(0, n, block)]
        return blocks if causal else [[tok.cls_token_id, *b, tok.sep_token_id] for b in blocks]

    if pipeline:  # run_clm / run_mlm: load_dataset → map(tokenize) → map(group_texts), cached on disk
        from datasets import load_dataset

        raw = load_dataset("json", data_files={"train": shared["train"]}, cache_dir=str(Path(a.store) / "hf-datasets"))[
            "train"
        ]
        tokenized = raw.map(lambda b: tok(b["text"], add_special_tokens=False), batched=True, remove_columns=["text"])
        train = tokenized.map(
            lambda b: {"input_ids": group(b["input_ids"])},
            batched=True,
            batch_size=1000,
            remove_columns=tokenized.column_names,
        )
    else:  # a plain script: tokenize in memory, group, hand a list to the Trainer
        texts = [json.loads(line)["text"] for line in Path(shared["train"]).read_text().splitlines()]
        train = [{"input_ids": b} for b in group(tok(texts, add_special_tokens=False)["input_ids"])]
    if causal:

        def collate(rows):  # labels = inputs (the model shifts them)
            batch = default_data_collator(rows)
            return {**batch, "labels": batch["input_ids"].clone()}
    else:
        collate = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.15)
    config = model_config(a, tok)
    model = (transformers.AutoModelForCausalLM if causal else transformers.AutoModelForMaskedLM).from_config(config)
    evaluate = evaluator(
        a, shared, tok, a.eval_batches, seed=a.seed
    )  # llmctl's periodic evaluation: same blocks, same masks
    evals, steps = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step % a.log_every == 0:
                steps.append((state.global_step, time.time() - t0))
            if state.global_step % a.eval_every == 0 or state.global_step == a.steps:
                loss = evaluate(kw["model"])  # timed after the evaluation, as llmctl's metrics.jsonl records it
                evals.append((state.global_step, time.time() - t0, loss))

    args = TrainingArguments(
        output_dir=str(out / "hf"),
        per_device_train_batch_size=a.batch,
        max_steps=a.steps,
        learning_rate=a.lr,
        warmup_steps=round(a.warmup * a.steps),
        lr_scheduler_type="cosine",
        weight_decay=a.weight_decay,
        max_grad_norm=1.0,
        seed=a.seed,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        bf16=a.precision == "bf16",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    loss = evaluate(model)
    evals.append((0, time.time() - t0, loss))
    Trainer(model=model, args=args, train_dataset=train, data_collator=collate, callbacks=[Clock()]).train()
    model.save_pretrained(str(out / "model"))
    tok.save_pretrained(str(out / "model"))
    return {"model": str(out / "model"), "evals": evals, "steps": steps, "wall": time.time() - t0}


def child(a) -> None:
    t0 = float(os.environ["BENCH_T0"])
    shared = json.loads(Path(a.shared).read_text())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = (
        run_llmctl(a, shared, out, t0)
        if a.run == "llmctl"
        else run_hf(a, shared, out, t0, pipeline=a.run == "pipeline")
    )
    (out / "result.json").write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# The parent: run every pipeline × seed, score, print
# ---------------------------------------------------------------------------------------------
def matmul_peak(precision: str) -> float:
    """FLOP/s of a large square matmul on this process's threads (the best of several)."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x, y = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    best = 0.0
    for _ in range(8):
        t = time.perf_counter()
        for _ in range(4):
            torch.mm(x, y)
        best = max(best, 4 * 2 * 1024**3 / (time.perf_counter() - t))
    return best


def flops_per_token(config, seq: int) -> float:
    """Training FLOPs per token of the dense model: 6 × matmul weights (the output layer included) + attention."""
    d = getattr(config, "hidden_size", None) or config.n_embd
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
    matmul = layers * (4 * d * d + 2 * d * ffn) + d * config.vocab_size
    return 6 * matmul + 6 * layers * seq * d  # QK^T and AV, forward and backward


def steady_tokens_per_s(steps: list, evals: list, tokens_per_step: int) -> float:
    """Tokens/s over the log windows that hold no evaluation (the first window, warm-up, left out)."""
    rates = []
    for (s0, t0), (s1, t1) in zip(steps[1:], steps[2:]):
        if not any(s0 < e[0] <= s1 for e in evals):
            rates.append((s1 - s0) * tokens_per_step / (t1 - t0))
    return statistics.median(rates) if rates else float("nan")


def mean_curve(runs: list[dict]) -> list[tuple[int, float, float]]:
    """(step, mean seconds since start, mean eval loss) over seeds at each periodic evaluation."""
    steps = sorted(set.intersection(*[{e[0] for e in r["evals"]} for r in runs]))
    return [
        (
            s,
            statistics.mean(e[1] for r in runs for e in r["evals"] if e[0] == s),
            statistics.mean(e[2] for r in runs for e in r["evals"] if e[0] == s),
        )
        for s in steps
    ]


def time_to(curve: list, target: float) -> float:
    """Seconds until the mean curve reaches `target`, interpolated between evaluations (inf: not within the run)."""
    if curve[0][2] <= target:
        return curve[0][1]
    for (_, t0, l0), (_, t1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="gpt-tiny", choices=sorted(SHAPES))
    ap.add_argument("--data", default="bbc-news")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument(
        "--log-every",
        type=int,
        default=None,
        help="steps between timing records (default: 10, or steps/10 for short runs)",
    )
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="llmctl overrides of the shape for everyone, e.g. model.config.n_layer=4 tokenizer.vocab_size=8192",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES)
    ap.add_argument("--workdir", default=None, help="keep runs here (default: a temporary folder)")
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--shared", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument(
        "--report-from", metavar="DIR", help="print the table of an earlier run's --workdir without running anything"
    )
    a = ap.parse_args()
    a.log_every = a.log_every or max(1, min(10, a.steps // 10))  # short runs need several windows for a steady rate
    if a.run:
        return child(a)
    if a.report_from:
        saved = json.loads((Path(a.report_from) / "results.json").read_text())
        a = argparse.Namespace(**{**saved["args"], "report_from": a.report_from})
        from transformers import AutoTokenizer

        return report(
            a,
            saved["results"],
            model_config(a, AutoTokenizer.from_pretrained(str(Path(a.report_from) / "tokenizer"))),
            saved["peak"],
        )

    import datasets
    import transformers
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="vs-hf-"))
    work.mkdir(parents=True, exist_ok=True)
    shared = prepare_shared(a, work)
    (work / "shared.json").write_text(json.dumps(shared))
    tok = AutoTokenizer.from_pretrained(shared["tokenizer"])
    config = model_config(a, tok)
    full_eval = evaluator(a, shared, tok, None)
    peak = matmul_peak(a.precision)
    results: dict[str, list[dict]] = {p: [] for p in a.pipelines}
    for seed in a.seeds:
        for pipeline in a.pipelines:
            out = work / f"{pipeline}-seed{seed}"
            store = work / f"store-{pipeline}"  # one per pipeline, kept across seeds: its caches fill once
            env = {**os.environ, "BENCH_T0": repr(time.time())}
            cmd = [
                sys.executable,
                __file__,
                "--run",
                pipeline,
                "--shared",
                str(work / "shared.json"),
                "--out",
                str(out),
                "--store",
                str(store),
                "--seed",
                str(seed),
                *sys.argv[1:],
            ]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                raise SystemExit(f"{pipeline} seed {seed} failed:\n{proc.stderr[-3000:]}")
            r = json.loads((out / "result.json").read_text())
            model_cls = "AutoModelForCausalLM" if SHAPES[a.shape] == "clm" else "AutoModelForMaskedLM"
            r["final"] = full_eval(getattr(transformers, model_cls).from_pretrained(r["model"]))
            r["tokens_per_s"] = steady_tokens_per_s(r["steps"], r["evals"], a.batch * a.seq)
            results[pipeline].append(r)
            print(
                f"  {pipeline:<9} seed {seed}: eval loss {r['final']:.4f} · {r['tokens_per_s']:,.0f} tokens/s · "
                f"{r['wall']:.0f} s",
                flush=True,
            )
    (work / "results.json").write_text(json.dumps({"args": vars(a), "peak": peak, "results": results}))
    report(a, results, config, peak)


def report(a, results: dict, config, peak: float) -> None:
    fpt = flops_per_token(config, a.seq)
    curves = {p: mean_curve(runs) for p, runs in results.items()}
    target = (curves.get("trainer") or next(iter(curves.values())))[-1][2]
    med = statistics.median
    rows = {
        p: {
            "finals": [r["final"] for r in runs],
            "tps": med([r["tokens_per_s"] for r in runs]),
            "to_steps": curves[p][-1][1],
            "to_target": time_to(curves[p], target),
            "gap": curves[p][-1][2] - target,
        }
        for p, runs in results.items()
    }

    def ratio(p, key, ref) -> str:
        x = rows[p][key] / rows[ref][key] if ref in rows else float("nan")
        return f"{x:.2f}" if 0 < x < float("inf") else "—"

    print(
        f"\n{a.shape} · data {a.data} · {a.steps} steps × {a.batch} × {a.seq} tokens · {a.precision} · seeds "
        f"{' '.join(map(str, a.seeds))} · "
        f"matmul peak {peak / 1e9:.1f} GFLOP/s ({torch_threads()} threads)"
    )
    print(
        "times: from process start (imports, tokenization included), means over seeds; target = the trainer's mean "
        "periodic eval "
        f"loss at step {a.steps} ({target:.4f}), reached on each pipeline's mean curve"
    )
    print(
        f"{'pipeline':<10}{'eval loss mean ± sd':<22}{'min / median':<18}{'tokens/s':>10}{'×trainer':>10}"
        f"{f'time to step {a.steps}':>20}{'×pipeline':>11}{'time to target':>26}{'×pipeline':>11}{'MFU':>7}"
    )
    for p, row in rows.items():
        f = row["finals"]
        sd = statistics.stdev(f) if len(f) > 1 else 0.0
        reached = (
            _seconds(row["to_target"])
            if row["to_target"] != float("inf")
            else f"not by step {a.steps} ({row['gap']:+.4f})"
        )
        print(
            f"{p:<10}{f'{statistics.mean(f):.4f} ± {sd:.4f}':<22}{f'{min(f):.4f} / {med(f):.4f}':<18}"
            f"{row['tps']:>10,.0f}"
            f"{ratio(p, 'tps', 'trainer'):>10}{_seconds(row['to_steps']):>20}{ratio(p, 'to_steps', 'pipeline'):>11}"
            f"{reached:>26}{ratio(p, 'to_target', 'pipeline'):>11}{100 * fpt * row['tps'] / peak:>6.1f}%"
        )


def _seconds(t: float) -> str:
    return "not reached" if t == float("inf") else f"{t:.1f} s"


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
