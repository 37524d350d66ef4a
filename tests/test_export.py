"""`llmctl export` on tiny models: an ONNX classifier (fp32, ONNX Runtime int8 from an int8-dynamic checkpoint, a
head-pruned BERT) runs in onnxruntime with the source's logits at shapes it was not traced at and is judged by
`eval` by reference; a tiny Llama and GPT-2 as GGUF reload through transformers' GGUF reader with their logits,
tokenizer and chat template; an int4-weight checkpoint's groups become Q4_1 / Q4_0 blocks as they are."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import cls_args, run_inprocess
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llmctl.core.loading import load_checkpoint
from llmctl.core.store import Store

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
gguf = pytest.importorskip("gguf")

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def world(tmp_path_factory, bases, reviews):
    root = tmp_path_factory.mktemp("export")
    code, err = run_inprocess("finetune", *cls_args(bases, reviews, root, "name=c"))
    assert code == 0, err
    return root


@pytest.fixture(scope="module")
def llama(bases, tmp_path_factory):
    """A tiny Llama (grouped-query attention, untied head) with the tiny GPT's tokenizer and a chat template."""
    folder = tmp_path_factory.mktemp("llama") / "llama"
    tok = AutoTokenizer.from_pretrained(bases["gpt"])
    tok.chat_template = TEMPLATE
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _export(root, *extra):
    code, err = run_inprocess(
        "export",
        "precision=fp32",
        f"output_root={root}",
        "cost.runs=2",
        "cost.warmup=1",
        "cost.throughput_runs=1",
        "cost.seq_len=16",
        *extra,
    )
    assert code == 0, err
    name = next((e.split("=")[1] for e in extra if e.startswith("name=")), None)
    return Store(root).resolve(f"export/{name}")


def _feed(session, tok, texts):
    enc = tok(texts, padding=True, return_tensors="np")
    names = {i.name for i in session.get_inputs()}
    return {k: v.astype(np.int64) for k, v in enc.items() if k in names}, enc


