"""One way in for every checkpoint: a reference → model, tokenizer and task, driven by the manifest.

    loaded = load_checkpoint(store, "finetune/bbc@best", kind="seq-cls")
    loaded.model, loaded.tokenizer, loaded.task      # the task record: re-run its task and evaluation
    run.parents.append(loaded.parent("init"))        # lineage, with the weights' sha256 as verified

A reference is anything `Store.resolve` takes (`stage/name[@vN|@latest|@best]`, an HF folder) or
`packaged:<name>` (a registry-installed model). The weights of an llmctl checkpoint are checked
against the sha256 its manifest recorded (one clear line when a file was changed or damaged).
The manifest's `artifact` record says how the weights are stored: `{"format": "hf"}` (a plain
transformers folder), `pruned` (per-layer shapes) and `quantized` (core.quantization) have their own
rebuilders in `FORMATS`, so every stage loads them through this same function. Checkpoints
without an artifact record (plain HF folders, older manifests) are plain HF.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmctl.core import quantization
from llmctl.core.errors import LlmctlError
from llmctl.core.export import gguf as gguf_export
from llmctl.core.export.onnx import OnnxModel
from llmctl.core.files import check_safetensors, require_safetensors
from llmctl.core.manifest import artifact as artifact_of
from llmctl.core.manifest import check_intact, task_record
from llmctl.core.models import KIND_CLASS, folder_kind, load_model, resolve_model, stored_dtype
from llmctl.core.pruning import apply_shapes, shapes_record
from llmctl.core.store import Resolved, parent_entry, verify_weights
from llmctl.core.tokenizer import load_tokenizer


@dataclass
class Loaded:
    model: object
    tokenizer: object
    source: Resolved
    kind: str  # the kind the model was loaded as (its head)
    task: dict | None  # the checkpoint's task record (core.manifest.task_record), None for plain HF folders
    artifact: dict  # how the weights are stored: {"format": "hf", ...}
    sha256: str | None  # the weights' hash as read and verified
    dtype: str = "float32"  # the floating-point dtype its weights are stored in (in memory they are fp32)
    new_tensors: list[str] = field(default_factory=list)  # base-model tensors initialised fresh (not in the checkpoint)

    def on(self, device):
        """The model on `device`, refused in one line where its quantized kernels do not run there; a quantized
        model's kernels are built again for that device (`quantization.place`)."""
        check_device(self, device)
        quantization.place(self.model, device)
        return self.model

    def parent(self, role: str) -> dict:
        """This checkpoint as a manifest's parent entry (reference, path, verified weights hash)."""
        return {**parent_entry(self.source, role, self.sha256), "dtype": self.dtype}


def artifact_record(model, quantization: dict | None = None) -> dict:
    """What a manifest records about how a model's weights are stored, for `load_checkpoint`: plain HF,
    per-layer shapes config.json cannot say (pruned BERT heads: core.pruning), and `quantization`
    (core.quantization's record; read the shapes off the model before quantizing it)."""
    record = {**(shapes_record(model) or {"format": "hf"}), "class": type(model).__name__}
    return {**record, "format": "quantized", "quantization": quantization} if quantization else record


def check_device(loaded: Loaded, device) -> None:
    """A quantized checkpoint whose kernels do not run on `device` is one line (eval, generate)."""
    record = (loaded.artifact or {}).get("quantization")
    scheme = record.get("scheme") if isinstance(record, dict) else None
    devices = quantization.SCHEMES.get(scheme, {}).get("devices")
    if devices and getattr(device, "type", str(device)) not in devices:
        raise LlmctlError(
            f"{loaded.source.ref} is quantized {scheme}, whose kernels run on {' / '.join(devices)}; set device=cpu"
        )


def _load_hf(resolved: Resolved, kind: str, head: dict | None, artifact: dict):
    return load_model(resolved.path, kind, head=head)


