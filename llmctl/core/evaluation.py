"""Judging a checkpoint: its task metric and its cost, measured the same way for every artifact.

    record = evaluate(store, "finetune/bbc", rt=rt, split=None)     # the checkpoint's own task and data
    record["metrics"]["accuracy"], record["cost"]["latency_ms_p50"]
    save_record(store, record)                         # <version>/evals/<task>-<split>-<data fingerprint>.json

`llmctl eval` is a thin layer over this module (tables, reports, charts); distill, prune and
quantize call the same `evaluate` / `measure_cost` for their before / after figures, so every
number in the project comes from one place.

The task is the checkpoint's own, read from its manifest's task record (`core.tasks`), so the
parent's data, split seed, preprocessing and label map come back with no flags; `data=` evaluates
the same task on other data. Plain HF folders without a manifest get the task of their head.

Cost figures, measured on the run's device, precision and threads:
- parameters, and non-embedding parameters (token / position embeddings and an untied output
  embedding excluded, as in scaling-law papers);
- size on disk: the weight files (`*.safetensors`, `*.bin`, `*.gguf`) of the folder;
- batch-1 latency: one forward pass over `seq_len` tokens, median and p90 over warm runs;
- throughput: sequences (and tokens) per second at a larger batch;
- peak memory: on CUDA the allocator's peak; on CPU the weights' bytes plus the process's peak
  resident-set growth during the batched forward (Linux resets the high-water mark through
  /proc/self/clear_refs, so the peak is exact, not sampled).
"""

from __future__ import annotations

import math
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

from llmctl.core.errors import LlmctlError
from llmctl.core.store import Resolved, parse_ref, write_json_atomic

