"""Encoders to ONNX through transformers' own exporter, and an ONNX Runtime model llmctl judges like any other.

    record = export_onnx(model, tokenizer, folder, int8=False)   # model.onnx (+ .data), config.json, export.json
    model = OnnxModel(folder, kind)                               # model(**batch).logits / .loss, on ONNX Runtime

`transformers.exporters.OnnxExporter` (transformers 5.23; marked experimental) traces the model with
`torch.onnx.export(dynamo=True)` and dynamic batch and sequence axes (traced at batch 2 × 16 tokens: torch.export
specialises sizes 0 and 1); `int8=True` quantizes the exported graph with ONNX Runtime's dynamic int8
(`OnnxRuntimeQuantizer(OnnxRuntimeDynamicConfig())`, which also drops the initializers' stale value_info that
breaks quantize_dynamic on dynamo graphs). An int8-dynamic checkpoint is exported from its float parent and
quantized here, into ONNX Runtime's own int8 operators.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from llmctl.core.errors import LlmctlError
from llmctl.core.manifest import read_manifest

ENCODER_KINDS = ("seq-cls", "token-cls", "mlm", "encoder")
FILES = ("model.onnx", "model.onnx.data", "export.json", "config.json")
TRACE_BATCH, TRACE_SEQ = 2, 16  # not 0 or 1: torch.export would specialise them


def sample_inputs(model, tokenizer, batch: int = TRACE_BATCH, seq: int = TRACE_SEQ) -> dict:
    """Inputs to trace with: ids above the special tokens, a full attention mask, segment ids where it has them."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, int(model.config.vocab_size), (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "token_type_ids" in getattr(tokenizer, "model_input_names", []):
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints its progress and ONNX Runtime's quantizer logs a pre-processing hint: llmctl reports itself."""
    loggers = [logging.getLogger(name) for name in ("", "torch.onnx", "torch.onnx._internal.exporter._registration")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx(model, tokenizer, folder: Path, *, int8: bool, opset: int | None = None) -> dict:
    """Write `model` as ONNX into `folder`; returns what the artifact record keeps (files, opset, quantization)."""
    try:
        from transformers.exporters import OnnxConfig, OnnxExporter, OnnxRuntimeDynamicConfig, OnnxRuntimeQuantizer
    except ImportError as e:
        raise LlmctlError(f"format=onnx needs the export extra: pip install 'llmctl[export]' ({e})") from None
    # int8: per output channel, as llmctl's own int8-dynamic scales its weights: on MiniLM / BBC News it keeps every
    # prediction and max |Δlogit| 0.27 where ONNX Runtime's per-tensor default moved one in 213 and 1.58, at the
    # same latency
    quantizer = OnnxRuntimeQuantizer(OnnxRuntimeDynamicConfig(per_channel=True)) if int8 else None
    config = OnnxConfig(dynamic=True, opset_version=opset, quantizer=quantizer)
    model = model.float().eval()
    inputs = sample_inputs(model, tokenizer)
    try:
        with _quiet(), torch.inference_mode(False), torch.no_grad():
            exported = OnnxExporter().export(model, inputs, config)
            exported.save_pretrained(folder)
    except LlmctlError:
        raise
    except Exception as e:  # a graph torch.export cannot take: one line, whatever the exporter raised
        raise LlmctlError(
            f"format=onnx: exporting {type(model).__name__} failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); export its parent, or report the model"
        ) from None
    import onnx

    proto = onnx.load(str(Path(folder) / "model.onnx"), load_external_data=False)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "files": sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("model.onnx")),
        "opset": opset_used,
        "inputs": sorted(inputs),
        "trace_shape": [TRACE_BATCH, TRACE_SEQ],
        "int8": "onnxruntime quantize_dynamic (QInt8 weights per channel, activations at run time)" if int8 else None,
        "exporter": "transformers.exporters.OnnxExporter (torch.onnx dynamo)",
    }


class OnnxModel(torch.nn.Module):
    """An exported encoder run by ONNX Runtime, called like the transformers model it came from: `model(**batch)`
    gives `.logits`, and `.loss` (the head's cross-entropy, -100 ignored) when the batch has labels. It holds no torch
    weights; it says how many parameters and bytes its graph holds (`stored_parameters`, `weight_bytes`: the
    protocol core.models and core.evaluation.cost read for models that keep their weights outside torch)."""

    def __init__(self, folder: Path, kind: str, record: dict | None = None):
        super().__init__()
        from transformers import AutoConfig
        from transformers.exporters import ExportedModel

        self.folder, self.kind = Path(folder), kind
        with _quiet():
            self.exported = ExportedModel.from_pretrained(str(folder))
        self.config = AutoConfig.from_pretrained(str(folder))
        self.traced = set(self.exported.runners["model"].metadata.kwargs)
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)  # where outputs go (the CPU)
        export = record or (read_manifest(self.folder) or {}).get("export") or {}  # (record: not published yet)
        self._counts = tuple(export.get("parameters") or (0, 0))
        self.own_precision = "fp32 with int8 MatMuls" if export.get("int8") else "fp32"  # whatever precision= says

    def forward(self, labels=None, **inputs):
        ids = inputs["input_ids"]
        if "token_type_ids" in self.traced and "token_type_ids" not in inputs:
            inputs["token_type_ids"] = torch.zeros_like(ids)
        if "attention_mask" in self.traced and "attention_mask" not in inputs:
            inputs["attention_mask"] = torch.ones_like(ids)
        feed = {k: v.detach().cpu().to(torch.int64) for k, v in inputs.items() if k in self.traced}
        logits = self.exported(**feed).logits.float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device), ignore_index=-100
            )
        return SimpleNamespace(logits=logits, loss=loss)

    def stored_parameters(self) -> tuple[int, int]:
        """(all, non-embedding) parameters of the model it was exported from (recorded when exporting)."""
        return self._counts

    def weight_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("model.onnx*"))


def max_logit_gap(reference, exported, prepared, split: str) -> float:
    """The largest |logit difference| between two models over every batch of `split` (real lengths, padded per
    batch: shapes the export was not traced at)."""
    from torch.utils.data import DataLoader

    gap = 0.0
    with torch.inference_mode():
        for batch in DataLoader(
            prepared.scored(split, capped=False), batch_size=prepared.batch_size, collate_fn=prepared.collate
        ):
            batch = {k: v for k, v in batch.items() if k != "labels"}
            a = reference(**batch).logits.float()
            b = exported(**batch).logits.float()
            gap = max(gap, float((a - b).abs().max()))
    return gap
