"""Building models from config and loading checkpoints, behind one function per direction.

Artifact kinds name what a checkpoint is, so a stage can refuse the wrong input up front:
`mlm` (BERT masked-LM), `pretraining` (BERT MLM+NSP heads), `causal-lm`, `seq-cls`, `token-cls`.
Loading is safetensors-only, with `trust_remote_code` off; nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path

from llmctl.core.errors import LlmctlError

KIND_CLASS = {
    "mlm": "AutoModelForMaskedLM",
    "pretraining": "AutoModelForPreTraining",
    "causal-lm": "AutoModelForCausalLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "token-cls": "AutoModelForTokenClassification",
}
FAMILY_CONFIG = {"bert": "BertConfig", "gpt2": "GPT2Config", "llama": "LlamaConfig"}


def build_model(family: str, arch: dict, kind: str, tokenizer, **extra):
    """A freshly initialised model of `family` with `arch` shapes, sized to the tokenizer."""
    import transformers

    if family not in FAMILY_CONFIG:
        raise LlmctlError(f"model.family={family!r} is not one of {', '.join(FAMILY_CONFIG)}")
    config_cls = getattr(transformers, FAMILY_CONFIG[family])
    special = {f"{k}_id": getattr(tokenizer, f"{k}_id") for k in ("pad_token", "bos_token", "eos_token") if getattr(tokenizer, f"{k}_id", None) is not None}
    try:
        config = config_cls(vocab_size=len(tokenizer), **special, **dict(arch), **extra)
    except (TypeError, ValueError) as e:
        raise LlmctlError(f"model.config: {e}") from None
    return getattr(transformers, KIND_CLASS[kind]).from_config(config)


def load_model(folder: Path, kind: str, **kwargs):
    """Load an HF folder as `kind` (the head is created when the folder lacks it)."""
    import transformers

    if not any(Path(folder).glob("*.safetensors")):
        raise LlmctlError(f"{folder} has no .safetensors weights; llmctl loads only safetensors (never pickled .bin files)")
    cls = getattr(transformers, KIND_CLASS[kind])
    try:
        return cls.from_pretrained(str(folder), use_safetensors=True, trust_remote_code=False, **kwargs)
    except ValueError as e:
        raise LlmctlError(f"cannot load {folder} as {kind}: {str(e).splitlines()[0][:200]}") from None


def family_of(config) -> str:
    model_type = getattr(config, "model_type", "")
    return {"bert": "bert", "gpt2": "gpt2", "llama": "llama"}.get(model_type, model_type)


def count_parameters(model) -> tuple[int, int]:
    """(all, trainable) parameter counts; tied weights counted once."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable
