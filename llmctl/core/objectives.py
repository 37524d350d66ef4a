"""Training objectives that do less work for the same loss.

`ChunkedCausalLM` wraps a causal LM so the output projection and the cross-entropy run a chunk of
positions at a time, with the gradient of each chunk's logits formed in place as soon as its loss
is known (softmax minus one-hot) and pushed straight through the projection: the [tokens × vocab]
logits are never held whole, and the log-softmax, NLL-scatter and log-softmax-backward passes over
them (a fifth of gpt-tiny's step on CPU) shrink to one log-softmax and one in-place exp. Measured
(benchmarks/clm_chunked_loss.py, 2 AVX2 cores, fp32): 1.2× per step at gpt-tiny shapes (vocab
8,000, width 128), ~1.0–1.07× at width 256–576, where the layers dominate; the memory saving grows
with the vocabulary (SmolLM2's 49k). The loss and gradients are those of
the HF model's own forward to float rounding. Liger's and Apple's cut-cross-entropy kernels do the
same on GPUs through Triton; this one is plain torch, so it runs wherever the model does.

`SparseMLM` wraps a BERT masked-LM (or MLM+NSP pre-training) model so the vocabulary projection
runs only on the masked positions (~15 % of tokens) instead of every position. With a small
encoder the output layer dominates the cost (hidden × vocab per token), so this is most of the
step time; the loss is the same cross-entropy over the same targets as the HF model's own
forward.

Both are `LossModule`s: nn.Modules (so DDP can wrap them and the forward runs through DDP's hooks)
whose forward returns the loss, holding the HF model as `.model` (what is evaluated and saved), and
trained with the one loss function `module_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
# positions per chunk; one round-robin run on CPU: 1.17× at vocab 49k (2048: 1.16×, 256: 0.96×),
# 1.27× at 8k (512: 1.32×)
CHUNK = 1024
_SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class LossModule(torch.nn.Module):
    """A model wrapper whose forward computes the training loss another way; `name` is what the manifest records."""

    name = "model"

    def __init__(self, model):
        super().__init__()
        self.model = model  # the HF model (shares its parameters)


def module_loss(model, batch) -> torch.Tensor:
    """Trainer loss_fn for a LossModule (DDP-wrapped or not): its forward is the loss."""
    return model(**batch)


class SparseMLM(LossModule):
    """BertForMaskedLM or BertForPreTraining with the vocabulary projection on masked positions only."""

    name = "sparse-mlm"

    def forward(
        self, input_ids, labels, attention_mask=None, token_type_ids=None, next_sentence_label=None
    ) -> torch.Tensor:
        encoder = self.model.base_model
        out = encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        hidden = out[0]
        picked = labels != IGNORE
        heads = self.model.cls
        predictions = heads.predictions if hasattr(heads, "seq_relationship") else heads
        logits = predictions(hidden[picked])
        loss = F.cross_entropy(logits.float(), labels[picked])
        if next_sentence_label is not None:
            nsp_logits = heads.seq_relationship(out[1])
            loss = loss + F.cross_entropy(nsp_logits.float(), next_sentence_label.view(-1))
        return loss


# ---------------------------------------------------------------------------------------------
# Causal LM: output projection + cross-entropy, chunk by chunk
# ---------------------------------------------------------------------------------------------
class _LinearCrossEntropy(torch.autograd.Function):
    """mean over targets != IGNORE of cross_entropy(hidden @ weight.T + bias, targets), chunked.

    The loss is the last node of the graph, so the gradients are formed during the forward pass
    (the backward only scales them by the incoming gradient, 1 / grad_accum). Under autocast the
    projections run in the autocast dtype and the softmax in fp32, as the HF forward does."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        grads = any(ctx.needs_input_grad[:3])  # False under no_grad (evaluation): the loss alone
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            valid = targets != IGNORE
            scale = 1.0 / max(int(valid.sum()), 1)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if grads else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads else None
            grad_b = (
                torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if grads and bias is not None else None
            )
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start : start + chunk].to(dtype)
                t, keep = targets[start : start + chunk], valid[start : start + chunk]
                logits = (h @ w.T).float()
                if bias is not None:
                    logits += bias.float()
                logp = torch.log_softmax(logits, dim=-1)
                del logits
                rows, picked = torch.arange(len(t), device=t.device), t.clamp(min=0)
                total -= (logp[rows, picked] * keep).sum()
                if not grads:
                    continue
                g = logp.exp_()  # softmax, in place
                g[rows, picked] -= 1.0
                g *= (keep * scale).unsqueeze(1)  # d(mean loss)/d(logits); ignored positions get none
                if bias is not None:
                    grad_b += g.sum(0)
                g = g.to(dtype)
                grad_h[start : start + chunk] = g @ w
                if dtype == grad_w.dtype:
                    grad_w.addmm_(g.T, h)  # in place: no [vocab × hidden] temporary per chunk
                else:
                    grad_w += (g.T @ h).float()
        if grads:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype), None if grad_b is None else grad_b.to(bias.dtype))
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None if grad_b is None else grad_b * grad_out, None, None


def linear_cross_entropy(hidden, weight, bias, targets, *, chunk: int | None = None) -> torch.Tensor:
    """Cross-entropy of `hidden` [N, d] projected by `weight` [V, d] (+ `bias`) against `targets` [N]
    (IGNORE = no target), without holding the [N, V] logits; `chunk` positions at a time."""
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, int(chunk or CHUNK))


def chunked_loss_supported(model) -> bool:
    """Whether the model's logits are exactly its output layer applied to the base model's last
    hidden state (GPT-2, Llama and most decoder families; not those that scale or soft-cap logits)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (
        isinstance(head, torch.nn.Linear)
        and getattr(model, "base_model", None) is not None
        and model.base_model is not model
        and not any(getattr(model.config, key, None) not in (None, 1, 1.0) for key in _SCALED_LOGITS)
    )


class ChunkedCausalLM(LossModule):
    """A causal LM whose training loss is `linear_cross_entropy` over its last hidden states: the
    same next-token loss as `model(input_ids, labels=labels).loss` (labels shifted by one inside),
    with the logits never materialised."""

    name = "chunked"

    def __init__(self, model, chunk: int | None = None):
        super().__init__(model)
        self.chunk = chunk

    def forward(self, input_ids, labels, attention_mask=None) -> torch.Tensor:
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]
        head = self.model.get_output_embeddings()
        targets = F.pad(
            labels[:, 1:], (0, 1), value=IGNORE
        )  # position i predicts token i + 1; the last predicts nothing
        return linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, targets.reshape(-1), chunk=self.chunk
        )
