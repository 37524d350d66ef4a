"""Quantized checkpoints: int8 / int4 weights saved as safetensors (no pickle), rebuilt from the manifest.

    record = quantize(model, "int8-dynamic", skip=[], keep_head=True, embeddings=True)   # in place
    save(model, record, folder)                      # config.json + model.safetensors
    rebuild(model_from_config, record, folder)       # core.loading's "quantized" format

One adapter, several kernels: each scheme goes through the path measured fastest on CPU here.
- `int8-dynamic`: `torch.ao.quantization.quantize_dynamic` — every Linear runs int8 weights (per
  output channel) × int8 activations quantized on the fly (fbgemm / x86 kernels, CPU only). torchao's
  `Int8DynamicActivationInt8WeightConfig` measured 18× slower than fp32 on an AVX2 CPU, eager or
  compiled (torchao's tracker has the CPU slowdown reported); `quantize_dynamic` 1.5× faster.
- `int8-weight` / `int4-weight`: torchao `IntxWeightOnlyConfig` (int8 per channel, int4 per group of
  `group_size` input weights), dequantized inside the matmul: smaller on disk, not faster on CPU.
  torchao's int4 kernels (`Int4WeightOnlyConfig`) need CUDA (tile-packed, tinygemm) or mslk; its
  saveable CPU int4 tensor keeps one value per byte, so llmctl packs two per byte on disk.
- `qat`: torchao `QATConfig(base, step="prepare")` swaps the Linears for fake-quantized ones, the
  caller trains, `finish_qat` converts: the result is a `base` weight-only artifact like PTQ's.
- Embedding tables (`embeddings=True`, all schemes): torch.ao weight-only int8 per row
  (`float_qparams_weight_only_qconfig`, reads one row per token). torchao's embedding tensors
  dequantize the whole table on every lookup (3× slower measured on MiniLM).
- The task head (every top-level module outside the base model: `classifier`, `lm_head`, `cls`)
  and `skip` patterns stay in floating point; an embedding tied to a head kept in floating point
  stays tied and in floating point.

On disk: torch.ao modules as plain tensors (`<module>.weight` int8 / uint8 values,
`<module>.weight_scale`, `<module>.weight_zero_point`, `<module>.bias`); torchao tensors through
torchao's own flattening (`flatten_tensor_state_dict`, the layout transformers writes), int4
values packed two per byte; everything else as it is. The record names every quantized module,
so the loader applies exactly the same transforms to a model built from config.json and loads
the tensors into it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
from pathlib import Path

from llmctl.core.errors import LlmctlError

WEIGHTS = "model.safetensors"
# scheme → how its Linear weights are stored (the methods the stage offers are these plus qat)
SCHEMES = {
    "int8-dynamic": {
        "backend": "torch.ao",
        "bits": 8,
        "what": "int8 weights per channel × dynamic int8 activations",
        "devices": ("cpu",),
    },
    "int8-weight": {
        "backend": "torchao",
        "bits": 8,
        "what": "int8 weights per channel, dequantized in the matmul",
        "devices": ("cpu", "cuda"),
    },
    "int4-weight": {
        "backend": "torchao",
        "bits": 4,
        "what": "int4 weights per group, dequantized in the matmul",
        "devices": ("cpu", "cuda"),
    },
}
METHODS = (*SCHEMES, "qat")
QAT_BASES = ("int4-weight", "int8-weight")  # torchao QATConfig supports IntxWeightOnlyConfig bases (not int8 dynamic)
DEFAULT_GROUP = {"int4-weight": 32, "int8-weight": None}  # None = one scale per output channel


def check(method: str, *, device, group_size: int | None, base: str | None = None) -> str:
    """The scheme a method stores, or one line for an unsupported combination (before anything loads)."""
    if method not in METHODS:
        raise LlmctlError(f"method={method}: not a quantization method; choose one of {', '.join(METHODS)}")
    scheme = method
    if method == "qat":
        if base not in QAT_BASES:
            raise LlmctlError(
                f"method.base={base}: QAT trains toward {' or '.join(QAT_BASES)} (torchao's QAT has no int8-dynamic base); "
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
                "quantize.group_size: int8-dynamic scales each output channel (fbgemm has no groups); "
                "leave quantize.group_size=null or choose method=int4-weight"
            )
        if group_size < 2 or group_size & (group_size - 1):
            raise LlmctlError(f"quantize.group_size={group_size}: use a power of two such as 32, 64 or 128")
    return scheme


def targets(model, *, skip: list[str], keep_head: bool, embeddings: bool, group_size: int | None = None) -> dict:
    """Which modules a scheme quantizes: {"linear": [...], "embeddings": [...], "kept": [...]}.
    Linears and embeddings outside the head and `skip`; Linears whose input width `group_size`
    does not divide stay in floating point too (named in "kept")."""
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
            width = module.in_features if isinstance(module, torch.nn.Linear) else module.weight.shape[0]
            (too_narrow if group_size and width % group_size else linear).append(name)
        elif isinstance(module, torch.nn.Embedding) and embeddings:
            tied = out is not None and getattr(out, "weight", None) is module.weight
            if not (tied and keep_head):
                tables.append(name)
    if not linear:
        raise LlmctlError(
            f"nothing to quantize: {type(model).__name__} has no Linear layer outside the kept modules ({', '.join(kept) or 'none'})"
        )
    return {"linear": linear, "embeddings": tables, "kept": kept + too_narrow}


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
) -> dict:
    """Quantize `model` in place (floating point → `scheme`); returns the record the manifest keeps.
    `outliers` (from `activation_outliers`): Linears whose inputs are too peaked for int8 activations, kept in floating point."""
    record = _plan(
        model,
        scheme,
        method or scheme,
        group_size=group_size,
        skip=skip,
        keep_head=keep_head,
        embeddings=embeddings,
        outliers=outliers,
    )
    apply(model, record)
    record["torchao"] = _torchao_version() if SCHEMES[scheme]["backend"] == "torchao" else None
    return record


def _plan(model, scheme: str, method: str, *, group_size, skip, keep_head, embeddings, outliers=None) -> dict:
    """Prepare the model (fp32, Linears) and write down what `scheme` will do to it."""
    prepare_model(model)
    group = group_size if group_size is not None else DEFAULT_GROUP.get(scheme)
    chosen = targets(model, skip=skip, keep_head=keep_head, embeddings=embeddings, group_size=group)
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


def activation_outliers(model, batches, names: list[str], *, ratio: float) -> dict[str, float]:
    """Linears (of `names`) whose input, on calibration `batches`, peaks above `ratio` × its root mean square:
    int8 dynamic activations (one scale per tensor, 7-bit on x86) would round their typical values to a
    level or two. SmolLM2's `mlp.down_proj` inputs reach 330× (int8-dynamic: perplexity 1.60 → 2.71;
    with those layers in fp32: 1.64); BERT's stay under 90×. {name: peak ratio} of the layers above `ratio`."""
    import torch

    peaks: dict[str, float] = {}
    wanted = set(names)

    def hook(name):
        def record(module, args):
            x = args[0].detach().float()
            peaks[name] = max(peaks.get(name, 0.0), float(x.abs().max() / x.pow(2).mean().sqrt().clamp_min(1e-12)))

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if n in wanted]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.inference_mode():
            for batch in batches:
                model(**{k: v.to(device) for k, v in batch.items() if k != "labels" and torch.is_tensor(v)})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: peak for name, peak in peaks.items() if peak > ratio}


