"""Causal LMs to GGUF (llama.cpp, Ollama) through the `gguf` package's writer, and back through transformers' reader.

    record = export_gguf(model, tokenizer, folder, "q8_0")      # model-q8_0.gguf: weights, config, tokenizer
    model = load(folder, record["file"])                         # transformers' GGUF reader, dequantized to fp32

Layouts: Llama (and Mistral, as llama.cpp does) with its q / k weights permuted the way llama.cpp's converter does
(transformers' reader undoes it), Qwen2 (biases, no permute), GPT-2 (Conv1D weights transposed to (out, in)).
Types: f32, f16, bf16, q8_0, q4_0 and q4_1 for 2-D weights whose rows split into 32-value blocks (others stay f16);
norms and other 1-D tensors stay f32. An int4-weight checkpoint in groups of 32 maps onto 4-bit blocks as they are,
with no second rounding: min–max groups (value = (q − zero) · scale, q in −8..7, llmctl's default) onto Q4_1 (d =
scale, m = −(zero + 8) · scale, stored q + 8), symmetric ones (value = q · scale) onto Q4_0 (d = scale) or Q4_1. A
layer that carries a low-rank error correction (quantize.error_rank) has no 4-bit block that holds it: it is written
Q8_0 from the float weights. The tokenizer (byte-level BPE: tokens, merges, token types), its special token ids and
chat template go into the metadata.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch

from llmctl.core.errors import LlmctlError
from llmctl.core.families import head_shape, max_positions

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
INT4 = ("q4_0", "q4_1")  # the 4-bit block types an int4-weight checkpoint's own groups map onto
BLOCK = 32  # the values in a Q8_0 / Q4_0 / Q4_1 block
ARCHITECTURES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "gpt2": "GPT2"}  # model_type → gguf arch


def family_of(folder: Path) -> str | None:
    return json.loads((Path(folder) / "config.json").read_text()).get("model_type")


def choose_type(requested: str, quantization) -> str:
    """auto: from an int4-weight checkpoint its own blocks (q4_1 for min–max groups, q4_0 for symmetric ones),
    f16 otherwise."""
    if requested != "auto":
        return requested
    q = quantization if isinstance(quantization, dict) else {}
    if q.get("scheme") != "int4-weight":
        return "f16"
    return "q4_1" if q.get("zero_point") else "q4_0"


def export_gguf(model, tokenizer, folder: Path, gtype: str, *, int4_model=None) -> dict:
    """Write `model` (floating point) as `model-<gtype>.gguf` in `folder`. With `int4_model` (the same model loaded
    from an int4-weight checkpoint) and q4_0 / q4_1, its Linear weights' own int4 values, scales (and zero points)
    become the blocks instead of rounding `model`'s weights again. Returns what the artifact record keeps."""
    import gguf

    family = model.config.model_type
    if family not in ARCHITECTURES:
        raise LlmctlError(f"format=gguf: no GGUF layout for the {family} family (it writes {', '.join(ARCHITECTURES)})")
    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[family])
    name = f"model-{gtype}.gguf"
    int4_values = _int4_blocks(int4_model, gtype) if gtype in INT4 and int4_model is not None else {}
    logging.getLogger("gguf").setLevel(logging.ERROR)  # the writer logs each file it writes; llmctl reports itself
    writer = gguf.GGUFWriter(str(Path(folder) / name), gguf.MODEL_ARCH_NAMES[arch])
    _write_config(writer, model, family, gtype)
    _write_tokenizer(writer, tokenizer)
    names = gguf.get_tensor_name_map(arch, len(_layers(model)))
    written, from_int4 = 0, 0
    for key, tensor in _tensors(model, family):
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise LlmctlError(
                f"format=gguf: no GGUF name for {key} ({family}); the family's layout is not one it writes"
            )
        if key in int4_values:  # the checkpoint's own blocks, laid out as the float tensor is
            raw, qtype = int4_values[key]
            if ARCHITECTURES[family] == "LLAMA" and key.endswith(("q_proj.weight", "k_proj.weight")):
                heads, kv, _ = head_shape(model.config)
                raw = _permute(torch.from_numpy(raw), heads, heads if "q_proj" in key else kv).numpy()
            from_int4 += 1
        else:
            raw, qtype = _encode(tensor.detach().float().cpu().numpy(), _type_of(target, gtype, int4_model), target)
        writer.add_tensor(target, raw, raw_dtype=qtype)
        written += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model.config.save_pretrained(str(folder))  # llmctl reads the export back with it (see `load`)
    return {
        "file": name,
        "type": gtype,
        "gguf_version": int(gguf.GGUF_VERSION),
        "architecture": gguf.MODEL_ARCH_NAMES[arch],
        "tensors": written,
        "tensors_from_int4": from_int4,
    }


