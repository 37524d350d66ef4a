"""What a model costs, measured the same way for every artifact on the run's device, precision and threads.

- parameters, and non-embedding parameters (token / position embeddings and an untied output
  embedding excluded, as in scaling-law papers);
- size on disk: the weight files of the folder (`store.weight_files`: safetensors, ONNX graph + data, GGUF);
- batch-1 latency: one forward pass over `seq_len` tokens, median and p90 over warm runs;
- throughput: sequences (and tokens) per second at a larger batch;
- peak memory: the weights' bytes plus the peak growth during the batched forward (on CUDA the
  allocator's peak; on CPU the process's resident set, whose high-water mark Linux resets through
  /proc/self/clear_refs, so the peak is exact, not sampled).

A model run differently from how it is deployed says so in a `cost_note` attribute (a GGUF export, run by
transformers on de-quantized fp32 weights), and one that keeps its own numerics in `own_precision` (an ONNX export:
ONNX Runtime ignores bf16 autocast); the note travels with its figures and the eval table prints it. A model whose
layers run llmctl's quantized kernels is timed under `Runtime.for_model` — fp32 around the kernels where
precision=auto chose bf16, as generate and serve run it — and says so.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import statistics
import time
from pathlib import Path

from llmctl.core.families import max_positions
from llmctl.core.models import count_parameters, tensor_bytes, tied_copy, weight_bytes
from llmctl.core.store import weight_files

# The figures `measure_cost` reports that a run can optimise (objectives=[..., cost/<name>]), and which way is better
MODES = {
    "parameters": "min",
    "non_embedding_parameters": "min",
    "size_bytes": "min",
    "latency_ms_p50": "min",
    "latency_ms_p90": "min",
    "throughput_seq_per_s": "max",
    "throughput_tokens_per_s": "max",
    "peak_memory_bytes": "min",
    "ttft_ms": "min",  # causal LMs
    "decode_tokens_per_s": "max",  # causal LMs
}
TIMED = ("latency", "throughput", "ttft", "decode", "peak_memory")  # figures another job running alongside disturbs
SETTINGS = (
    "seq_len",
    "batch_size",
    "warmup",
    "runs",
    "throughput_runs",
    "decode_prompt",
    "decode_tokens",
    "decode_runs",
)


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
    decode_prompt: int = 32,
    decode_tokens: int = 32,
    decode_runs: int = 3,
) -> dict:
    """Parameters, size on disk, batch-1 latency (median / p90), throughput and peak memory; for a causal LM also
    batch-1 decode speed, time to first token and the memory-bandwidth bound (`measure_decode`)."""
    import torch

    asked, rt = rt, rt.for_model(model)  # precision=auto: a quantized model timed as generate / serve run it
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
    with rt.inference():
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
    weights_bytes = weight_bytes(model)  # quantized weights at their real width
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
        "peak_memory_bytes": weights_bytes + peak.bytes,  # this model alone, whatever else is resident
        "peak_memory_how": peak.how,
        **(
            measure_decode(model, rt, decode_prompt, decode_tokens, decode_runs)
            if _decodes(model, decode_tokens)
            else {}
        ),
        **({"kernels": kernels} if (kernels := getattr(model, "llmctl_kernels", None)) else {}),
        **({"note": note} if (note := _note(model, asked, rt)) else {}),  # why its figures are not like the others'
    }


def _decodes(model, tokens: int) -> bool:
    return int(tokens) > 1 and bool(getattr(model, "can_generate", lambda: False)())


def measure_decode(model, rt, prompt_tokens: int, new_tokens: int, runs: int) -> dict:
    """Batch-1 greedy generation as `llmctl generate` runs it (`generation.greedy`, KV cache), warm: time to first
    token (prefill of `prompt_tokens` + one token) and decode tokens/s over the remaining `new_tokens` − 1 (medians of
    `runs`), against the bound of memory bandwidth: a decode step reads every weight it multiplies by once."""
    import torch

    from llmctl.core.generation import greedy  # imports torch: loaded when figures are measured, not for --help

    positions = max_positions(model.config)
    if positions and positions <= int(new_tokens) + 1:
        return {}  # too few positions for the timed generation: no decode figures rather than a shorter one
    prompt = min(int(prompt_tokens), positions - int(new_tokens)) if positions else int(prompt_tokens)
    ids = torch.randint(
        5, int(model.config.vocab_size), (1, max(prompt, 1)), generator=torch.Generator().manual_seed(1)
    )
    ids = ids.to(rt.device)

    def generate(n: int) -> float:
        start = time.perf_counter()
        greedy(model, ids, max_new_tokens=n)  # no stop tokens: every run times the same tokens
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with rt.inference():
        generate(int(new_tokens))  # warm: first-call set-up, kernel packing, allocator
        firsts, fulls = [], []
        for _ in range(int(runs)):  # interleaved, so a slow moment hurts both figures alike
            firsts.append(generate(1))
            fulls.append(generate(int(new_tokens)))
    first, full = statistics.median(firsts), statistics.median(fulls)
    tokens_per_s = (int(new_tokens) - 1) / max(full - first, 1e-9)
    per_token, bandwidth = bytes_per_token(model), memory_bandwidth(rt.device)
    bound = bandwidth / per_token if per_token else None
    return {
        "decode_prompt_tokens": int(ids.shape[1]),
        "decode_new_tokens": int(new_tokens),
        "ttft_ms": 1000 * first,
        "decode_tokens_per_s": tokens_per_s,
        "decode_bytes_per_token": per_token,
        "memory_bandwidth_gbs": bandwidth / 1e9,
        "decode_bound_tokens_per_s": bound,
        "decode_pct_of_bound": 100 * tokens_per_s / bound if bound else None,
    }


def bytes_per_token(model) -> int:
    """Bytes of weights one batch-1 decode step reads: each matmul's weight as its kernel reads it (a packed
    kernel's own layout, int8 values and scales, float weights at their width in memory: an fp32 weight under bf16
    autocast is read whole and cast), and one row of each embedding table that is not also the output layer."""
    import torch

    def weight_of(m):
        weight = getattr(m, "weight", None)
        return weight if torch.is_tensor(weight) else None

    total, seen = 0, set()
    for m in model.modules():
        if hasattr(m, "kernel_bytes"):  # a packed Linear (core.quantization.kernels)
            total += m.kernel_bytes()
            seen.add(id(m.weight))
        elif (w := weight_of(m)) is not None and w.dim() == 2 and not hasattr(m, "embedding_dim") and id(w) not in seen:
            seen.add(id(w))
            total += tensor_bytes(w)
    for m in model.modules():  # after the matmuls: a table that is also the output layer is already counted
        if hasattr(m, "embedding_dim") and (w := weight_of(m)) is not None and id(w) not in seen:
            total += tensor_bytes(w) // max(int(w.shape[0]), 1)
    return total


_BANDWIDTH: dict[str, float] = {}


def memory_bandwidth(device) -> float:
    """Bytes per second a copy of 256 MiB moves on `device` (read + write, best of 10, at the process's threads);
    measured once per process."""
    import torch

    key = str(device)
    if key not in _BANDWIDTH:
        src = torch.ones(64 * 1024 * 1024, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        best = math.inf
        for _ in range(11):  # the first touches fresh pages
            start = time.perf_counter()
            dst.copy_(src)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        _BANDWIDTH[key] = 2 * src.numel() * src.element_size() / best
        del src, dst
    return _BANDWIDTH[key]


def _note(model, asked, rt) -> str | None:
    """Why a model's figures are not measured like a torch model's under the run's precision (`asked`), if they are
    not; `rt`: the runtime it was timed under."""
    own = getattr(model, "own_precision", None)  # a runtime with its own numerics (ONNX Runtime)
    if own and asked.precision != "fp32":
        return f"run by ONNX Runtime in {own}, not under {asked.precision} autocast as the torch models are"
    if rt.precision != asked.precision:
        return f"timed in {rt.precision} around its quantized kernels, as generate / serve run it ({rt.reason})"
    return getattr(model, "cost_note", None)


def cost_settings(section) -> dict | None:
    """`measure_cost` keyword arguments from a config's `cost:` section (None when cost.enabled is false)."""
    if section is None or not section.get("enabled", True):
        return None
    defaults = inspect.signature(measure_cost).parameters  # for a `cost:` preset written before decode figures
    return {k: int(section[k] if k in section else defaults[k].default) for k in SETTINGS}


def parameter_counts(model) -> tuple[int, int]:
    """(all parameters, non-embedding parameters); tied weights counted once. Embedding tables (float or
    quantized: any module with an `embedding_dim`) and an untied output embedding are the embeddings."""
    if hasattr(model, "stored_parameters"):  # weights kept outside torch (an ONNX export) say their own counts
        return model.stored_parameters()
    total, _ = count_parameters(model)
    embedding = {}
    for m in model.modules():
        if hasattr(m, "embedding_dim"):
            params = list(m.parameters(recurse=False))
            embedding.update({id(p): p.numel() for p in params} if params else {id(m): count_parameters(m)[0]})
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is not None and out.weight is not tied_copy(model):
        embedding.setdefault(id(out.weight), out.weight.numel())  # an untied LM head is an embedding too
    return total, total - sum(embedding.values())


def weights_size(folder: Path) -> int:
    """Bytes of the weight files in a checkpoint folder, the files its weights hash covers (safetensors, an ONNX
    graph and its data, a GGUF file; tokenizer, config and eval records excluded)."""
    return sum(p.stat().st_size for p in weight_files(Path(folder)))


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def threads() -> int:
    import torch

    return torch.get_num_threads()


class _PeakMemory:
    """How far memory rose above where it stood when the block began: CUDA's allocator peak above what was
    allocated then, or the CPU process's resident-set growth. Models already resident (a teacher, the
    checkpoint judged before) are in the starting point, so the figure is the block's own."""

    def __init__(self, device):
        self.device, self.bytes, self.how, self.before = device, 0, "", 0

    def __enter__(self):
        import torch

        _trim()  # hand freed memory back, so the peak sees this pass's allocations
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            self.how = "weights + torch.cuda.max_memory_allocated growth"
        else:
            self.before = _rss("VmRSS")
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (Linux ≥ 4.0)
                self.how = "weights + VmHWM growth (clear_refs reset)"
            except OSError:
                self.how = "weights + ru_maxrss growth (not reset: an upper bound)"
        return self

    def __exit__(self, *exc):
        import torch

        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else _rss("VmHWM")
        self.bytes = max(0, int(peak) - self.before) if self.before or self.device.type == "cuda" else 0


def _trim() -> None:
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the growth is then a lower bound
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


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