def prepare_model(model) -> None:
    """fp32 everywhere (the int8 kernels take fp32 activations) and GPT-2's Conv1D as Linear."""
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


def apply(model, record: dict, *, qat: str | None = None) -> None:
    """The record's transforms on a prepared model (quantize, and the loader on a fresh one).
    `qat="prepare"` fake-quantizes the Linears instead (training toward the scheme); no embeddings yet."""
    linear = set(record["linear"])
    if record["scheme"] == "int8-dynamic":
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        quantize_dynamic(model, dict.fromkeys(linear, per_channel_dynamic_qconfig), inplace=True)
    else:
        _torchao_quantize(model, record, linear, step=qat)
    if record["embeddings"] and qat != "prepare":
        from torch.ao.quantization import float_qparams_weight_only_qconfig, quantize_dynamic

        quantize_dynamic(model, dict.fromkeys(record["embeddings"], float_qparams_weight_only_qconfig), inplace=True)
    for module in model.modules():
        if packed_weight(module) is not None:
            module.register_forward_pre_hook(_kernel_inputs)


def _kernel_inputs(module, args):
    """torch.ao kernels take fp32 activations (a bf16 / fp16 autocast elsewhere must not reach them) and contiguous
    indices (BERT passes its token-type ids as an expanded view)."""
    import torch

    return tuple((a.float() if a.is_floating_point() else a).contiguous() if torch.is_tensor(a) else a for a in args)


