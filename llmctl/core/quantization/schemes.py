"""Quantization schemes: which modules a scheme quantizes, and the transforms that quantize them in memory.

- `int8-dynamic`: int8 weights per output channel (torchao `IntxWeightOnlyConfig`, the layout int8-weight stores)
  × int8 activations quantized per row on the fly, run by `aten._int_mm` (`kernels.DynamicInt8Linear`, CPU only).
- `int8-weight` / `int4-weight`: torchao `IntxWeightOnlyConfig` (int8 per channel, int4 per group of
  `group_size` input weights), run by torch's packed kernels where the machine has them (`kernels.pack`).
  int4 groups take a float zero point by default (`zero_point`: each group's own min–max range, the mapping
  the packed kernel computes and GGUF's Q4_1 stores); `error_rank` adds a low-rank float correction where a
  layer's rounding error is low-rank (`lowrank`).
- `qat`: torchao `QATConfig(base, step="prepare")`, trained by the caller, then `finish_qat` converts.
- Embedding tables: int8 per row (torchao's tensor), looked up row by row (`kernels.Int8Embedding`).
- The task head and `skip` patterns stay in floating point.

A scheme's record (`quantize` returns it, the manifest keeps it) names every quantized module, so
`apply` performs exactly the same transforms on a model rebuilt from config.json (core.quantization.serialization).
"""

from __future__ import annotations

import contextlib
import fnmatch
import io

from llmctl.core.errors import LlmctlError
from llmctl.core.quantization import kernels, lowrank

SCHEMES = {
    "int8-dynamic": {
        "backend": "torchao",
        "bits": 8,
        "what": "int8 weights per channel × int8 activations quantized per token on the fly",
        "devices": ("cpu",),
    },
    "int8-weight": {
        "backend": "torchao",
        "bits": 8,
        "what": "int8 weights per channel (weight-only)",
        "devices": ("cpu", "cuda"),
    },
    "int4-weight": {
        "backend": "torchao",
        "bits": 4,
        "what": "int4 weights per group (weight-only)",
        "devices": ("cpu", "cuda"),
    },
}
METHODS = (*SCHEMES, "qat")
QAT_BASES = ("int4-weight", "int8-weight")  # torchao QATConfig supports IntxWeightOnlyConfig bases (not int8 dynamic)
DEFAULT_GROUP = {"int4-weight": 32, "int8-weight": None}  # None = one scale per output channel


def check(method: str, *, device, group_size: int | None, base: str | None = None, head_int8: bool = False) -> str:
    """The scheme a method stores, or one line for an unsupported combination (before anything loads)."""
    if method not in METHODS:
        raise LlmctlError(f"method={method}: not a quantization method; choose one of {', '.join(METHODS)}")
    scheme = method
    if method == "qat":
        if base not in QAT_BASES:
            raise LlmctlError(
                f"method.base={base}: QAT trains toward {' or '.join(QAT_BASES)} (torchao's QAT has no int8-dynamic "
                "base); "
                f"set method.base=int4-weight"
            )
        scheme = base
    kind = getattr(device, "type", str(device))
    if kind not in SCHEMES[scheme]["devices"]:
        raise LlmctlError(
            f"method={method} runs on {' / '.join(SCHEMES[scheme]['devices'])} kernels, not {kind}: "
            f"set device=cpu" + (", or choose method=int8-weight for a GPU" if scheme == "int8-dynamic" else "")
        )
    if group_size is not None:
        if scheme == "int8-dynamic":
            raise LlmctlError(
                "quantize.group_size: int8-dynamic scales each output channel (the int8 matmul has no groups); "
                "leave quantize.group_size=null or choose method=int4-weight"
            )
        if group_size < 2 or group_size & (group_size - 1):
            raise LlmctlError(f"quantize.group_size={group_size}: use a power of two such as 32, 64 or 128")
    check_head(scheme, head_int8)
    return scheme


