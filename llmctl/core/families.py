"""Model families llmctl knows, by the layout of their weights.

Everything that reshapes or adapts a model (prune, distill, LoRA targets, building from config) asks
this table, not `model_type` directly, so a family with Llama's layout (Qwen2, Qwen3, Mistral: the same
`q/k/v/o_proj`, `gate/up/down_proj` and `model.layers` names) works wherever Llama does:

| layout | model types                      | depth key           | attention                         |
|--------|----------------------------------|---------------------|-----------------------------------|
| bert   | bert                             | num_hidden_layers   | query / key / value, output.dense |
| gpt2   | gpt2                             | n_layer             | fused c_attn (Conv1D), c_proj     |
| llama  | llama, qwen2, qwen3, mistral     | num_hidden_layers   | q/k/v/o_proj, grouped key-values  |

A model of any other type is one line naming the families that are supported.
"""

from __future__ import annotations

from llmctl.core.errors import LlmctlError

LAYOUT = {"bert": "bert", "gpt2": "gpt2", "llama": "llama", "qwen2": "llama", "qwen3": "llama", "mistral": "llama"}
CONFIG_CLASS = {
    "bert": "BertConfig",
    "gpt2": "GPT2Config",
    "llama": "LlamaConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "mistral": "MistralConfig",
}
DEPTH_KEY = {"bert": "num_hidden_layers", "gpt2": "n_layer", "llama": "num_hidden_layers"}  # by layout
WIDTH_KEYS = {  # (width, heads, feed-forward width) config keys, by layout
    "bert": ("hidden_size", "num_attention_heads", "intermediate_size"),
    "gpt2": ("n_embd", "n_head", "n_inner"),
    "llama": ("hidden_size", "num_attention_heads", "intermediate_size"),
}
LORA_TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}  # by layout


def supported() -> str:
    return ", ".join(LAYOUT)


def layout(config_or_model, what: str = "llmctl") -> str:
    """The weight layout of a model or config (`bert`, `gpt2`, `llama`); one line for a family llmctl cannot reshape."""
    config = getattr(config_or_model, "config", config_or_model)
    family = getattr(config, "model_type", None)
    if family not in LAYOUT:
        raise LlmctlError(f"{what}: the {family} family is not supported (supported: {supported()})")
    return LAYOUT[family]


def depth_key(config) -> str:
    return DEPTH_KEY[layout(config)]


def transformer_layers(model):
    """The model's stack of transformer blocks (BERT encoder.layer, GPT-2 h, Llama-layout layers)."""
    import torch

    base = model.base_model
    for path in ("encoder.layer", "h", "layers", "model.layers"):
        node = base
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, torch.nn.ModuleList):
            return node
    raise LlmctlError(
        f"cannot find the transformer layers of {type(model).__name__} (supported families: {supported()})"
    )


def layers_prefix(model) -> str:
    """The state-dict prefix of the model's transformer blocks, e.g. 'bert.encoder.layer.'."""
    layers = transformer_layers(model)
    return next(name for name, module in model.named_modules() if module is layers) + "."


def max_positions(config) -> int | None:
    """The longest sequence a model config accepts (BERT/Llama max_position_embeddings, GPT-2 n_positions)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def head_shape(config) -> tuple[int, int, int]:
    """(query heads, key-value heads, head size) of a config."""
    heads = int(getattr(config, "num_attention_heads", None) or config.n_head)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    hidden = int(getattr(config, "hidden_size", None) or config.n_embd)
    return heads, kv, int(getattr(config, "head_dim", None) or hidden // heads)


def check_heads(config, names: dict | None = None) -> None:
    """Head counts a model of this config can have: the width must split into the heads (unless the config
    states its head size), and the query heads into whole key-value groups. One line naming the keys the user
    set (`names`: config key → the user's key, e.g. {"hidden_size": "student.hidden_size"}), before anything runs."""
    keys = WIDTH_KEYS[layout(config)]
    hidden, heads = getattr(config, keys[0], None), getattr(config, keys[1], None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    say = {k: (names or {}).get(k, f"model.config.{k}") for k in (*keys, "num_key_value_heads")}
    if not heads or not hidden:
        return
    explicit = getattr(config, "head_dim", None) and layout(config) == "llama"
    if not explicit and hidden % heads:
        divisors = [d for d in range(1, 65) if hidden % d == 0]
        raise LlmctlError(
            f"{say[keys[0]]}={hidden} does not split into {say[keys[1]]}={heads} heads; choose a head count that "
            f"divides {hidden} (e.g. {', '.join(map(str, divisors[-4:]))}) or a width that {heads} divides"
        )
    if heads % kv:
        raise LlmctlError(
            f"{say[keys[1]]}={heads} query heads do not split into {kv} key-value groups "
            f"({say['num_key_value_heads']}={kv}); use a multiple of {kv} heads"
        )
