"""Quantized checkpoints: int8 / int4 weights saved as safetensors (no pickle), rebuilt from the manifest.

    record = quantize(model, "int8-dynamic", skip=[], keep_head=True, embeddings=True)   # in place
    save(model, record, folder)                      # config.json + llmctl-quantized.safetensors
    rebuild(model_from_config, record, folder)       # core.loading's "quantized" format

One adapter, several kernels: each scheme goes through the path measured fastest on CPU here.
- `int8-dynamic`: every Linear stores int8 weights per output channel (torchao's `IntxWeightOnlyConfig`, the
  int8-weight layout) and runs them against its input quantized to int8 per token on the fly, through
  `aten._int_mm` (`kernels.DynamicInt8Linear`, CPU only): on MiniLM 1.8× fp32, ~0.93× torch.ao's deprecated
  `quantize_dynamic`, which it replaces (old folders are converted at load). torchao's
  `Int8DynamicActivationInt8WeightConfig` measured 1.04× fp32 eager here (18× slower on an AVX2 CPU); it
  matches only under torch.compile, after ~33 s of compiling.
- `int8-weight` / `int4-weight`: torchao `IntxWeightOnlyConfig` (int8 per channel, int4 per group of
  `group_size` input weights), the portable layout that is saved. At load `kernels.pack` runs them with
  torch's packed kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`; bf16 activations where the
  CPU computes bf16 natively): faster than fp32 at decode. torchao's own int4 kernels (`Int4WeightOnlyConfig`)
  need CUDA or mslk; its saveable CPU int4 tensor keeps one value per byte, so llmctl packs two per byte on disk.
  `head_int8` stores a causal LM's output layer as int8 beside either.
- `qat`: torchao `QATConfig(base, step="prepare")` swaps the Linears for fake-quantized ones, the
  caller trains, `finish_qat` converts: the result is a `base` weight-only artifact like PTQ's.
- Embedding tables (`embeddings=True`, all schemes): int8 per row in torchao's tensor, looked up row by row
  (`kernels.Int8Embedding`); torchao's own lookup dequantizes the whole table every time.
- The task head (every top-level module outside the base model: `classifier`, `lm_head`, `cls`)
  and `skip` patterns stay in floating point; an embedding tied to a head kept in floating point
  stays tied and in floating point.

On disk: torchao tensors through torchao's own flattening (`flatten_tensor_state_dict`, the layout transformers
writes), int4 values packed two per byte; everything else as it is (folders from torch.ao's days are converted).
The record names every quantized module, so the loader applies exactly the same transforms to a model built from
config.json and loads the tensors into it.
"""

from llmctl.core.quantization.calibration import activation_outliers, input_rms
from llmctl.core.quantization.kernels import place
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
    "input_rms",
    "pack_int4",
    "place",
    "prepare_qat",
    "quantize",
    "rebuild",
    "save",
    "state_dict",
    "targets",
    "unpack_int4",
]