def check_head(scheme: str, head_int8: bool) -> None:
    """An int8 output layer goes beside a weight-only scheme only (one line otherwise)."""
    if head_int8 and scheme not in ("int8-weight", "int4-weight"):
        raise LlmctlError(
            "quantize.head_int8 stores the output layer as int8 weight-only beside a weight-only scheme; "
            f"method={scheme} quantizes activations too: choose method=int8-weight or int4-weight, or drop "
            "quantize.head_int8"
        )


def targets(
    model,
    *,
    skip: list[str],
    keep_head: bool,
    embeddings: bool,
    group_size: int | None = None,
    head_int8: bool = False,
) -> dict:
    """Which modules a scheme quantizes: {"linear": [...], "embeddings": [...], "kept": [...], "head_int8": [...]}.
    Linears and embeddings outside the head and `skip`; Linears whose input width `group_size`
    does not divide stay in floating point too (named in "kept"). `head_int8`: the output layer (a causal LM's
    lm_head, for a tied model the table it shares with the input embedding) is int8 weight-only instead of kept."""
    import torch

    names = [name for name, _ in model.named_modules() if name]
    for pattern in skip:
        if not any(_matches(name, [pattern]) for name in names):
            close = fnmatch.filter(names, f"*{pattern}*")[:3]
            raise LlmctlError(
                f"quantize.skip: {pattern!r} matches no module of {type(model).__name__}"
                + (
                    f" (did you mean {', '.join(close)}?)"
                    if close
                    else "; patterns are module names such as 'classifier' or '*.output.dense'"
                )
            )
    kept = list(skip) + (head_modules(model) if keep_head else [])
    linear, tables, too_narrow = [], [], []
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if not name or _matches(name, kept):
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":  # GPT-2's Conv1D becomes a Linear
            (too_narrow if group_size and _in_width(module) % group_size else linear).append(name)
        elif isinstance(module, torch.nn.Embedding) and embeddings:
            tied = out is not None and getattr(out, "weight", None) is module.weight
            if not (tied and keep_head):
                tables.append(name)
    if not linear and too_narrow:
        widths = sorted({_in_width(dict(model.named_modules())[n]) for n in too_narrow})
        fits = [g for g in (256, 128, 64, 32, 16) if all(w % g == 0 for w in widths)]
        raise LlmctlError(
            f"quantize.group_size={group_size} divides the input width of no Linear layer (widths "
            f"{', '.join(map(str, widths[:6]))}); choose a group size that divides them"
            + (f", e.g. quantize.group_size={fits[0]}" if fits else "")
        )
    if not linear:
        raise LlmctlError(
            f"nothing to quantize: {type(model).__name__} has no Linear layer outside the kept modules "
            f"({', '.join(kept) or 'none'})"
        )
    head = _output_layer(model) if head_int8 else None
    if head_int8 and head is None:
        raise LlmctlError(
            f"quantize.head_int8: {type(model).__name__} has no output layer (a causal LM's lm_head) to store as int8; "
            "drop quantize.head_int8"
        )
    if head:
        kept = [k for k in kept if k != head]
        linear = [n for n in linear if n != head]
    return {"linear": linear, "embeddings": tables, "kept": kept + too_narrow, "head_int8": [head] if head else []}


def _output_layer(model) -> str | None:
    """The name of a causal LM's output Linear (lm_head), None for models without one."""
    import torch

    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(out, torch.nn.Linear) or not getattr(model, "can_generate", lambda: False)():
        return None
    return next((name for name, m in model.named_modules() if m is out), None)


def _in_width(module) -> int:
    """A Linear's input width (GPT-2's Conv1D stores its weight as (in, out))."""
    return module.in_features if hasattr(module, "in_features") else module.weight.shape[0]


def head_modules(model) -> list[str]:
    """The task head: top-level modules other than the base model (classifier, score, lm_head, cls, ...)."""
    import torch

    base = getattr(model, "base_model_prefix", "")
    return [
        name
        for name, child in model.named_children()
        if name != base
        and any(
            isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) or type(m).__name__ == "Conv1D"
            for m in child.modules()
        )
    ]