def test_an_onnx_classifier_runs_in_onnxruntime_with_the_sources_logits_and_is_judged_by_reference(world):
    res = _export(world, "ckpt=finetune/c", "format=onnx", "name=c")
    m = res.manifest
    assert m["artifact"]["format"] == "onnx" and m["parents"][0]["ref"].startswith("finetune/c@")
    assert m["export"]["parity"]["max_abs_logit_diff"] < 1e-4
    assert m["compare"]["export"]["metrics"]["accuracy"] == m["compare"]["source"]["metrics"]["accuracy"]
    # Another tool opens the file: onnxruntime alone, at a batch and length the graph was not traced at
    source = load_checkpoint(Store(world), "finetune/c").model.eval()
    tok = AutoTokenizer.from_pretrained(res.path)
    session = ort.InferenceSession(str(res.path / "model.onnx"), providers=["CPUExecutionProvider"])
    texts = ["the bank said shares fell on the news today", "coach", "a new chip for mobile phone networks"]
    feed, enc = _feed(session, tok, texts)
    assert enc["input_ids"].shape != tuple(m["artifact"]["trace_shape"])
    with torch.inference_mode():
        expected = source(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
    assert np.abs(session.run(None, feed)[0] - expected).max() < 1e-4
    # the weights' hash covers the graph's files; eval judges the export by reference beside its source
    assert m["weights_sha256"] and (res.path / "model.onnx").is_file()
    code, err = run_inprocess(
        "eval", "ckpt=[finetune/c,export/c]", f"output_root={world}", "precision=fp32", "cost.runs=2", "cost.warmup=1"
    )
    assert code == 0, err
    records = [json.loads(p.read_text()) for p in (res.path / "evals").glob("*.json")]
    assert records and records[0]["metrics"]["accuracy"] == m["compare"]["source"]["metrics"]["accuracy"]
    graph = sum(p.stat().st_size for p in res.path.glob("model.onnx*"))  # the graph and its data
    assert records[0]["cost"]["size_bytes"] == graph > 2 * records[0]["cost"]["parameters"]


def test_an_int8_dynamic_checkpoint_exports_its_float_parent_quantized_by_onnxruntime(world):
    code, err = run_inprocess(
        "quantize",
        "init_from=finetune/c",
        "method=int8-dynamic",
        "name=c8",
        "precision=fp32",
        f"output_root={world}",
        "cost=off",
    )
    assert code == 0, err
    res = _export(world, "ckpt=quantize/c8", "format=onnx", "name=c8")
    fp32 = Store(world).resolve("export/c")
    m = res.manifest
    assert m["artifact"]["dtype"] == "int8" and m["export"]["traced_from"].startswith("finetune/c@")
    ops = {n.op_type for n in __import__("onnx").load(str(res.path / "model.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul"}, ops
    size = lambda r: sum(p.stat().st_size for p in r.path.glob("model.onnx*"))  # noqa: E731
    assert size(res) < 0.7 * size(fp32)
    parity = m["export"]["parity"]
    assert parity["max_abs_logit_diff"] < 0.5 and parity["max_abs_logit_diff_vs_float"] < 0.5
    assert abs(m["compare"]["export"]["metrics"]["accuracy"] - m["compare"]["source"]["metrics"]["accuracy"]) < 0.1


def test_a_head_pruned_bert_exports_with_its_own_shapes(world):
    code, err = run_inprocess(
        "prune",
        "init_from=finetune/c",
        "method=structured",
        "amount=0.5",
        "name=cut",
        "precision=fp32",
        f"output_root={world}",
        "cost=off",
    )
    assert code == 0, err
    res = _export(world, "ckpt=prune/cut", "format=onnx", "name=cut")
    assert res.manifest["export"]["parity"]["max_abs_logit_diff"] < 1e-4
    assert res.manifest["artifact"]["inputs"]


@pytest.mark.parametrize("gtype, tolerance", [("f32", 1e-4), ("q8_0", 0.05)])
def test_a_llama_as_gguf_reloads_with_its_logits_tokenizer_and_chat_template(llama, corpus, tmp_path, gtype, tolerance):
    data = ["data=files", f"data.train={corpus}", "data.max_seq_len=32"]
    res = _export(tmp_path, f"ckpt={llama}", "format=gguf", f"gguf.type={gtype}", "name=l", *data)
    m = res.manifest
    file = m["artifact"]["file"]
    assert file == f"model-{gtype}.gguf" and m["artifact"]["gguf_version"] == gguf.GGUF_VERSION
    parity = m["export"]["parity"]
    assert abs(parity["perplexity_delta"]) < (1e-3 if gtype == "f32" else 0.02) * parity["source_perplexity"]
    reader = gguf.GGUFReader(str(res.path / file))
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith(("tokenizer.", "general.arch"))}
    tok = AutoTokenizer.from_pretrained(llama)
    assert fields["general.architecture"] == "llama" and fields["tokenizer.chat_template"] == TEMPLATE
    assert fields["tokenizer.ggml.tokens"][:50] == [tok.convert_ids_to_tokens(i) for i in range(50)]
    # transformers' own GGUF reader, with no help from llmctl: same tokens, same logits
    again = AutoModelForCausalLM.from_pretrained(res.path, gguf_file=file, dtype=torch.float32).eval()
    gtok = AutoTokenizer.from_pretrained(res.path, gguf_file=file)
    text = "The striker scored twice as the home side won"
    assert gtok(text)["input_ids"] == tok(text)["input_ids"]
    ids = torch.tensor([tok(text)["input_ids"]])
    source = AutoModelForCausalLM.from_pretrained(llama).eval()
    with torch.inference_mode():
        expected = source(ids).logits
        gap = (again(ids).logits - expected).abs().max()
    assert gap < tolerance * max(1.0, float(expected.abs().max())), gap


@pytest.mark.parametrize("zero_point, blocks", [("true", "q4_1"), ("false", "q4_0")], ids=["min-max", "symmetric"])
def test_a_gpt2_as_gguf_and_an_int4_llama_as_its_own_4bit_blocks(bases, llama, corpus, tmp_path, zero_point, blocks):
    data = ["data=files", f"data.train={corpus}", "data.max_seq_len=32"]
    if blocks == "q4_1":  # (the GPT-2 once)
        gpt = _export(tmp_path, f"ckpt={bases['gpt']}", "format=gguf", "gguf.type=f16", "name=g", *data)
        assert (
            abs(gpt.manifest["export"]["parity"]["perplexity_delta"])
            < 0.01 * gpt.manifest["export"]["parity"]["source_perplexity"]
        )
    code, err = run_inprocess(
        "quantize",
        f"init_from={llama}",
        "method=int4-weight",
        "quantize.group_size=32",
        f"quantize.zero_point={zero_point}",
        "name=l4",
        "precision=fp32",
        f"output_root={tmp_path}",
        "cost=off",
        *data,
    )
    assert code == 0, err
    res = _export(tmp_path, "ckpt=quantize/l4", "format=gguf", "name=l4", *data)  # gguf.type=auto → its blocks
    m = res.manifest
    assert m["artifact"]["type"] == blocks and m["artifact"]["tensors_from_int4"] == 14  # 7 Linears × 2 layers
    reader = gguf.GGUFReader(str(res.path / m["artifact"]["file"]))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == blocks.upper() and kinds["blk.1.ffn_down.weight"] == blocks.upper()
    # the blocks are the checkpoint's own: the reloaded file computes what the int4 model computes
    int4 = load_checkpoint(Store(tmp_path), "quantize/l4", kind="causal-lm").model.eval()
    again = AutoModelForCausalLM.from_pretrained(res.path, gguf_file=m["artifact"]["file"], dtype=torch.float32)
    ids = torch.tensor([AutoTokenizer.from_pretrained(llama)("The coach said the team")["input_ids"]])
    with torch.inference_mode():
        a, b = int4(ids).logits, again.eval()(ids).logits
    assert (a - b).abs().max() < 0.02 * a.abs().max()  # fp16 scales in a 4-bit block: close, not bit-equal
    parity = m["export"]["parity"]
    assert abs(parity["perplexity_delta"]) < 0.01 * parity["source_perplexity"]