def prepare_qat(
    model, scheme: str, *, group_size: int | None, skip: list[str], keep_head: bool, embeddings: bool
) -> dict:
    """Fake-quantize the Linears toward `scheme` for training; returns the record `finish_qat` completes."""
    record = _plan(model, scheme, "qat", group_size=group_size, skip=skip, keep_head=keep_head, embeddings=embeddings)
    apply(model, record, qat="prepare")
    return record


def finish_qat(model, record: dict) -> dict:
    """Convert a trained fake-quantized model to its scheme (the same tensors PTQ writes)."""
    model.float()
    apply(model, record, qat="convert")
    return {**record, "torchao": _torchao_version()}


def _torchao_quantize(model, record: dict, names: set[str], step: str | None) -> None:
    import torch

    with _quiet():
        from torchao.quantization import IntxWeightOnlyConfig, PerAxis, PerGroup, quantize_
        from torchao.quantization.qat import QATConfig
    group = record.get("group_size")
    config = IntxWeightOnlyConfig(
        weight_dtype=torch.int4 if record["bits"] == 4 else torch.int8,
        granularity=PerGroup(int(group)) if group else PerAxis(0),
    )
    if step is not None:
        config = QATConfig(config, step=step)
    quantize_(model, config, filter_fn=lambda module, fqn: fqn in names)


# ---------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------
def save(model, record: dict, folder: Path) -> None:
    """config.json (+ generation_config.json) and model.safetensors for a quantized model."""
    from safetensors.torch import save_file

    folder = Path(folder)
    model.config.save_pretrained(str(folder))
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(str(folder))
    tensors, metadata = state_dict(model, record)
    save_file(tensors, str(folder / WEIGHTS), metadata=metadata)


def state_dict(model, record: dict) -> tuple[dict, dict]:
    """Plain tensors (and safetensors metadata) for everything the model holds."""
    tensors, owned = {}, []
    for name, module in model.named_modules():
        weight = packed_weight(module)
        if weight is None:
            continue
        owned.append(name + ".")
        tensors[f"{name}.weight"] = weight.int_repr()
        tensors[f"{name}.weight_scale"] = weight.q_per_channel_scales()
        tensors[f"{name}.weight_zero_point"] = weight.q_per_channel_zero_points()
        bias = module.bias() if callable(getattr(module, "bias", None)) else None
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach()
    rest, seen = {}, set()
    for key, value in model.state_dict().items():
        if key.startswith(tuple(owned)):
            continue
        if type(value).__name__ == "Tensor":  # a weight tied to another is written once (the model re-ties it on load)
            if value.data_ptr() in seen:
                continue
            seen.add(value.data_ptr())
        rest[key] = value.detach()
    metadata = {"format": "pt", "llmctl_quantization": record["scheme"]}
    if SCHEMES[record["scheme"]]["backend"] == "torchao":
        with _quiet():
            from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
        rest, flat_meta = flatten_tensor_state_dict(rest)
        metadata.update(flat_meta)
        if record["bits"] == 4:
            packed = [k for k, v in rest.items() if k.endswith("_weight_qdata") and v.shape[-1] % 2 == 0]
            for key in packed:
                rest[key] = pack_int4(rest[key])
            metadata["llmctl_int4_packed"] = json.dumps(packed)
    tensors.update(rest)
    return {k: v.contiguous() for k, v in tensors.items()}, metadata


def rebuild(model, record: dict, folder: Path, *, where: str) -> None:
    """Load a saved quantized model into `model` (built from config.json): the record's transforms, then its tensors."""
    import torch
    from safetensors import safe_open

    from llmctl.core.models import check_safetensors

    file = Path(folder) / WEIGHTS
    if not file.is_file():
        raise LlmctlError(f"{where}: {WEIGHTS} is missing from {folder}")
    check_safetensors(file)
    with safe_open(str(file), "pt") as fh:
        metadata = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh}
    if metadata.get("llmctl_quantization") != record.get("scheme"):
        raise LlmctlError(
            f"{where}: {WEIGHTS} holds {metadata.get('llmctl_quantization') or 'no quantized'} weights but the manifest says "
            f"{record.get('scheme')}; the folder was changed after it was written"
        )
    prepare_model(model)
    apply(model, record)
    owned = []
    for name, module in model.named_modules():  # torch.ao modules: int values + scales → a quantized tensor
        if packed_weight(module) is None:
            continue
        owned.append(name + ".")
        try:
            values, scale, zero = (tensors.pop(f"{name}.{k}") for k in ("weight", "weight_scale", "weight_zero_point"))
        except KeyError:
            raise LlmctlError(f"{where}: {WEIGHTS} lacks the quantized weight of {name}") from None
        weight = torch._make_per_channel_quantized_tensor(values, scale, zero, 0)
        if hasattr(module, "set_weight_bias"):
            module.set_weight_bias(weight, tensors.pop(f"{name}.bias", None))
        else:
            module.set_weight(weight)
    if SCHEMES[record["scheme"]]["backend"] == "torchao":
        with _quiet():
            from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict
        for key in json.loads(metadata.get("llmctl_int4_packed", "[]")):
            tensors[key] = unpack_int4(tensors[key])
        tensors, _ = unflatten_tensor_state_dict(tensors, metadata)
    _load_tensors(model, tensors, skip=tuple(owned), where=where)
    model.eval()