def quantize(
    model,
    scheme: str,
    *,
    group_size: int | None,
    skip: list[str],
    keep_head: bool,
    embeddings: bool,
    method: str | None = None,
    outliers: dict[str, float] | None = None,
    head_int8: bool = False,
    zero_point: bool = True,
    error_rank: int = 0,
    input_scales: dict | None = None,
) -> dict:
    """Quantize `model` in place (floating point → `scheme`); returns the record the manifest keeps.
    `outliers` (from `activation_outliers`): Linears whose inputs are too peaked for int8 activations,
    kept in floating point. int4 only: `zero_point` (a float zero point per group, else symmetric groups) and
    `error_rank` (a rank-r correction of each layer's rounding error where that error is low-rank, weighed by
    `input_scales` from `input_rms` when given; core.quantization.lowrank)."""
    record = _plan(
        model,
        scheme,
        method or scheme,
        group_size=group_size,
        skip=skip,
        keep_head=keep_head,
        embeddings=embeddings,
        outliers=outliers,
        head_int8=head_int8,
    )
    corrected: dict[str, int] = {}

    def correct(name: str, module, weight) -> None:  # each int4 Linear, right after it is quantized
        rank = lowrank.fit(module, weight, rank=int(error_rank), input_scales=(input_scales or {}).get(name))
        if rank:
            corrected[name] = rank

    if record["bits"] == 4:
        record["zero_point"] = bool(zero_point)
    fits = record["bits"] == 4 and error_rank > 0
    apply(model, record, correct=correct if fits else None)
    if fits:
        record["lowrank"], record["lowrank_rank"] = corrected, int(error_rank)
    record["torchao"] = _torchao_version()  # every scheme stores torchao tensors now
    kernels.pack(model, record)
    return record


def _plan(
    model, scheme: str, method: str, *, group_size, skip, keep_head, embeddings, outliers=None, head_int8=False
) -> dict:
    """Prepare the model (fp32, Linears) and write down what `scheme` will do to it."""
    check_head(scheme, head_int8)
    prepare_model(model)
    group = group_size if group_size is not None else DEFAULT_GROUP.get(scheme)
    chosen = targets(
        model, skip=skip, keep_head=keep_head, embeddings=embeddings, group_size=group, head_int8=head_int8
    )
    if outliers:
        chosen["linear"] = [name for name in chosen["linear"] if name not in outliers]
        chosen["kept"] = chosen["kept"] + sorted(outliers)
    return {
        "method": method,
        "scheme": scheme,
        **{k: v for k, v in SCHEMES[scheme].items() if k != "devices"},
        "group_size": group,
        "skip": list(skip),
        "keep_head": keep_head,
        **chosen,
        **({"outliers": {k: round(v, 1) for k, v in sorted(outliers.items())}} if outliers else {}),
    }


def prepare_model(model) -> None:
    """fp32 everywhere (the scales and the layers kept in floating point) and GPT-2's Conv1D as Linear."""
    import torch
    from transformers.pytorch_utils import Conv1D

    model.float()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):  # (in, out) weights → an nn.Linear with (out, in)
                linear = torch.nn.Linear(child.weight.shape[0], child.nf, device=child.weight.device)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    linear.bias.copy_(child.bias)
                setattr(parent, name, linear)


def apply(model, record: dict, *, qat: str | None = None, correct=None) -> None:
    """The record's transforms on a prepared model (quantize, and the loader on a fresh one).
    `qat="prepare"` fake-quantizes the Linears instead (training toward the scheme); no embeddings yet.
    `correct(name, module, float weight)`: called for each Linear right after it is quantized (its float weight is
    dropped after, so no second copy of the model is held)."""
    _torchao_quantize(model, record, set(record["linear"]), step=qat, each=correct)  # int8-dynamic: int8 weights
    if qat == "prepare":
        return
    for name, rank in (record.get("lowrank") or {}).items():  # filled by quantize, or by the loader's tensors
        lowrank.attach(model.get_submodule(name), int(rank))
    int8_rows = {"bits": 8, "group_size": None}  # one scale per output channel / per table row
    if record.get("head_int8"):  # the output layer: int8 per channel, whatever the body's bits
        _torchao_quantize(model, int8_rows, set(record["head_int8"]), step=None)
    if record["embeddings"]:
        _torchao_quantize(model, int8_rows, set(record["embeddings"]), step=None)
        kernels.index_tables(model, record["embeddings"])


