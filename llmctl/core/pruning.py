"""Pruning that reloads: unstructured magnitude, structured heads + FFN neurons, whole layers.

    masks = magnitude(model, amount=0.5, scope="global")     # torch.nn.utils.prune masks, kept during recovery
    finalize_magnitude(model)                                 # permanent: no *_orig / *_mask left
    model, artifact, report = structured(model, heads=0.25, ffn=0.3, importance="magnitude")
    model, artifact = drop_layers(model, keep=[0, 2, 4])

Structured cuts are uniform across layers, so the config can say what the weights hold:
- FFN neurons: `intermediate_size` (BERT, Llama) / `n_inner` (GPT-2) → plain `from_pretrained` reloads it.
- Llama heads go in whole key-value groups: `num_attention_heads` and `num_key_value_heads` are
  rewritten, `head_dim` stays explicit → plain `from_pretrained` reloads it.
- BERT heads: transformers 5 derives the head size from `hidden_size / num_attention_heads` and has
  no `prune_heads`, so fewer heads at the same width cannot be written in config.json. The kept
  head count per layer goes into the manifest's artifact record (`{"format": "pruned",
  "attention_heads": [...]}`) and `core.loading` rebuilds those layers before loading the weights
  (`apply_shapes`). Plain `from_pretrained` refuses such a folder with a size mismatch.
Every structural cut builds a fresh model from the new config and loads the cut state dict into it
(strict), so no attribute of the old shapes survives.
"""

from __future__ import annotations

import math

import torch

from llmctl.core.errors import LlmctlError
from llmctl.core.families import depth_key, head_shape, layers_prefix, layout, transformer_layers


# ---------------------------------------------------------------------------------------------
# Unstructured: magnitude
# ---------------------------------------------------------------------------------------------
def prunable_linears(model) -> list[tuple[str, torch.nn.Module]]:
    """The weight matrices of the transformer layers (embeddings, classifier head and lm_head stay dense)."""
    layers = transformer_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return [
        (name, m)
        for name, m in model.named_modules()
        if name.startswith(prefix + ".") and (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")
    ]


def magnitude(model, *, amount: float, scope: str = "global") -> None:
    """Zero the `amount` smallest |w| (L1), over all layers together or per weight matrix; as masks
    (torch.nn.utils.prune), so a recovery fine-tune keeps the zeros. `finalize_magnitude` makes it permanent."""
    from torch.nn.utils import prune

    params = [(m, "weight") for _, m in prunable_linears(model)]
    if scope == "global":
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=float(amount))
    elif scope == "layer":
        for m, name in params:
            prune.l1_unstructured(m, name, amount=float(amount))
    else:
        raise LlmctlError(f"prune.scope={scope!r} is not one of global, layer")


def finalize_magnitude(model) -> dict:
    """Fold the masks into the weights (no *_orig / *_mask left); returns the real sparsity per matrix."""
    from torch.nn.utils import prune

    sparsity = {}
    for name, m in prunable_linears(model):
        if prune.is_pruned(m):
            prune.remove(m, "weight")
        sparsity[name] = float((m.weight == 0).float().mean())
    return sparsity


# ---------------------------------------------------------------------------------------------
# Structured: heads and FFN neurons
# ---------------------------------------------------------------------------------------------
def _ffn(layer, family: str) -> list[tuple[torch.nn.Module, int]]:
    """(module, dim of its weight along which the FFN neurons lie) for one layer."""
    if family == "bert":
        return [(layer.intermediate.dense, 0), (layer.output.dense, 1)]
    if family == "llama":
        return [(layer.mlp.gate_proj, 0), (layer.mlp.up_proj, 0), (layer.mlp.down_proj, 1)]
    return [(layer.mlp.c_fc, 1), (layer.mlp.c_proj, 0)]  # GPT-2 Conv1D stores (in, out)


