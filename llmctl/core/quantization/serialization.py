"""Quantized checkpoints on disk: safetensors only (no pickle), rebuilt from the manifest's record.

torchao tensors go through torchao's own flattening (`flatten_tensor_state_dict`, the layout transformers writes),
with int4 values packed two per byte; everything else as it is. `rebuild` applies the record's transforms to a
model built from config.json (`schemes.apply`) and loads the tensors into it.

Folders written while int8-dynamic and the embedding tables ran on torch.ao's deprecated modules hold those as plain
tensors (`<module>.weight` int8 / uint8 values, `<module>.weight_scale`, `<module>.weight_zero_point`); `rebuild`
converts them, exactly, into the torchao tensors the same modules hold now (`_from_torch_ao`).
"""

from __future__ import annotations

import json
from pathlib import Path

from llmctl.core.errors import LlmctlError
from llmctl.core.files import check_safetensors
from llmctl.core.quantization import kernels
from llmctl.core.quantization.schemes import SCHEMES, apply, prepare_model, quiet_torchao

# Not model.safetensors: plain `from_pretrained` must never find these int8 / int4 values and load them as float
# weights (or leave layers at random init). It finds no weights file and fails; config.json's quantization_config
# and README.md name llmctl's loader. Folders written before this name are still read (OLD_WEIGHTS).
WEIGHTS = "llmctl-quantized.safetensors"
OLD_WEIGHTS = "model.safetensors"
LOADER = "llmctl.core.loading.load_checkpoint"
README = """# A checkpoint quantized by llmctl ({scheme})

Its weights are {what}, stored in llmctl's own layout in `{weights}` (safetensors, no pickle). Plain
`transformers` `from_pretrained` cannot read them and finds no `model.safetensors` here, so it refuses this folder
rather than load int8 / int4 values as float weights. Load it with llmctl:

    llmctl eval ckpt=<this folder>     llmctl generate ckpt=<this folder> prompt=...     llmctl serve ckpt=<this folder>

or in Python: `{loader}(Store("outputs"), "<this folder>")`. To use it elsewhere, export it: `llmctl export
ckpt=<this folder> format=onnx` (encoders) or `format=gguf` (Llama / GPT-2 causal LMs).
"""