def _load_tensors(model, tensors: dict, *, skip: tuple[str, ...], where: str) -> None:
    """Every parameter and persistent buffer outside the torch.ao modules (`skip` prefixes) from `tensors`:
    plain tensors copied in place (a tied weight is one tensor, loaded once), torchao tensors put in place."""
    import torch

    done, used, missing = set(), set(), []
    for name, module in model.named_modules():
        if name and (name + ".").startswith(skip):
            continue
        entries = [
            *module._parameters.items(),
            *((k, b) for k, b in module._buffers.items() if k not in module._non_persistent_buffers_set),
        ]
        for key, tensor in entries:
            if tensor is None or id(tensor) in done:
                continue
            full = f"{name}.{key}" if name else key
            if full not in tensors:
                missing.append(full)
                continue
            value = tensors[full]
            used.add(full)
            done.add(id(tensor))
            if tuple(value.shape) != tuple(tensor.shape):
                raise LlmctlError(
                    f"{where}: {full} is {tuple(value.shape)} in {WEIGHTS} but the model has {tuple(tensor.shape)}"
                )
            if hasattr(value, "tensor_data_names") != hasattr(tensor, "tensor_data_names"):
                raise LlmctlError(
                    f"{where}: {full} is {'quantized' if hasattr(value, 'tensor_data_names') else 'floating point'} in "
                    f"{WEIGHTS} but not in the recorded quantization"
                )
            if hasattr(value, "tensor_data_names"):  # a torchao quantized tensor takes the parameter's place
                module._parameters[key] = torch.nn.Parameter(value, requires_grad=False)
                continue
            with torch.no_grad():
                tensor.copy_(value)
    unexpected = sorted(set(tensors) - used)
    if missing or unexpected:
        what = (
            f"{len(missing)} tensors missing (e.g. {missing[0]})"
            if missing
            else f"unexpected tensors (e.g. {unexpected[0]})"
        )
        raise LlmctlError(f"{where}: {WEIGHTS} does not fit the recorded quantization: {what}")


def pack_int4(values):
    """int4 values held one per int8 byte (−8..7) → two per uint8 byte (low nibble first), half the last dim."""
    import torch

    v = (values.to(torch.int16) & 0xF).to(torch.uint8)
    return v[..., 0::2] | (v[..., 1::2] << 4)


def unpack_int4(packed):
    import torch

    low, high = (packed & 0xF).to(torch.int8), (packed >> 4).to(torch.int8)
    out = torch.stack([low, high], dim=-1).flatten(-2)
    return torch.where(out >= 8, out - 16, out).to(torch.int8)


# ---------------------------------------------------------------------------------------------
# What a quantized model holds (parameter counts and memory: core.models, core.evaluation)
# ---------------------------------------------------------------------------------------------
def packed_weight(module):
    """The quantized weight of a torch.ao module (dynamic Linear, weight-only Embedding), None for any other module."""
    if not hasattr(module, "_packed_params"):
        return None
    weight = getattr(module, "weight", None)
    return weight() if callable(weight) else None


def tensor_bytes(model) -> int:
    """Bytes the model's weights take in memory: torch.ao packed weights and torchao tensors at their real width."""
    total, seen = 0, set()
    for module in model.modules():
        weight = packed_weight(module)
        if weight is not None:
            total += weight.numel() * weight.element_size()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        inner = getattr(tensor, "tensor_data_names", None)  # a torchao tensor: the sum of the tensors it holds
        if inner:
            total += sum(
                getattr(tensor, n).numel() * getattr(tensor, n).element_size()
                for n in inner
                if getattr(tensor, n, None) is not None
            )
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p) for p in patterns)


def _torchao_version() -> str:
    from importlib import metadata

    return metadata.version("torchao")


@contextlib.contextmanager
def _quiet():
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
