"""Quantized checkpoints: int8 / int4 weights saved as safetensors (no pickle), rebuilt from the manifest.

    record = quantize(model, "int8-dynamic", skip=[], keep_head=True, embeddings=True)   # in place
    save(model, record, folder)                      # config.json + model.safetensors
    rebuild(model_from_config, record, folder)       # core.loading's "quantized" format

One adapter, several kernels: each scheme goes through the path measured fastest on CPU here.
- `int8-dynamic`: `torch.ao.quantization.quantize_dynamic` — every Linear runs int8 weights (per
  output channel) × int8 activations quantized on the fly (fbgemm / x86 kernels, CPU only). torchao's
  `Int8DynamicActivationInt8WeightConfig` measured 18× slower than fp32 on an AVX2 CPU, eager or
  compiled (torchao's tracker has the CPU slowdown reported); `quantize_dynamic` 1.5× faster.
- `int8-weight` / `int4-weight`: torchao `IntxWeightOnlyConfig` (int8 per channel, int4 per group of
  `group_size` input weights), the portable layout that is saved. At load `kernels.pack` runs them with
  torch's packed kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`; bf16 activations where the
  CPU computes bf16 natively): faster than fp32 at decode. torchao's own int4 kernels (`Int4WeightOnlyConfig`)
  need CUDA or mslk; its saveable CPU int4 tensor keeps one value per byte, so llmctl packs two per byte on disk.
  `head_int8` stores a causal LM's output layer as int8 beside either.
- `qat`: torchao `QATConfig(base, step="prepare")` swaps the Linears for fake-quantized ones, the
  caller trains, `finish_qat` converts: the result is a `base` weight-only artifact like PTQ's.
- Embedding tables (`embeddings=True`, all schemes): torch.ao weight-only int8 per row
  (`float_qparams_weight_only_qconfig`, reads one row per token). torchao's embedding tensors
  dequantize the whole table on every lookup (3× slower measured on MiniLM).
- The task head (every top-level module outside the base model: `classifier`, `lm_head`, `cls`)
  and `skip` patterns stay in floating point; an embedding tied to a head kept in floating point
  stays tied and in floating point.

On disk: torch.ao modules as plain tensors (`<module>.weight` int8 / uint8 values,
`<module>.weight_scale`, `<module>.weight_zero_point`, `<module>.bias`); torchao tensors through
torchao's own flattening (`flatten_tensor_state_dict`, the layout transformers writes), int4
values packed two per byte; everything else as it is. The record names every quantized module,
so the loader applies exactly the same transforms to a model built from config.json and loads
the tensors into it.
"""

from llmctl.core.quantization.calibration import activation_outliers
from llmctl.core.quantization.schemes import (
    DEFAULT_GROUP,
    METHODS,
    QAT_BASES,
    SCHEMES,
    check,
    finish_qat,
    head_modules,
    prepare_qat,
    quantize,
    targets,
)
from llmctl.core.quantization.serialization import WEIGHTS, pack_int4, rebuild, save, state_dict, unpack_int4

__all__ = [
    "DEFAULT_GROUP",
    "METHODS",
    "QAT_BASES",
    "SCHEMES",
    "WEIGHTS",
    "activation_outliers",
    "check",
    "finish_qat",
    "head_modules",
    "pack_int4",
    "prepare_qat",
    "quantize",
    "rebuild",
    "save",
    "state_dict",
    "targets",
    "unpack_int4",
]