EVALS = "evals"  # the folder beside a checkpoint's weights that keeps its eval records
# The metric a task is judged by first (the comparison table's and the charts' metric).
PRIMARY = {
    "classification": ("accuracy", "max"),
    "ner": ("f1", "max"),
    "clm": ("perplexity", "min"),
    "mlm": ("perplexity", "min"),
    "mlm+nsp": ("perplexity", "min"),
    "sft": ("perplexity", "min"),
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


# ---------------------------------------------------------------------------------------------
# One checkpoint
# ---------------------------------------------------------------------------------------------
def plan(source: Resolved, *, data_cfg=None, need_data: bool = True, task: str | None = None) -> dict:
    """What evaluating `source` means, before anything is loaded: its task and the data config.
    Raises one clear line when the checkpoint has nothing to be judged on. `need_data=False`
    (harness-only runs): a checkpoint that records no data gets cost figures and no task metrics.
    `task` judges it on another task of its kind (a base LM on its SFT child's task, for deltas)."""
    from llmctl.core.loading import source_kind
    from llmctl.core.tasks import KIND_TASK, read_task_record, record_data_config, task_of

    kind = source_kind(source)
    record = read_task_record(source.manifest)
    if not task and not (record or {}).get("name") and kind not in KIND_TASK:
        raise LlmctlError(
            f"ckpt={source.ref} is a bare {kind} with no task head; evaluate a checkpoint that has one "
            f"(fine-tune it first: llmctl finetune init_from={source.ref})"
        )
    task = task_of(kind, record, other_data=data_cfg is not None, task=task)
    if data_cfg is None:
        if (record is None or not record.get("data")) and not need_data:
            return {"kind": kind, "task": task, "record": record, "data_cfg": None}
        data_cfg = record_data_config(record, f"ckpt={source.ref}")
    return {"kind": kind, "task": task, "record": record, "data_cfg": data_cfg}


def evaluate(
    store,
    spec,
    *,
    rt,
    data_cfg=None,
    split: str | None = None,
    batch_size: int = 16,
    max_batches: int | None = None,
    max_seq_len: int | None = None,
    cost: dict | None = None,
    samples: int = 0,
    max_new_tokens: int = 40,
    seed: int = 0,
    cache_root: Path | None = None,
    console=None,
    need_data: bool = True,
    task: str | None = None,
) -> dict:
    """Evaluate one checkpoint on its task (see the module docstring); returns its eval record."""
    from llmctl.core.data import load_data
    from llmctl.core.loading import check_device, load_checkpoint, resolve_source
    from llmctl.core.tasks import DATA_TASK, prepare, sequence_length

    source = resolve_source(store, spec, what="ckpt")
    p = plan(source, data_cfg=data_cfg, need_data=need_data, task=task)
    task, record = p["task"], p["record"] or {}
    data = None
    if p["data_cfg"] is not None:  # (None: harness only, cost figures and no task metrics)
        cache_root = Path(cache_root or Path(store.root) / ".cache")
        data = load_data(p["data_cfg"], task=DATA_TASK[task], cache_dir=cache_root / "datasets")
        split = choose_split(data, split, p["data_cfg"])
    loaded = load_checkpoint(store, source, what="ckpt")
    check_device(loaded, rt.device)
    model, tok = loaded.model.to(rt.device).eval(), loaded.tokenizer
    out = {
        "ref": source.ref,
        "path": str(source.path),
        "kind": p["kind"],
        "task": task,
        "split": None,
        "data": None,
        "metrics": {},
        "primary": primary(task, {}),
        "parent": first_parent(source.manifest),
        "weights_sha256": loaded.sha256,
        "runtime": {**rt.record(), "threads": _threads()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if data is not None:
        length = sequence_length(max_seq_len, record, p["data_cfg"], model.config)
        prepared = prepare(
            task,
            data,
            tok,
            max_seq_len=length,
            batch_size=batch_size,
            seed=seed,
            cache_root=cache_root,
            eval_batches=max_batches,
            system_prompt=record.get("system_prompt"),
        )
        check_labels(model, prepared, source.ref)
        if console is not None:
            console.print(
                f"[bold]{source.ref}[/] · {task} on {split} ({len(data[split])} examples, data {data.fingerprint[:12]}) · {length} tokens"
            )
        started = time.perf_counter()
        out.update(
            judge(model, prepared, split, rt=rt, seed=seed),
            labels=prepared.info.get("labels"),
            max_seq_len=length,
            max_batches=max_batches,
            data={"fingerprint": data.fingerprint, "examples": len(data[split]), "config": data.config},
            eval_seconds=round(time.perf_counter() - started, 3),
        )
        if task == "sft" and samples:
            from llmctl.core.tasks import sample_generations

            out["samples"] = sample_generations(
                model,
                tok,
                data[split],
                system_prompt=record.get("system_prompt"),
                num=samples,
                max_new_tokens=max_new_tokens,
            )
    elif console is not None:
        console.print(f"[bold]{source.ref}[/] · records no data: cost figures and harness tasks only")
    if cost is not None:
        out["cost"] = measure_cost(model, source.path, rt, **cost)
    out["_model"], out["_tokenizer"], out["_split"] = (
        model,
        tok,
        data[split] if data is not None else None,
    )  # for the caller; never saved
    return out


def judge(
    model, prepared, split: str, *, rt, seed: int = 0, folder: Path | None = None, cost: dict | None = None
) -> dict:
    """A model's metrics on `split` of a prepared task (core.tasks), and with `cost` (and the folder its
    weights are saved in) its cost figures: what `evaluate` records, for a model already in memory
    (distill and prune judge before / after with it)."""
    from llmctl.core.train import evaluate_model

    raw = evaluate_model(model, lambda m: prepared.evaluate(m, split, "x"), rt, seed)
    metrics = {k.split("/", 1)[1]: v for k, v in raw.items()}
    out = {"task": prepared.task, "split": split, "metrics": metrics, "primary": primary(prepared.task, metrics)}
    if cost is not None:
        out["cost"] = measure_cost(model, folder, rt, **cost)
    return out


def task_metrics(model, prepared, rt, seed: int) -> dict:
    """Validation (and test) metrics of a model not trained further, in the shape the fine-tuning loop returns."""
    from llmctl.core.train import evaluate_model

    metrics = evaluate_model(model, lambda m: prepared.evaluate(m, "validation", "eval"), rt, seed)
    if "test" in prepared.splits:
        metrics.update(evaluate_model(model, lambda m: prepared.evaluate(m, "test", "test"), rt, seed))
    return metrics


class BeforeAfter:
    """A stage's before / after, judged by eval's code: `before` (the input checkpoint) now, `after` on
    the saved folder through `publish(after_save=...)`; both go into the manifest's `compare` under
    `names` and print as one table (distill: teacher / student, prune: before / after)."""

    def __init__(
        self,
        model,
        prepared,
        split: str,
        *,
        ref: str,
        folder: Path,
        rt,
        seed: int,
        cost: dict | None,
        names: tuple[str, str] = ("before", "after"),
    ):
        self.prepared, self.split, self.rt, self.seed, self.cost, self.names = prepared, split, rt, seed, cost, names
        self.before = {"ref": ref, **judge(model, prepared, split, rt=rt, seed=seed, folder=folder, cost=cost)}
        self.after: dict | None = None

    def after_save(self, model, ref: str):
        def measure(folder: Path) -> dict:
            self.after = {
                "ref": ref,
                **judge(model, self.prepared, self.split, rt=self.rt, seed=self.seed, folder=folder, cost=self.cost),
            }
            self.after["delta"] = delta(self.after, self.before)
            return {"compare": {self.names[0]: self.before, self.names[1]: self.after}}

        return measure

    def table(self, published_ref: str, title: str):
        self.after["ref"] = published_ref
        return comparison_table([self.before, self.after], title)


def choose_split(data, split: str | None, data_cfg) -> str:
    """`split`, else test where the data has one, else validation; a split the data lacks is one line."""
    if split is None:
        return "test" if "test" in data else "validation"
    if split not in data:
        raise LlmctlError(
            f"split={split}: the data ({data_cfg.get('train') or data_cfg.get('source')}) has no {split} split "
            f"(it has {', '.join(data.splits)}); choose one of those"
        )
    return split


def check_labels(model, prepared, ref: str) -> None:
    """A classifier / tagger must be judged on its own label map: the data's labels must be the model's, in its order."""
    labels = prepared.info.get("labels")
    if not labels or prepared.task not in ("classification", "ner"):
        return
    own = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    if labels != own:
        unknown = sorted(set(labels) - set(own))
        why = (
            f"label {unknown[0]!r} is not one of its {len(own)} labels"
            if unknown
            else f"the labels come in another order ({', '.join(labels[:4])}… vs {', '.join(own[:4])}…)"
        )
        raise LlmctlError(
            f"ckpt={ref}: the data does not match the model's label map: {why}; evaluate it on data with the labels it was trained on"
        )


def primary(task: str, metrics: dict) -> dict:
    name, mode = PRIMARY[task]
    return {"metric": name, "mode": mode, "value": metrics.get(name)}


def first_parent(manifest: dict | None) -> dict | None:
    """What a checkpoint is compared against: the checkpoint it was made from, else (a student built
    from the teacher's layers or at random) its teacher."""
    parents = (manifest or {}).get("parents") or []
    for parent in sorted(parents, key=lambda p: p.get("role") == "teacher"):
        return {"ref": parent.get("ref"), "path": parent.get("path"), "role": parent.get("role")}
    return None


# ---------------------------------------------------------------------------------------------
# Cost
# ---------------------------------------------------------------------------------------------
def measure_cost(
    model,
    folder: Path,
    rt,
    *,
    seq_len: int = 128,
    batch_size: int = 16,
    warmup: int = 10,
    runs: int = 20,
    throughput_runs: int = 5,
) -> dict:
    """Parameters, size on disk, batch-1 latency (median / p90), throughput and peak memory."""
    import torch

    from llmctl.core.models import max_positions
    from llmctl.core.quantization import tensor_bytes

    positions = max_positions(model.config)
    length = min(int(seq_len), positions) if positions else int(seq_len)
    total, non_embedding = parameter_counts(model)
    gen = torch.Generator().manual_seed(0)
    vocab = int(model.config.vocab_size)

    def batch(n: int) -> dict:
        ids = torch.randint(5, vocab, (n, length), generator=gen).to(rt.device)  # ids above the usual special tokens
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def forward(inputs) -> None:
        model(**inputs)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()

    one = batch(1)
    times = []
    was_training = model.training
    model.eval()  # dropout off: what inference costs
    with torch.inference_mode(), rt.autocast():
        for i in range(int(warmup) + int(runs)):
            start = time.perf_counter()
            forward(one)
            if i >= int(warmup):
                times.append(time.perf_counter() - start)
        big = batch(int(batch_size))
        forward(big)  # warm the larger shapes
        with _PeakMemory(rt.device) as peak:
            start = time.perf_counter()
            for _ in range(int(throughput_runs)):
                forward(big)
            elapsed = time.perf_counter() - start
    model.train(was_training)
    seqs_per_s = int(batch_size) * int(throughput_runs) / elapsed
    weights_bytes = tensor_bytes(model)  # quantized weights at their real width
    return {
        "parameters": total,
        "non_embedding_parameters": non_embedding,
        "size_bytes": weights_size(folder),
        "seq_len": length,
        "latency_ms_p50": 1000 * statistics.median(times),
        "latency_ms_p90": 1000 * _quantile(times, 0.9),
        "latency_runs": len(times),
        "throughput_batch": int(batch_size),
        "throughput_seq_per_s": seqs_per_s,
        "throughput_tokens_per_s": seqs_per_s * length,
        "peak_memory_bytes": peak.bytes if rt.device.type == "cuda" else weights_bytes + peak.bytes,
        "peak_memory_how": peak.how,
    }


def cost_settings(section) -> dict | None:
    """`measure_cost` keyword arguments from a config's `cost:` section (None when cost.enabled is false)."""
    if section is None or not section.get("enabled", True):
        return None
    return {k: int(section[k]) for k in ("seq_len", "batch_size", "warmup", "runs", "throughput_runs")}


def parameter_counts(model) -> tuple[int, int]:
    """(all parameters, non-embedding parameters); tied weights counted once."""
    import torch

    from llmctl.core.models import count_parameters
    from llmctl.core.quantization import packed_weight

    total, _ = count_parameters(model)
    embedding = {id(p): p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    embedding.update(
        {
            id(m): packed_weight(m).numel()
            for m in model.modules()  # int8 embedding tables (core.quantization)
            if hasattr(m, "embedding_dim") and packed_weight(m) is not None
        }
    )
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is not None:
        embedding.setdefault(id(out.weight), out.weight.numel())  # an untied LM head is an embedding too
    return total, total - sum(embedding.values())


def weights_size(folder: Path) -> int:
    """Bytes of the weight files in a checkpoint folder (tokenizer, config and eval records excluded)."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def _threads() -> int:
    import torch

    return torch.get_num_threads()


class _PeakMemory:
    """Peak memory of what runs inside: CUDA's allocator peak, or the CPU process's resident-set growth."""

    def __init__(self, device):
        self.device, self.bytes, self.how = device, 0, ""

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.how = "torch.cuda.max_memory_allocated"
        else:
            _trim()  # hand freed heap back to the OS, so the high-water mark sees this pass's allocations
            self.before = _rss("VmRSS")
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (Linux ≥ 4.0)
                self.how = "weights + VmHWM growth (clear_refs reset)"
            except OSError:
                self.how = "weights + ru_maxrss growth (not reset: an upper bound)"
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.bytes = max(0, _rss("VmHWM") - self.before) if self.before else 0


def _trim() -> None:
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the growth is then a lower bound


def _rss(field: str) -> int:
    """A memory figure of this process in bytes (VmRSS, VmHWM) from /proc/self/status; 0 where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# ---------------------------------------------------------------------------------------------
# Records: <checkpoint>/evals/<key>.json, or <output_root>/evals/... for folders outside the store
# ---------------------------------------------------------------------------------------------
def record_key(record: dict) -> str:
    """`<task>-<split>-<data fingerprint>`, with `-<N>b` when only the split's first N batches were scored
    (`cost-only` for a harness run on a checkpoint without data)."""
    if record.get("data") is None:
        return "cost-only"
    capped = f"-{record['max_batches']}b" if record.get("max_batches") else ""
    return f"{record['task']}-{record['split']}-{record['data']['fingerprint'][:12]}{capped}"


def record_dir(store, ref: str, path: str) -> Path:
    """Where a checkpoint's eval records live: inside a store version (never touching its weights or
    manifest), else under <output_root>/evals/ for HF folders and packaged models, which may be read-only."""
    import hashlib

    if parse_ref(ref):
        return Path(path) / EVALS
    slug = "".join(c if c.isalnum() or c in "._-" else "-" for c in Path(path).name)[:40]
    return Path(store.root) / EVALS / f"{slug}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def save_record(store, record: dict, key: str | None = None) -> Path:
    folder = record_dir(store, record["ref"], record["path"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key or record_key(record)}.json"
    write_json_atomic(path, {k: v for k, v in record.items() if not k.startswith("_")})
    return path


def load_record(store, ref: str, path: str, key: str) -> dict | None:
    import json

    file = record_dir(store, ref, path) / f"{key}.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except ValueError:
        return None  # a damaged record is measured again, not trusted


# ---------------------------------------------------------------------------------------------
# Deltas against the parent
# ---------------------------------------------------------------------------------------------
def delta(child: dict, parent: dict | None) -> dict | None:
    """The child's primary metric minus its parent's, and its size / latency as ratios of the parent's."""
    if (
        not parent
        or parent.get("task") != child.get("task")
        or parent["primary"]["value"] is None
        or child["primary"]["value"] is None
    ):
        return None
    out = {"ref": parent["ref"], "metric": child["primary"]["value"] - parent["primary"]["value"]}
    c, p = child.get("cost") or {}, parent.get("cost") or {}
    for key in ("size_bytes", "latency_ms_p50", "parameters"):
        if c.get(key) and p.get(key):
            out[f"{key}_ratio"] = c[key] / p[key]
    return out


# ---------------------------------------------------------------------------------------------
# The comparison table (terminal and markdown share it; distill / prune print their before / after with it)
# ---------------------------------------------------------------------------------------------
def table_rows(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and one row per eval record: its primary metric, the delta against its parent, its cost."""
    metrics = {r["primary"]["metric"] for r in records}
    one = len(metrics) == 1
    seq = {(r.get("cost") or {}).get("seq_len") for r in records} - {None}
    headers = [
        "checkpoint",
        (next(iter(metrics)) if one else "metric"),
        "Δ parent",
        "params (non-emb)",
        "size",
        "size ×",
        "latency p50 / p90 ms" + (f" @{seq.pop()}" if len(seq) == 1 else ""),
        "seq/s",
        "peak mem",
    ]
    rows = []
    for r in records:
        p, c, d = r["primary"], r.get("cost") or {}, r.get("delta")
        value = "—" if p["value"] is None else f"{p['value']:.4f}" if one else f"{p['metric']} {p['value']:.4f}"
        latency = f"{_num(c.get('latency_ms_p50'))} / {_num(c.get('latency_ms_p90'))}" if c else "—"
        rows.append(
            [
                r["ref"],
                value,
                f"{d['metric']:+.4f}" if d else "—",
                f"{_count(c.get('parameters'))} ({_count(c.get('non_embedding_parameters'))})" if c else "—",
                _bytes(c.get("size_bytes")),
                f"{d['size_bytes_ratio']:.2f}×" if d and "size_bytes_ratio" in d else "—",
                latency,
                _num(c.get("throughput_seq_per_s")),
                _bytes(c.get("peak_memory_bytes")),
            ]
        )
    return headers, rows


def comparison_table(records: list[dict], title: str):
    """table_rows as a rich Table for the terminal."""
    from rich.table import Table

    headers, rows = table_rows(records)
    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="left" if h == "checkpoint" else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _count(n) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _bytes(n) -> str:
    if n is None:
        return "—"
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _num(x) -> str:
    return "—" if x is None else (f"{x:.1f}" if x < 1000 else f"{x:,.0f}")