def _attention(layer, family: str) -> tuple[list, list, list]:
    """(query-side modules, key/value modules, output modules) with the weight dim of their heads."""
    if family == "bert":
        a = layer.attention
        return [(a.self.query, 0)], [(a.self.key, 0), (a.self.value, 0)], [(a.output.dense, 1)]
    if family == "llama":
        a = layer.self_attn
        return [(a.q_proj, 0)], [(a.k_proj, 0), (a.v_proj, 0)], [(a.o_proj, 1)]
    raise LlmctlError(
        "method=structured: GPT-2 ties each head's size to n_embd / n_head, so its heads cannot be cut "
        "in a form that reloads; use prune.heads=0 (FFN only) or method=layers"
    )


def _unit_scores(module, dim: int, unit: int, scores: dict | None) -> torch.Tensor:
    """Importance of each block of `unit` outputs / inputs of a module along weight dim `dim` (with its
    bias when the cut is on its outputs): L1 magnitude, or the Taylor scores of `taylor_scores`."""

    def score(p):
        return scores.get(id(p), torch.zeros_like(p)) if scores is not None else p.detach().abs()

    per = score(module.weight).sum(1 - dim)
    if _bias_on_cut(module, dim) and getattr(module, "bias", None) is not None:
        per = per + score(module.bias)
    return per.reshape(-1, unit).sum(1)


def _bias_on_cut(module, dim: int) -> bool:
    """Whether cutting weight dim `dim` cuts the bias too (the outputs: rows of a Linear, columns of a GPT-2 Conv1D)."""
    return dim == 1 if type(module).__name__ == "Conv1D" else dim == 0


def _count(share_or_count, total: int, what: str, unit: int = 1) -> int:
    """How many of a layer's `total` units (of `unit` heads each: a key-value group; or single FFN neurons) to
    remove, from a share in [0, 1) or a whole number of heads / neurons (a multiple of `unit`). A cut that rounds
    to nothing, removes everything or splits a group is one line saying what can be cut."""
    value = float(share_or_count)
    things = f"{total * unit} {what}" + (f" in {total} key-value groups of {unit}" if unit > 1 else "")
    smallest = (
        f"the smallest cut is prune.{what}={1 / total:.3g} or prune.{what}={unit} "
        f"({'one group of ' if unit > 1 else ''}{unit} {what if unit > 1 else what.rstrip('s') + ' neuron'})"
    )
    if value < 0:
        raise LlmctlError(f"prune.{what}={value:g}: must be a share in [0, 1) or a whole number")
    if value >= 1:
        if value != int(value) or int(value) % unit:
            raise LlmctlError(
                f"prune.{what}={value:g}: the {things} go in whole key-value groups, so remove a multiple of "
                f"{unit} {what}; {smallest}"
            )
        n = int(value) // unit
    else:
        n = int(round(value * total))
        if n == 0:
            raise LlmctlError(
                f"prune.{what}={value:g} rounds to removing nothing: a layer has {things}; {smallest}, "
                f"or prune.{what}=0 to keep them all"
            )
    if n >= total:
        raise LlmctlError(f"prune.{what}={value:g} removes all {total * unit} {what} of a layer; remove fewer")
    return n