# ---------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------
def save(model, record: dict, folder: Path, dtype: str = "float32") -> None:
    """config.json (+ generation_config.json) and model.safetensors for a quantized model; the weights left in
    floating point (the head, norms, biases) in `dtype`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    model.config.quantization_config = {  # transformers reads this, cannot apply it, and says so naming llmctl
        "quant_method": "llmctl",
        "scheme": record["scheme"],
        "weights": WEIGHTS,
        "load_with": f"{LOADER} (llmctl eval / generate / serve ckpt=<this folder>); see README.md",
    }
    try:
        model.config.save_pretrained(str(folder))
    finally:
        del model.config.quantization_config
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(str(folder))
    tensors, metadata = state_dict(model, record, dtype=dtype)
    save_file(tensors, str(folder / WEIGHTS), metadata=metadata)
    what = SCHEMES[record["scheme"]]["what"]
    (folder / "README.md").write_text(README.format(scheme=record["scheme"], what=what, weights=WEIGHTS, loader=LOADER))


def state_dict(model, record: dict, dtype: str = "float32") -> tuple[dict, dict]:
    """Plain tensors (and safetensors metadata) for everything the model holds; plain floating-point ones in `dtype`."""
    import torch

    rest, seen = {}, set()
    for key, value in model.state_dict().items():
        if type(value).__name__ == "Tensor":  # a weight tied to another is written once (the model re-ties it on load)
            if value.data_ptr() in seen:
                continue
            seen.add(value.data_ptr())
            if value.is_floating_point():
                value = value.to(getattr(torch, dtype))
        rest[key] = value.detach()
    metadata = {"format": "pt", "llmctl_quantization": record["scheme"]}
    with quiet_torchao():
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    tensors, flat_meta = flatten_tensor_state_dict(rest)
    metadata.update(flat_meta)
    if record["bits"] == 4:
        body = {f"{name}._weight_qdata" for name in record["linear"]}  # not an int8 head (head_int8)
        packed = [k for k, v in tensors.items() if k in body and v.shape[-1] % 2 == 0]
        for key in packed:
            tensors[key] = pack_int4(tensors[key])
        metadata["llmctl_int4_packed"] = json.dumps(packed)
    return {k: v.contiguous() for k, v in tensors.items()}, metadata


def rebuild(model, record: dict, folder: Path, *, where: str) -> None:
    """Load a saved quantized model into `model` (built from config.json): the record's transforms, then its tensors."""
    from safetensors import safe_open

    file = Path(folder) / WEIGHTS
    if not file.is_file() and (Path(folder) / OLD_WEIGHTS).is_file():
        file = Path(folder) / OLD_WEIGHTS  # written before the quantized weights got a name of their own
    if not file.is_file():
        raise LlmctlError(f"{where}: {WEIGHTS} is missing from {folder}")
    check_safetensors(file)
    with safe_open(str(file), "pt") as fh:
        metadata = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if metadata.get("llmctl_quantization") != record.get("scheme"):
        raise LlmctlError(
            f"{where}: {WEIGHTS} holds {metadata.get('llmctl_quantization') or 'no quantized'} weights but the "
            "manifest says "
            f"{record.get('scheme')}; the folder was changed after it was written"
        )
    prepare_model(model)
    apply(model, record)
    converted = _from_torch_ao(tensors, record)
    with quiet_torchao():
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict
    for key in json.loads(metadata.get("llmctl_int4_packed", "[]")):
        tensors[key] = unpack_int4(tensors[key])
    if "tensor_names" in metadata:  # torchao's flattening (every folder but an old int8-dynamic one)
        tensors, _ = unflatten_tensor_state_dict(tensors, metadata)
    _load_tensors(model, {**tensors, **converted}, where=where)
    kernels.pack(
        model, record
    )  # the kernels' layout is built here, from the stored values: no artifact is tied to a CPU
    model.eval()


def _from_torch_ao(tensors: dict, record: dict) -> dict:
    """{<module>.weight: torchao tensor} for the modules an older llmctl stored through torch.ao (popped from
    `tensors`): an int8-dynamic Linear (int8 values, a scale per output channel, zero points 0) and an embedding
    table (uint8 values with a float scale and zero point per row). The values are kept as they are (uint8 shifted
    by 128 with its zero point), so the converted model computes with the weights that were saved."""
    import torch

    with quiet_torchao():
        from torchao.quantization import IntxUnpackedToInt8Tensor
    out = {}
    for name in (*record["linear"], *record["embeddings"]):
        if f"{name}.weight_scale" not in tensors:
            continue
        values = tensors.pop(f"{name}.weight")
        scale = tensors.pop(f"{name}.weight_scale").float().reshape(-1, 1)
        zero = tensors.pop(f"{name}.weight_zero_point").reshape(-1, 1)
        if values.dtype == torch.uint8:
            values, zero = (values.to(torch.int16) - 128).to(torch.int8), zero.float() - 128
        out[f"{name}.weight"] = IntxUnpackedToInt8Tensor(
            values,
            scale,
            zero.to(torch.int8 if not zero.is_floating_point() else torch.float32),
            torch.int8,
            (1, values.shape[1]),
            torch.float32,
            None,
        )
    return out


def _load_tensors(model, tensors: dict, *, where: str) -> None:
    """Every parameter and persistent buffer from `tensors`: plain tensors copied in place (a tied weight is one
    tensor, loaded once), torchao tensors put in place."""
    import torch

    done, used, missing = set(), set(), []
    for name, module in model.named_modules():
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