def prepare_qat(model, scheme: str, **settings) -> dict:
    """Fake-quantize the Linears toward `scheme` for training; returns the record `finish_qat` completes.
    `settings`: what `quantize` takes (group_size, skip, keep_head, embeddings, head_int8)."""
    record = _plan(model, scheme, "qat", **settings)
    apply(model, record, qat="prepare")
    return record


def finish_qat(model, record: dict) -> dict:
    """Convert a trained fake-quantized model to its scheme (the same tensors PTQ writes)."""
    model.float()
    apply(model, record, qat="convert")
    record = {**record, "torchao": _torchao_version()}
    kernels.pack(model, record)
    return record


def _torchao_quantize(model, record: dict, names: set[str], step: str | None, each=None) -> None:
    import torch

    with quiet_torchao():
        from torchao.quantization import IntxWeightOnlyConfig, PerAxis, PerGroup, quantize_
        from torchao.quantization.qat import QATConfig
    group = record.get("group_size")
    config = IntxWeightOnlyConfig(
        weight_dtype=torch.int4 if record["bits"] == 4 else torch.int8,
        granularity=PerGroup(int(group)) if group else PerAxis(0),
    )
    if step is not None:
        quantize_(model, QATConfig(config, step=step), filter_fn=lambda module, fqn: fqn in names)
        return
    minmax = record["bits"] == 4 and record.get("zero_point")  # float zero points: min–max groups (`minmax_int4`)
    if not minmax and each is None:
        quantize_(model, config, filter_fn=lambda module, fqn: fqn in names)
        return
    for name in sorted(names):  # one Linear at a time: `each` sees its float weight, then it is dropped
        module = model.get_submodule(name)
        weight = module.weight.detach()
        if minmax:
            module.weight = torch.nn.Parameter(minmax_int4(weight, int(group)), requires_grad=False)
        else:
            quantize_(model, config, filter_fn=lambda m, fqn, name=name: fqn == name)
        if each is not None:
            each(name, model.get_submodule(name), weight)


def minmax_int4(weight, group: int):
    """torchao's int4 tensor (`IntxUnpackedToInt8Tensor`) of `weight` in groups of `group` input weights, each
    spanning its own min–max range: value = (q − zero point) · scale, q in −8..7, the zero point a float. The
    mapping the packed int4 kernel computes (q · scale + zero) and GGUF's Q4_1 stores (d · q + m); symmetric
    groups (torchao's default, q · scale) leave a group's unused side of the range empty. A model fine-tuned
    from a 4-bit base (a de-quantized GGUF Q4_1 model, such as the packaged SmolLM2) keeps its base weights
    exactly on this grid."""
    import torch

    with quiet_torchao():
        from torchao.quantization import IntxUnpackedToInt8Tensor
    out, width = weight.shape
    w = weight.float().reshape(out, width // group, group)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    # a group of (nearly) equal values gets a scale of a millionth of its size, so its zero point stays exact
    scale = torch.maximum((high - low) / 15, 1e-6 * torch.maximum(low.abs(), high.abs())).clamp_min(1e-12)
    zero = -low / scale - 8  # low ↦ −8, high ↦ 7
    q = (torch.round((w - low) / scale) - 8).clamp_(-8, 7).to(torch.int8).reshape(out, width)
    return IntxUnpackedToInt8Tensor(
        q, scale.reshape(out, -1), zero.reshape(out, -1), torch.int4, (1, group), weight.dtype, None
    )


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p) for p in patterns)


def _torchao_version() -> str:
    from importlib import metadata

    return metadata.version("torchao")


@contextlib.contextmanager
def quiet_torchao():
    """torchao's import prints its optional CUDA / MX extensions that fail to load on a CPU machine."""
    import logging
    import warnings

    level = logging.getLogger("torchao").level
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stderr(io.StringIO()),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.getLogger("torchao").setLevel(level)
