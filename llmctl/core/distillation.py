"""Knowledge distillation: a student built from (or beside) a frozen teacher, and the loss that trains it.

    student, kept = student_from_teacher(teacher, num_layers=3)            # every 2nd layer of a 6-layer teacher
    loss_fn = DistillLoss(teacher, alpha=0.5, temperature=2.0)             # for core.finetuning.finetune(loss_fn=...)

The loss is α · KL(softmax(z_t / T) ‖ softmax(z_s / T)) · T² + (1 − α) · CE(hard labels)
(+ hidden_weight · MSE or 1 − cosine between hidden states, through a learned projection when the
widths differ). It is token-level for causal LMs (next-token logits) and token classification;
log-softmax runs in fp32, positions labelled -100 are masked out, and a batch with nothing left
gives 0, not NaN. Each term is reported to the training loop's log. A sequence classifier's
teacher logits can be computed once for the whole training split (`cache_teacher_logits`) instead
of once per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmctl.core.errors import LlmctlError
from llmctl.core.families import (
    WIDTH_KEYS,
    check_heads,
    depth_key,
    head_shape,
    layers_prefix,
    layout,
    transformer_layers,
)
from llmctl.core.pruning import apply_shapes, layer_heads

USER_KEYS = ("student.hidden_size", "student.num_heads", "student.intermediate_size")  # as WIDTH_KEYS, in config

TEACHER_LOGITS = "teacher_logits"  # the column holding cached teacher logits in a training split


# ---------------------------------------------------------------------------------------------
# The student
# ---------------------------------------------------------------------------------------------
def evenly_spaced(total: int, keep: int) -> list[int]:
    """DistilBERT's choice generalised: every (total / keep)-th layer, from the first (6 → 3: 0, 2, 4)."""
    return [int(i * total / keep) for i in range(keep)]


def student_config(teacher_config, *, num_layers: int | None, width: dict | None = None):
    """The teacher's config with fewer layers (and optionally another width): same family, vocabulary, head."""
    family = layout(teacher_config, "distill")
    config = teacher_config.__class__.from_dict(teacher_config.to_dict())
    depth = int(getattr(teacher_config, depth_key(teacher_config)))
    n = int(num_layers) if num_layers else max(1, depth // 2)
    if not 1 <= n <= depth:
        raise LlmctlError(f"student.num_layers={num_layers}: the teacher has {depth} layers; choose 1..{depth}")
    setattr(config, depth_key(config), n)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in evenly_spaced(depth, n)]
    given = {k: int(v) for k, v in (width or {}).items() if v is not None}
    for key, value in given.items():
        setattr(config, key, value)
    rederive = family == "llama" and {"hidden_size", "num_attention_heads"} & set(given)
    if rederive:
        config.head_dim = None  # a new width or head count: the head size follows from them
    names = {k: USER_KEYS[i] for i, k in enumerate(WIDTH_KEYS[family])}
    check_heads(config, {**names, "num_key_value_heads": "the teacher's num_key_value_heads"})  # before any work
    if rederive:
        config.head_dim = config.hidden_size // config.num_attention_heads
    return config


def student_from_teacher(
    teacher, *, num_layers: int | None, init: str = "teacher-layers", width: dict | None = None, seed: int = 0
):
    """A smaller model of the teacher's family: its layers copied from every k-th teacher layer (embeddings,
    final norm and head copied too), or `init="random"` (fresh weights, same config). A copied layer keeps the
    teacher layer's shapes (a head-pruned BERT teacher's per-layer head counts). Returns (student, kept layer ids)."""
    family = layout(teacher, "distill")
    config = student_config(teacher.config, num_layers=num_layers, width=width)
    changed = [k for k in WIDTH_KEYS.get(family, ()) if getattr(config, k, None) != getattr(teacher.config, k, None)]
    if init == "teacher-layers" and changed:
        raise LlmctlError(
            f"student.init=teacher-layers copies the teacher's layers, so {changed[0]} must stay "
            f"{getattr(teacher.config, changed[0])}; use student.init=random for another width"
        )
    torch.manual_seed(seed)
    student = type(teacher)(config)
    depth = len(transformer_layers(teacher))
    kept = evenly_spaced(depth, getattr(config, depth_key(config)))
    if init == "random":
        return student, []
    if init != "teacher-layers":
        raise LlmctlError(f"student.init={init!r} is not one of teacher-layers, random")
    if family == "bert":
        heads = layer_heads(teacher)
        apply_shapes(student, [heads[i] for i in kept], head_shape(teacher.config)[2])
    prefix, weights = layers_prefix(teacher), teacher.state_dict()
    state = {}
    for key in student.state_dict():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            key_in_teacher = f"{prefix}{kept[int(index)]}.{rest}"
        else:
            key_in_teacher = key
        state[key] = weights[key_in_teacher]
    student.load_state_dict(state, strict=True)
    return student, kept


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------
def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """KL(softmax(z_t/T) ‖ softmax(z_s/T)) · T², summed over classes, averaged over the positions `mask`
    keeps (all when None); in fp32; 0 when nothing is kept."""
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_position = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    if mask is None:
        return per_position.mean() * t * t
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp(min=1.0) * t * t