def load(folder: Path, file: str):
    """The GGUF file read back by transformers (every tensor dequantized to fp32), as a causal LM. The export's
    config.json is given too: transformers' GGUF reader maps GPT-2's context length to a key GPT2Config no longer
    reads, and would build 1024 positions whatever the file holds."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder)) if (Path(folder) / "config.json").is_file() else None
    extra = {"config": config} if config is not None else {}
    with contextlib.redirect_stderr(io.StringIO()):  # its de-quantizing progress bar
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=file, dtype=torch.float32, **extra).eval()
    model.cost_note = (  # read by core.evaluation.cost: the figures measure this model, not llama.cpp
        "a GGUF file run by transformers after de-quantizing it to fp32: its latency and memory are torch's on "
        "fp32 weights, not llama.cpp's; its size is the file's"
    )
    return model


# ---------------------------------------------------------------------------------------------
def _layers(model):
    from llmctl.core.families import transformer_layers

    return transformer_layers(model)


def _tensors(model, family: str):
    """(HF name, tensor) in the layout GGUF stores: Llama q / k permuted for llama.cpp's rotary layout, GPT-2's
    Conv1D weights as (out, in); tied output embeddings written once (GPT-2: as output.weight too, as llama.cpp)."""
    heads, kv, _ = head_shape(model.config)
    state = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False)
    for key, tensor in state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue
        if key == "lm_head.weight" and tied and family != "gpt2":
            continue
        if family == "gpt2":
            if key == "lm_head.weight":
                key = "output.weight"  # llama.cpp's GPT-2 has its own output tensor
            elif key.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
                tensor = tensor.t()
        elif ARCHITECTURES[family] == "LLAMA" and key.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            tensor = _permute(tensor, heads, heads if "q_proj" in key else kv)
        yield key, tensor


def _permute(w: torch.Tensor, n_head: int, n_head_kv: int) -> torch.Tensor:
    """llama.cpp's permute of a q / k projection (its rotary pairs interleaved; transformers' reader reverses it)."""
    n = n_head_kv if n_head_kv != n_head else n_head
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _type_of(target: str, gtype: str, int4_model) -> str:
    """The type of a tensor not taken from int4 blocks. In a q4_0 file the output layer stays 8-bit (llama.cpp keeps
    it wider too: its error reaches every logit), and so does everything an int4 checkpoint itself kept at 8 bits or
    more (embedding rows in int8, a head in floating point): the file then computes what the checkpoint computes."""
    if gtype in INT4 and (int4_model is not None or target == "output.weight"):
        return "q8_0"
    return gtype


def _encode(data: np.ndarray, gtype: str, target: str):
    """(raw array, GGML type) of one tensor: 1-D tensors and norms f32; 2-D ones in `gtype`, or f16 when their rows
    do not split into 32-value blocks."""
    import gguf

    T = gguf.GGMLQuantizationType
    if data.ndim < 2 or "norm" in target or gtype == "f32":
        return data.astype(np.float32), T.F32
    if gtype == "f16" or (gtype in ("q8_0", *INT4) and data.shape[-1] % BLOCK):
        return data.astype(np.float16), T.F16
    qtype = {"bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}[gtype]
    return gguf.quants.quantize(data.astype(np.float32), qtype), qtype


def _int4_blocks(model, gtype: str) -> dict:
    """{HF weight name: (block bytes, GGML type)} from an int4-weight model's own values, scales and zero points,
    for each weight stored in groups of 32 (the blocks' size) that `gtype` holds as it is: Q4_1 any such group,
    Q4_0 symmetric ones. Others (asymmetric in a q4_0 file, other group sizes, a layer with a low-rank error
    correction) are rounded again from the float weights instead."""
    import gguf

    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not hasattr(weight, "qdata") or tuple(getattr(weight, "block_size", None) or ()) != (1, BLOCK):
            continue
        if hasattr(module, "lowrank_a"):
            continue  # int4 values + a float correction: no 4-bit block holds the sum
        q, scale = weight.qdata.to(torch.int16), weight.scale.float()
        rows, cols = q.shape
        zero = weight.zero_point.float() if weight.zero_point is not None else torch.zeros_like(scale)
        if gtype == "q4_0" and bool(zero.any()):
            continue  # asymmetric: Q4_0 cannot hold it
        stored = (q + 8).to(torch.uint8).reshape(rows, cols // BLOCK, 2, BLOCK // 2)
        packed = stored[:, :, 0, :] | (stored[:, :, 1, :] << 4)  # value j and j + 16 share a byte, as ggml's blocks
        halves = [scale] if gtype == "q4_0" else [scale, -(zero + 8) * scale]  # Q4_0: d · (q − 8); Q4_1: d · q + m
        head = [h.reshape(rows, cols // BLOCK, 1).to(torch.float16).view(torch.uint8) for h in halves]
        qtype = gguf.GGMLQuantizationType.Q4_0 if gtype == "q4_0" else gguf.GGMLQuantizationType.Q4_1
        out[f"{name}.weight"] = (torch.cat([*head, packed], dim=-1).reshape(rows, -1).numpy(), qtype)
    return out


def _write_config(writer, model, family: str, gtype: str) -> None:
    import gguf

    c = model.config
    heads, kv, head_dim = head_shape(c)
    writer.add_name(getattr(c, "_name_or_path", "") or family)
    writer.add_block_count(len(_layers(model)))
    writer.add_context_length(int(max_positions(c) or 2048))
    writer.add_embedding_length(int(getattr(c, "hidden_size", None) or c.n_embd))
    writer.add_head_count(heads)
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    }[gtype]
    writer.add_file_type(ftype)
    if family == "gpt2":
        writer.add_feed_forward_length(int(c.n_inner or 4 * c.n_embd))
        writer.add_layer_norm_eps(float(c.layer_norm_epsilon))
        return
    writer.add_feed_forward_length(int(c.intermediate_size))
    writer.add_head_count_kv(kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(
        float(getattr(c, "rope_theta", None) or (c.rope_parameters or {}).get("rope_theta", 10000.0))
    )
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_vocab_size(int(c.vocab_size))


def _write_tokenizer(writer, tokenizer) -> None:
    """A byte-level BPE tokenizer as llama.cpp's `gpt2` tokenizer model: tokens by id, merges, token types (control
    for special tokens), special ids and the chat template."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "backend_tokenizer", None) else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer") or spec.get("decoder")):
        raise LlmctlError(
            "format=gguf writes byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM, Qwen); this "
            f"tokenizer is {model.get('type')}: export it with a tokenizer llama.cpp reads"
        )
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    for token, i in vocab.items():
        tokens[i] = token
    special = set(tokenizer.all_special_ids)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # the GPT-2 split rule, which llmctl's byte-level tokenizers apply
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(size)])  # 3: control, 1: normal
    writer.add_token_merges(merges)
    for key, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("pad_token_id", writer.add_pad_token_id),
        ("unk_token_id", writer.add_unk_token_id),
    ):
        if getattr(tokenizer, key, None) is not None:
            add(int(getattr(tokenizer, key)))
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