def structured(model, *, heads, ffn, importance: str = "magnitude", scores: dict | None = None):
    """Remove the least important heads and FFN neurons, the same number in every layer.

    `heads` / `ffn`: a share in [0, 1) or a whole number. `scores` (`taylor_scores`) makes the importance
    first-order Taylor instead of L1 magnitude. Returns (new model, report)."""
    family = layout(model, "method=structured")
    if importance == "taylor" and scores is None:
        raise LlmctlError("prune.importance=taylor needs Taylor scores from calibration batches")
    if not float(heads or 0) and not float(ffn or 0):
        raise LlmctlError(
            "method=structured: prune.heads and prune.ffn are both 0, so nothing would be cut; "
            "set amount=, prune.heads= or prune.ffn= above 0"
        )
    layers = transformer_layers(model)
    n_heads, n_kv, d = head_shape(model.config)
    group = n_heads // n_kv
    current_heads = layer_heads(model)
    if len(set(current_heads)) > 1:
        raise LlmctlError(
            "method=structured: this checkpoint's layers already have different head counts; prune it with "
            "method=layers or start from its parent"
        )
    n_heads = current_heads[0]
    cut_heads = _count(heads or 0, n_heads // group, "heads", group) if float(heads or 0) > 0 else 0
    hidden = int(getattr(model.config, "hidden_size", 0) or 0)
    left = n_heads - cut_heads * group
    if family == "llama" and cut_heads and hidden % left:
        raise LlmctlError(
            f"prune.heads={heads}: {left} heads would be left, and transformers' LlamaConfig needs hidden_size "
            f"({hidden}) to be a multiple of the head count; choose a cut that leaves a divisor of {hidden}"
        )
    ffn_modules = _ffn(layers[0], family)
    width = ffn_modules[0][0].weight.shape[ffn_modules[0][1]]
    cut_ffn = _count(ffn or 0, width, "ffn") if float(ffn or 0) > 0 else 0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    kept_heads = []
    for layer in layers:
        if cut_ffn:
            score = sum(_unit_scores(m, dim, 1, scores) for m, dim in _ffn(layer, family))
            keep = score.topk(width - cut_ffn).indices.sort().values
            for m, dim in _ffn(layer, family):
                _select(state, names, m, dim, keep)
        if cut_heads:
            q, kv, out = _attention(layer, family)
            per_q = sum(_unit_scores(m, dim, d, scores) for m, dim in q + out)  # one score per query head
            per_kv = sum(_unit_scores(m, dim, d, scores) for m, dim in kv)  # one per key-value head
            groups = (
                per_q.reshape(-1, group).sum(1) + per_kv
            )  # a key-value head and the query heads that read it go together
            keep_groups = groups.topk(len(groups) - cut_heads).indices.sort().values
            q_units = torch.cat([torch.arange(g * group, (g + 1) * group) for g in keep_groups.tolist()])
            kv_units = keep_groups if family == "llama" else q_units
            for m, dim in q + out:
                _select(state, names, m, dim, _expand(q_units, d))
            for m, dim in kv:
                _select(state, names, m, dim, _expand(kv_units, d))
            kept_heads.append(len(q_units))
        else:
            kept_heads.append(n_heads)
    config = model.config.__class__.from_dict(model.config.to_dict())
    if cut_ffn:
        setattr(config, "n_inner" if family == "gpt2" else "intermediate_size", width - cut_ffn)
    if family == "llama" and cut_heads:
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = (
            kept_heads[0],
            kept_heads[0] // group,
            d,
        )
    report = {
        "heads": {"before": n_heads, "after": kept_heads[0], "removed_share": 1 - kept_heads[0] / n_heads},
        "ffn": {"before": width, "after": width - cut_ffn, "removed_share": cut_ffn / width},
    }
    return rebuild(model, config, state, kept_heads if family == "bert" else None), report


def _expand(units: torch.Tensor, size: int) -> torch.Tensor:
    """Unit indices → the rows / columns they cover (`size` each)."""
    return (units.unsqueeze(1) * size + torch.arange(size)).reshape(-1)


def _select(state: dict, names: dict, module, dim: int, keep: torch.Tensor) -> None:
    """Keep only `keep` along `dim` of a module's weight (and its bias when the cut is on its outputs)."""
    key = names[id(module.weight)]
    state[key] = state[key].index_select(dim, keep)
    if _bias_on_cut(module, dim) and getattr(module, "bias", None) is not None:
        bkey = names[id(module.bias)]
        state[bkey] = state[bkey].index_select(0, keep)


# ---------------------------------------------------------------------------------------------
# Whole layers
# ---------------------------------------------------------------------------------------------
def drop_layers(model, *, keep: list[int]):
    """Keep only the layers `keep` (in order); returns the new model."""
    family = layout(model, "method=layers")
    depth = len(transformer_layers(model))
    keep = [int(i) for i in keep]
    if not keep or sorted(set(keep)) != keep or keep[0] < 0 or keep[-1] >= depth:
        raise LlmctlError(f"prune.keep_layers={keep}: give increasing layer indices in 0..{depth - 1}, e.g. [0,2,4]")
    if len(keep) == depth:
        raise LlmctlError(f"prune.keep_layers={keep} keeps all {depth} layers; drop at least one")
    prefix = layers_prefix(model)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            if int(index) in keep:
                state[f"{prefix}{keep.index(int(index))}.{rest}"] = value
        else:
            state[key] = value
    config = model.config.__class__.from_dict(model.config.to_dict())
    setattr(config, depth_key(config), len(keep))
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    heads = layer_heads(model)
    return rebuild(model, config, state, [heads[i] for i in keep] if family == "bert" else None)


# ---------------------------------------------------------------------------------------------
# Rebuilding a model of the new shapes (here, and in core.loading for the "pruned" format)
# ---------------------------------------------------------------------------------------------
def layer_heads(model) -> list[int]:
    """The attention heads of each layer (BERT layers can differ from config.json after pruning)."""
    n_heads = head_shape(model.config)[0]
    return [
        int(
            getattr(getattr(getattr(layer, "attention", None), "self", None), "num_attention_heads", n_heads) or n_heads
        )
        for layer in transformer_layers(model)
    ]


def shapes_record(model) -> dict | None:
    """The artifact record of per-layer shapes config.json cannot say (BERT heads), None when it can."""
    if layout(model) != "bert":
        return None
    heads = layer_heads(model)
    if all(h == model.config.num_attention_heads for h in heads):
        return None
    return {"format": "pruned", "attention_heads": heads, "head_dim": head_shape(model.config)[2]}


def apply_shapes(model, heads: list[int] | None, head_dim: int | None = None) -> None:
    """Give each BERT layer `heads[i]` attention heads (fresh q / k / v / output modules of those shapes)."""
    if not heads:
        return
    layers = transformer_layers(model)
    if len(heads) != len(layers):
        raise LlmctlError(
            f"the artifact record names {len(heads)} layers' heads but the model has {len(layers)} layers"
        )
    d = int(head_dim or head_shape(model.config)[2])
    for layer, k in zip(layers, heads):
        att = layer.attention.self
        if att.num_attention_heads == k:
            continue
        hidden = att.query.in_features
        att.num_attention_heads, att.all_head_size = int(k), int(k) * d
        att.query, att.key, att.value = (torch.nn.Linear(hidden, k * d) for _ in range(3))
        layer.attention.output.dense = torch.nn.Linear(k * d, hidden)


def rebuild(model, config, state: dict, heads: list[int] | None = None):
    """A fresh model of `model`'s class from `config` (BERT layers given `heads` each), holding `state`."""
    new = type(model)(config)
    apply_shapes(new, heads)
    new.load_state_dict(state, strict=True)
    return new.to(next(model.parameters()).device)


def taylor_scores(model, batches, device) -> dict:
    """First-order Taylor importance of every weight, {id(param): Σ_batches |w ⊙ ∂loss_b/∂w|}: the loss change
    removing it would cause, scored per calibration batch and accumulated (gradients summed first would cancel
    where batches pull a weight opposite ways), in eval mode (dropout off: the model as it will be used)."""
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    scores = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in params}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    scores[id(p)] += (p.detach().float() * p.grad.float()).abs()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return scores


def keep_evenly(depth: int, keep: int) -> list[int]:
    """`keep` layers spread over `depth` (the first and the last always kept)."""
    if not 1 <= keep < depth:
        raise LlmctlError(f"prune.num_layers={keep}: keep between 1 and {depth - 1} of the {depth} layers")
    if keep == 1:
        return [0]
    return sorted({int(round(i * (depth - 1) / (keep - 1))) for i in range(keep)})


def parameter_share(before: int, after: int) -> float:
    return 1.0 - after / before if before else math.nan