class DistillLoss:
    """`loss_fn(student, batch)` for the shared training loop; see the module docstring.

    `kind` is the artifact kind (seq-cls, token-cls, causal-lm). `projection` maps the student's
    hidden states to the teacher's width for the hidden-state loss (train it with the student)."""

    def __init__(
        self,
        teacher,
        *,
        kind: str,
        alpha: float,
        temperature: float,
        hidden_weight: float = 0.0,
        hidden_loss: str = "mse",
        projection=None,
    ):
        if not 0.0 <= float(alpha) <= 1.0:
            raise LlmctlError(f"distill.alpha={alpha}: must be in [0, 1] (the weight of the teacher's soft targets)")
        self.teacher, self.kind, self.alpha, self.t = teacher, kind, float(alpha), float(temperature)
        self.hidden_weight, self.hidden_loss, self.projection = float(hidden_weight), hidden_loss, projection

    def __call__(self, model, batch: dict):
        cached = batch.pop(TEACHER_LOGITS, None)
        hidden = self.hidden_weight > 0
        out = model(**batch, output_hidden_states=hidden)
        teacher_out = None
        if self.alpha == 0 and not hidden:  # hard labels only: the same run without the teacher (a baseline)
            ce = out.loss if out.loss is not None and torch.isfinite(out.loss) else out.logits.sum() * 0
            return ce, {"loss/ce": ce.detach()}
        if cached is None or hidden:
            with torch.no_grad():
                teacher_out = self.teacher(
                    **{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=hidden
                )
        teacher_logits = cached if cached is not None else teacher_out.logits
        labels = batch.get("labels")
        if self.kind == "causal-lm":  # next-token logits: position i predicts token i + 1
            s, t = out.logits[:, :-1], teacher_logits[:, :-1]
            mask = labels[:, 1:] != -100 if labels is not None else None
        elif self.kind == "token-cls":
            s, t, mask = out.logits, teacher_logits, labels != -100
        else:
            s, t, mask = out.logits, teacher_logits, None
        kd = kd_loss(s, t, mask, self.t)
        ce = out.loss if out.loss is not None else torch.zeros((), device=kd.device)
        if not torch.isfinite(ce):  # HF's mean over zero labelled positions
            ce = torch.zeros((), device=kd.device)
        loss = self.alpha * kd + (1.0 - self.alpha) * ce
        terms = {"loss/kd": kd.detach(), "loss/ce": ce.detach()}
        if hidden:
            h = self._hidden(out.hidden_states, teacher_out.hidden_states, batch.get("attention_mask"))
            loss = loss + self.hidden_weight * h
            terms["loss/hidden"] = h.detach()
        return loss, terms

    def _hidden(self, student_states, teacher_states, attention_mask) -> torch.Tensor:
        """The embeddings, and each student layer's output against the teacher's output at the same depth
        share (TinyBERT's uniform map: student layer j of n ↔ teacher layer (j + 1) · L / n)."""
        n, depth = len(student_states) - 1, len(teacher_states) - 1
        pairs = [(student_states[0], teacher_states[0])] + [
            (student_states[j + 1], teacher_states[(j + 1) * depth // n]) for j in range(n)
        ]
        mask = attention_mask.unsqueeze(-1).float() if attention_mask is not None else None
        total = torch.zeros((), device=student_states[0].device)
        for s, t in pairs:
            s = self.projection(s) if self.projection is not None else s
            s, t = s.float(), t.float()
            if self.hidden_loss == "cosine":
                per = 1.0 - F.cosine_similarity(s, t, dim=-1).unsqueeze(-1)
            else:
                per = (s - t).pow(2).mean(-1, keepdim=True)
            total = total + ((per * mask).sum() / mask.sum().clamp(min=1.0) if mask is not None else per.mean())
        return total / len(pairs)


# ---------------------------------------------------------------------------------------------
# Teacher logits cached once for a sequence classifier's training split
# ---------------------------------------------------------------------------------------------
def cache_teacher_logits(teacher, dataset, collate, *, batch_size: int, device, autocast):
    """The training split with a `teacher_logits` column (one row of class logits per example)."""
    from torch.utils.data import DataLoader

    rows = []
    teacher.eval()
    with torch.inference_mode(), autocast():
        for batch in DataLoader(dataset, batch_size=int(batch_size), collate_fn=collate):
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            rows.extend(teacher(**inputs).logits.float().cpu().tolist())
    return dataset.add_column(TEACHER_LOGITS, rows)
