"""Artifacts that leave llmctl: ONNX for encoders (`onnx`), GGUF for Llama-layout and GPT-2 causal LMs (`gguf`).

Each export is a version like any other (`export/<name>/vNNN`), its manifest's artifact record naming the format,
so llmctl's loader reads it back: an ONNX export is judged by `eval` through ONNX Runtime (`onnx.OnnxModel`), a
GGUF file by transformers' own GGUF reader.
"""

FORMATS = ("onnx", "gguf")