def _from_config(resolved: Resolved, kind: str, head: dict | None, artifact: dict, what: str):
    """The model a rebuilt format starts from: config.json, with the recorded per-layer shapes (no weights yet).
    Such a checkpoint keeps its own head and its own kind."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(resolved.path))
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # llmctl's own marker (quantized folders): the artifact record says the rest
    if head and head.get("id2label") != {int(k): v for k, v in config.id2label.items()}:
        raise LlmctlError(
            f"{resolved.ref}: a {what} checkpoint keeps its own head; give it data with its labels "
            f"({', '.join(config.id2label.values())})"
        )
    if kind != resolved.kind:
        raise LlmctlError(
            f"{resolved.ref} is a {what} {resolved.kind} checkpoint; it loads only as {resolved.kind}, not {kind}"
        )
    model = getattr(transformers, KIND_CLASS[kind]).from_config(config, dtype=torch.float32)  # the dtype rule
    apply_shapes(model, artifact.get("attention_heads"), artifact.get("head_dim"))
    return model


def _load_pruned(resolved: Resolved, kind: str, head: dict | None, artifact: dict):
    """Build the model from config.json, give its layers the recorded shapes, then load the weights (strict)."""
    from safetensors.torch import load_file

    model = _from_config(resolved, kind, head, artifact, "pruned")
    state = {}
    for file in sorted(resolved.path.glob("*.safetensors")):
        check_safetensors(file)
        state.update(load_file(str(file)))
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise LlmctlError(
            f"{resolved.ref}: its weights do not fit the recorded shapes ({str(e).splitlines()[1].strip()[:160]})"
        ) from None
    missing = [k for k in model.state_dict() if k not in state and not _tied(model, k)]
    if missing:
        raise LlmctlError(f"{resolved.ref}: {len(missing)} tensors missing from its weights (e.g. {missing[0]})")
    return model.eval(), []


def _load_quantized(resolved: Resolved, kind: str, head: dict | None, artifact: dict):
    """Build the model from config.json (with any pruned shapes), apply the recorded quantization, load its tensors."""
    model = _from_config(resolved, kind, head, artifact, "quantized")
    quantization.rebuild(model, artifact.get("quantization") or {}, resolved.path, where=resolved.ref)
    return model, []


def _tied(model, key: str) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (
        out is not None
        and key.endswith("weight")
        and key.startswith(("lm_head", "cls.predictions.decoder"))
        and out.weight is model.get_input_embeddings().weight
    )


def _load_onnx(resolved: Resolved, kind: str, head: dict | None, artifact: dict):
    """An ONNX export, run by ONNX Runtime behind the interface of the model it came from (it keeps its head)."""
    if kind != resolved.kind or head:
        raise LlmctlError(f"{resolved.ref} is an ONNX export of a {resolved.kind}; it runs as it is (no other head)")
    return OnnxModel(resolved.path, kind), []


def _load_gguf(resolved: Resolved, kind: str, head: dict | None, artifact: dict):
    """A GGUF export, read back by transformers' GGUF reader (dequantized into fp32)."""
    if kind != "causal-lm" or head:
        raise LlmctlError(f"{resolved.ref} is a GGUF export of a causal LM; it loads only as one")
    return gguf_export.load(resolved.path, artifact["file"]), []


# format name → (resolved, kind, head, artifact record) → (model, new tensors)
FORMATS = {"hf": _load_hf, "pruned": _load_pruned, "quantized": _load_quantized, "onnx": _load_onnx, "gguf": _load_gguf}
EXPORT_FORMATS = ("onnx", "gguf")


def resolve_source(store, spec, *, what: str) -> Resolved:
    """A store reference, an HF folder or `packaged:<name>` → where it is (nothing loaded yet); a checkpoint whose
    manifest is damaged, or a folder without safetensors weights, is refused here, in one line, before any
    stage builds on it."""
    resolved = spec if isinstance(spec, Resolved) else resolve_model(store, str(spec), what=what)
    check_intact(resolved.manifest, resolved.ref, what)
    if artifact_of(resolved.manifest).get("format") in EXPORT_FORMATS:
        return resolved  # an export: its own files (ONNX, GGUF), read by its format's loader
    if not any(resolved.path.glob("*.safetensors")):  # before anything reads its config (a .bin-only folder)
        require_safetensors(resolved.path, what)
    return resolved


def source_kind(resolved: Resolved) -> str:
    """A checkpoint's artifact kind: its manifest's, else read from its config.json."""
    return resolved.kind or folder_kind(resolved.path)


def load_checkpoint(
    store, spec, *, kind: str | None = None, head: dict | None = None, what: str = "init_from"
) -> Loaded:
    """Load a checkpoint as `kind` (default: its own), with a fresh task `head` when given."""
    resolved = resolve_source(store, spec, what=what)
    check_intact(resolved.manifest, resolved.ref, what)
    sha = verify_weights(resolved, what=what)
    artifact = artifact_of(resolved.manifest)
    loader = FORMATS.get(artifact.get("format"))
    if loader is None:
        raise LlmctlError(
            f"{what} {resolved.ref}: weights stored as {artifact.get('format')!r}, which this llmctl cannot load "
            f"(it knows {', '.join(FORMATS)}); upgrade llmctl"
        )
    kind = kind or source_kind(resolved)
    model, new = loader(resolved, kind, head, artifact)
    return Loaded(
        model=model,
        tokenizer=load_tokenizer(resolved.path),
        source=resolved,
        kind=kind,
        task=task_record(resolved.manifest),
        artifact=artifact,
        sha256=sha,
        dtype=artifact.get("dtype") or stored_dtype(resolved.path),
        new_tensors=new,
    )


def require_float_weights(resolved: Resolved, *, what: str, stage: str) -> None:
    """Stages that train, reshape, quantize or export weights need llmctl's floating-point weights: a quantized
    checkpoint (its artifact record names a `quantization`) or an export (ONNX, GGUF) is refused in one line."""
    artifact = (resolved.manifest or {}).get("artifact") or {}
    parent = next((p.get("ref") for p in (resolved.manifest or {}).get("parents") or []), None)
    if artifact.get("format") in EXPORT_FORMATS:
        raise LlmctlError(
            f"{what}={resolved.ref} is a {artifact['format'].upper()} export; llmctl {stage} needs the checkpoint it "
            f"was exported from{f': {what}={parent}' if parent else ''}"
        )
    quantization = artifact.get("quantization")
    if quantization:
        method = quantization.get("method", "quantized") if isinstance(quantization, dict) else quantization
        fix = (
            f"quantize its parent{f' {parent}' if parent else ''} instead"
            if stage == "quantize"
            else f"{stage} its parent{f' {parent}' if parent else ''} and quantize afterwards"
        )
        raise LlmctlError(
            f"{what}={resolved.ref} is quantized ({method}); llmctl {stage} needs floating-point weights: {fix}"
        )
