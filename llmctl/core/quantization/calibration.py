"""Calibration: what a few batches of the checkpoint's own data say about its activations."""

from __future__ import annotations


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
