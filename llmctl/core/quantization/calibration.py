"""Calibration: what a few batches of the checkpoint's own data say about its activations."""

from __future__ import annotations


def activation_outliers(model, batches, names: list[str], *, ratio: float) -> dict[str, float]:
    """Linears (of `names`) whose input, on calibration `batches`, peaks above `ratio` × its root mean square:
    int8 dynamic activations (one scale per tensor, 7-bit on x86) would round their typical values to a
    level or two. SmolLM2's `mlp.down_proj` inputs reach 330× (int8-dynamic: perplexity 1.60 → 2.71;
    with those layers in fp32: 1.64); BERT's stay under 90×. {name: peak ratio} of the layers above `ratio`."""
    peaks: dict[str, float] = {}
    wanted = set(names)

    def hook(name):
        def record(module, args):
            x = args[0].detach().float()
            peaks[name] = max(peaks.get(name, 0.0), float(x.abs().max() / x.pow(2).mean().sqrt().clamp_min(1e-12)))

        return record

    _run(model, batches, {n: hook(n) for n in wanted})
    return {name: peak for name, peak in peaks.items() if peak > ratio}


def input_rms(model, batches, names: list[str]) -> dict:
    """{name: root mean square of each input channel of the Linear} on calibration `batches` (padding included):
    how much each input weight matters, for weighing a layer's rounding error (core.quantization.lowrank)."""
    sums: dict = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    _run(model, batches, {n: hook(n) for n in names})
    return {name: (total / counts[name]).sqrt() for name, total in sums.items()}


def _run(model, batches, hooks: dict) -> None:
    """Forward `batches` through `model` (eval mode, no gradients) with a pre-hook on each module named in `hooks`."""
    import torch

    handles = [m.register_forward_pre_hook(hooks[n]) for n, m in model.named_modules() if n in hooks]
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
