"""Every bad input is one line and exit 2, and leaves the store as it was.

Each case runs the real CLI (`llmctl.cli.app`, in-process for speed) and checks: exit code 2; stderr
is exactly one line, `llmctl: error: ...`, naming what is wrong and where (the fragments listed);
nothing new in the store: no version, no `.runs/` folder, no lock or pointer written (the shared
`.cache/` is a cache, not the store). The coming stages add their cases to CASES.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import cls_args, run_inprocess, tiny
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.core.store import Store
from llmctl.core.train import Trainer


@dataclass
class World:
    """What the cases point at: a fresh store `out`, a folder of bad files, tiny checkpoints."""

    out: Path
    files: Path
    corpus: Path
    bases: dict
    reviews: Path
    interrupted: Path  # a store holding one interrupted (resumable) pretrain run of pretrain/r
    published: Path  # a store holding pretrain/p@v001 and its child finetune/c@v001


def _pre(w: World, *extra: str) -> list[str]:
    return ["pretrain", *tiny("clm", w.corpus, w.out, *extra)]


def _ft(w: World, *extra: str) -> list[str]:
    return ["finetune", *cls_args(w.bases, w.reviews, w.out, *extra)]


def _ft_files(w: World, train: str, *extra: str) -> list[str]:
    return [
        "finetune",
        "task=classification",
        f"init_from={w.bases['enc']}",
        "data=files",
        f"data.train={train}",
        "precision=fp32",
        f"output_root={w.out}",
        "train.max_steps=2",
        *extra,
    ]


def _resume(w: World, *extra: str) -> list[str]:
    return ["pretrain", *tiny("clm", w.corpus, _at(w, w.interrupted).out, "name=r", "resume=auto", *extra)]


def _gen(w: World, *extra: str) -> list[str]:
    ckpt = [] if any(e.startswith("ckpt=") for e in extra) else [f"ckpt={w.bases['gpt']}"]
    return ["generate", *ckpt, f"output_root={w.out}", *extra]


def _ev(w: World, *extra: str) -> list[str]:
    return ["eval", f"output_root={w.out}", "precision=fp32", *extra]


def _ds(w: World, *extra: str) -> list[str]:
    return ["distill", f"output_root={w.out}", "precision=fp32", "train.max_steps=2", *extra]


def _pr(w: World, *extra: str) -> list[str]:
    return ["prune", f"output_root={w.out}", "precision=fp32", "train.max_steps=2", *extra]


def _qz(w: World, *extra: str) -> list[str]:
    return ["quantize", f"output_root={w.out}", "precision=fp32", "train.max_steps=2", *extra]


def _ex(w: World, *extra: str) -> list[str]:
    return ["export", f"output_root={w.out}", "precision=fp32", "cost=off", *extra]


def _sv(w: World, *extra: str) -> list[str]:
    return ["serve", f"output_root={w.out}", "port=0", *extra]


def _at(w: World, root: Path) -> World:
    """The case writes to `root` instead of a fresh store."""
    w.out = root
    return w


CASES = {  # id → (the command line, fragments the error line must hold)
    # data files
    "latin-1 .txt": (
        lambda w: _pre(w, f"data.train={w.files / 'latin1.txt'}"),
        ["latin1.txt", "not valid utf-8", "offset 7", "data.encoding="],
    ),
    "latin-1 .csv": (
        lambda w: _ft_files(w, str(w.files / "latin1.csv")),
        ["latin1.csv", "not valid utf-8", "offset", "data.encoding="],
    ),
    "binary file as .txt": (lambda w: _pre(w, f"data.train={w.files / 'binary.txt'}"), ["binary.txt", "binary"]),
    "UTF-16 text read as utf-8": (
        lambda w: _pre(w, f"data.train={w.files / 'utf16.txt'}"),
        ["utf16.txt is UTF-16 text", "byte-order mark", "set data.encoding=utf-16"],
    ),
    "header-only csv": (lambda w: _ft_files(w, str(w.files / "header.csv")), ["header.csv", "header but no rows"]),
    "malformed jsonl": (
        lambda w: _pre(w, f"data.train={w.files / 'broken.jsonl'}"),
        ["broken.jsonl", "cannot read", "json"],
    ),
    "split_ratio [1,0,0]": (
        lambda w: _pre(w, "data.split_ratio=[1,0,0]"),
        ["data.split_ratio=[1,0,0]", "validation share"],
    ),
    "split_ratio negative": (
        lambda w: _pre(w, "data.split_ratio=[0.9,-0.1,0.2]"),
        ["data.split_ratio", "non-negative"],
    ),
    "unknown encoding": (
        lambda w: _pre(w, "data.encoding=klingon"),
        ["data.encoding=klingon", "unknown text encoding"],
    ),
    # values of the wrong type or range (the typed schema)
    "train.lr=abc": (lambda w: _pre(w, "train.lr=abc"), ["train.lr=abc", "must be a number", "set train.lr="]),
    "train.lr=0": (lambda w: _pre(w, "train.lr=0"), ["train.lr=0", "must be above 0;"]),
    "train.lr=inf": (lambda w: _pre(w, "train.lr=inf"), ["train.lr=inf", "finite", "set train.lr="]),
    "seed=abc": (lambda w: _pre(w, "seed=abc"), ["seed=abc", "whole number"]),
    "seed=1.5": (lambda w: _pre(w, "seed=1.5"), ["seed=1.5", "whole number"]),
    "train.batch_size=0": (
        lambda w: _pre(w, "train.batch_size=0"),
        ["train.batch_size=0", "must be at least 1; set train.batch_size=1 or more"],
    ),
    "train.max_steps=-5": (lambda w: _pre(w, "train.max_steps=-5"), ["train.max_steps=-5", "must be at least 0"]),
    "train.grad_accum=0": (lambda w: _pre(w, "train.grad_accum=0"), ["train.grad_accum=0"]),
    "train.warmup_ratio=2": (lambda w: _pre(w, "train.warmup_ratio=2"), ["train.warmup_ratio=2", "must be at most 1"]),
    "train.betas one value": (lambda w: _pre(w, "train.betas=[0.9]"), ["train.betas=[0.9]"]),
    "train.betas=[0.9,1.5]": (lambda w: _pre(w, "train.betas=[0.9,1.5]"), ["train.betas", "[0, 1)"]),
    "train.scheduler typo": (lambda w: _pre(w, "train.scheduler=cosin"), ["train.scheduler=cosin", "linear", "cosine"]),
    "train.eval_every=-1": (lambda w: _pre(w, "train.eval_every=-1"), ["train.eval_every=-1"]),
    "train.log_every=0": (lambda w: _pre(w, "train.log_every=0"), ["train.log_every=0"]),
    "train.weight_decay=-1": (lambda w: _pre(w, "train.weight_decay=-1"), ["train.weight_decay=-1"]),
    "train.eval_batches=0": (lambda w: _pre(w, "train.eval_batches=0"), ["train.eval_batches=0"]),
    "data.max_seq_len=abc": (lambda w: _pre(w, "data.max_seq_len=abc"), ["data.max_seq_len=abc", "whole number"]),
    "data.max_docs=0": (lambda w: _pre(w, "data.max_docs=0"), ["data.max_docs=0"]),
    "tokenizer.vocab_size=10": (lambda w: _pre(w, "tokenizer.vocab_size=10"), ["tokenizer.vocab_size=10"]),
    "mlm_probability=1.5": (
        lambda w: ["pretrain", *tiny("mlm", w.corpus, w.out, "mlm_probability=1.5")],
        ["mlm_probability=1.5"],
    ),
    "objective=gpt": (lambda w: _pre(w, "objective=gpt"), ["objective=gpt", "mlm", "clm"]),
    "precision=fp8": (lambda w: _pre(w, "precision=fp8"), ["precision=fp8", "fp32", "bf16"]),
    "device=gpu": (lambda w: _pre(w, "device=gpu"), ["device=gpu", "cuda:N"]),
    "task=regression": (lambda w: _ft(w, "task=regression"), ["task=regression", "classification"]),
    "patience=-1": (lambda w: _ft(w, "patience=-1"), ["patience=-1"]),
    "method.r=0": (lambda w: _ft(w, "method=lora", "method.r=0"), ["method.r=0"]),
    "method.dropout=1": (lambda w: _ft(w, "method=lora", "method.dropout=1"), ["method.dropout=1"]),
    "objective_mode=up": (lambda w: _pre(w, "objective_mode=up"), ["objective_mode=up", "min", "max"]),
    "streaming a built-in corpus": (
        lambda w: ["pretrain", "conf=gpt-tiny", "data=bbc-news", "data.streaming=true", f"output_root={w.out}"],
        ["data.streaming=true", "data.source=bbc-news", "data.train=<files>"],
    ),
    "streaming a fine-tune's data": (lambda w: _ft(w, "data.streaming=true"), ["data.streaming=true", "pretrain"]),
    "-m with --cfg": (lambda w: ["pretrain", "-m", "--cfg", "job", f"output_root={w.out}"], ["--cfg", "drop -m"]),
    "objectives: an unknown cost figure": (
        lambda w: _ft(w, "objectives=[eval/accuracy,cost/speed]"),
        ["cost/speed", "cost/latency_ms_p50"],
    ),
    "objectives: a cost figure the wrong way": (
        lambda w: _ft(w, "objectives=[cost/latency_ms_p50:max]"),
        ["cost/latency_ms_p50:max", "wrong way", "lower is better"],
    ),
    "objectives: a metric without a mode": (
        lambda w: _ft(w, "objectives=[eval/odd]"),
        ["eval/odd", "eval/odd:max or eval/odd:min"],
    ),
    "objectives: a metric the run does not report": (
        lambda w: _ft(w, "objectives=[eval/accuracy,eval/nothing:max]", "train.max_steps=2"),
        ["eval/nothing", "eval/accuracy"],
    ),
    "objectives: cost with cost=off": (
        lambda w: _pr(_at(w, w.published), "init_from=finetune/c", "cost=off", "objectives=[cost/size_bytes]"),
        ["cost/size_bytes", "cost=off"],
    ),
    # config groups a stage does not take, keys and presets that do not exist
    "pretrain method=full": (
        lambda w: _pre(w, "method=full"),
        ["takes no config group 'method'", "conf", "drop method="],
    ),
    "finetune conf=bert-tiny": (lambda w: _ft(w, "conf=bert-tiny"), ["takes no config group 'conf'", "method"]),
    "unknown key": (lambda w: _pre(w, "train.lrr=1"), ["train.lrr", "did you mean train.lr"]),
    "unknown preset": (lambda w: _pre(w, "model=bert-huge"), ["model=bert-huge", "bert-tiny"]),
    "a GPT whose width does not split into its heads": (
        lambda w: _pre(w, "model.config.n_head=3"),
        ["model.config.n_embd=32 does not split into model.config.n_head=3 heads", "choose a head count"],
    ),
    "--config-dir naming a missing folder": (
        lambda w: ["pretrain", "--config-dir", str(w.out / "my-configs"), *tiny("clm", w.corpus, w.out)],
        ["--config-dir", "my-configs: no such folder"],
    ),
    # the store and references
    "output_root is a file": (lambda w: _pre(_at(w, w.files / "latin1.txt")), ["output_root=", "is a file"]),
    "bad name": (lambda w: _pre(w, "name=a b"), ["name='a b'", "letters, digits"]),
    "init_from missing": (lambda w: _ft(w, f"init_from={w.out / 'nope'}"), ["init_from", "nope"]),
    "init_from a folder with pickled weights only": (
        lambda w: _ft(w, f"init_from={w.files / 'pickled'}", "data.max_seq_len=100000"),
        ["pickled", "no .safetensors weights", "pytorch_model.bin", "never pickle"],
    ),
    "init_from truncated safetensors (HF folder)": (
        lambda w: _ft(w, f"init_from={w.files / 'truncated'}"),
        ["model.safetensors", "truncated"],
    ),
    "init_from with weights changed in place": (
        lambda w: _pre(_at(w, w.published), "init_from=pretrain/p", "name=q"),
        ["pretrain/p@v001", "do not match the manifest"],
    ),
    # what the model cannot take
    "data.max_seq_len above the positions": (
        lambda w: _ft(w, "data.max_seq_len=100000"),
        ["data.max_seq_len=100000", "positions"],
    ),
    "freeze more layers than there are": (
        lambda w: _ft(w, "method=freeze", "method.freeze_layers=99"),
        ["method.freeze_layers=99", "layers"],
    ),
    "sft on an encoder": (lambda w: _ft(w, "task=sft"), ["task=sft", "causal LM"]),
    # resume: only what the interrupted run was
    "resume a different model": (lambda w: _resume(w, "model.config.n_embd=48"), ["resume", "another model"]),
    "resume with other data": (lambda w: _resume(w, "data.max_docs=20"), ["resume", "trained with other data"]),
    "resume with another lr": (lambda w: _resume(w, "train.lr=0.01"), ["resume", "train.lr=", "now 0.01"]),
    "resume with another batch size": (lambda w: _resume(w, "train.batch_size=4"), ["resume", "train.batch_size=8"]),
    "resume shorter than done": (
        lambda w: _resume(w, "train.max_steps=2"),
        ["resume", "steps already", "train.max_steps=2"],
    ),
    # generate
    "generate on an encoder": (
        lambda w: _gen(w, f"ckpt={w.bases['enc']}", "prompt=hi"),
        ["is a mlm checkpoint", "needs a causal LM"],
    ),
    "generate without a prompt": (lambda w: _gen(w), ["prompt=", "prompts_file="]),
    "generate from an empty prompts file": (
        lambda w: _gen(w, f"prompts_file={w.files / 'empty.txt'}"),
        ["empty.txt", "no prompts"],
    ),
    "generate from a latin-1 prompts file": (
        lambda w: _gen(w, f"prompts_file={w.files / 'latin1.txt'}"),
        ["latin1.txt", "not valid utf-8"],
    ),
    "generate from a missing checkpoint": (
        lambda w: _gen(w, "ckpt=pretrain/ghost", "prompt=hi"),
        ["ckpt", "pretrain/ghost"],
    ),
    "generate into a missing folder": (
        lambda w: _gen(w, "prompt=hi", f"out={w.out / 'no' / 'x.jsonl'}"),
        ["out=", "does not exist"],
    ),
    "generate into a folder it cannot write": (
        lambda w: _gen(w, "prompt=hi", f"out={w.files / 'readonly' / 'x.jsonl'}"),
        ["out=", "cannot write in", "choose a folder you can write to"],
    ),
    "generate into an existing folder": (
        lambda w: _gen(w, "prompt=hi", f"out={w.files}"),
        ["out=", "is a folder", "give a file path"],
    ),
    "generate chat=true from a model without a chat template": (
        lambda w: _gen(w, "prompt=hi", "chat=true"),
        ["has no chat template", "drop chat=true", "task=sft"],
    ),
    "generate past the model's positions": (
        lambda w: _gen(w, "prompt=hi", "max_new_tokens=5000"),
        ["max_new_tokens=5000", "positions"],
    ),
    "generate sample.top_p=0": (lambda w: _gen(w, "prompt=hi", "sample.top_p=0"), ["sample.top_p=0"]),
    # eval
    "eval on a split the data lacks": (
        lambda w: _ev(_at(w, w.published), "ckpt=finetune/c", "split=holdout"),
        ["split=holdout", "no holdout split", "train, validation, test"],
    ),
    "eval of a missing checkpoint": (
        lambda w: _ev(w, "ckpt=[finetune/ghost]"),
        ["ckpt", "finetune/ghost", "ckpt list"],
    ),
    "eval of a folder with no data": (
        lambda w: _ev(w, f"ckpt={w.files / 'truncated'}"),
        ["records no data", "data=<preset>"],
    ),
    "eval of the same checkpoint twice": (
        lambda w: _ev(w, f"ckpt=[{w.bases['gpt']},{w.bases['gpt']}]"),
        ["named twice"],
    ),
    "eval with a report path that is a file": (
        lambda w: _ev(w, f"ckpt={w.bases['gpt']}", f"report={w.files / 'empty.txt'}"),
        ["report=", "is a file"],
    ),
    "eval with a harness task that does not exist": (
        lambda w: _ev(w, f"ckpt={w.bases['gpt']}", "harness.tasks=[llmctl_arithmetic_x]"),
        ["harness.tasks", "llmctl_arithmetic_x", "include_path"],
    ),
    "eval with harness tasks on an encoder": (
        lambda w: _ev(w, f"ckpt={w.bases['enc']}", "harness.tasks=[llmctl_arith]"),
        ["is a mlm checkpoint", "causal LMs"],
    ),
    "eval cost.runs=0": (lambda w: _ev(w, f"ckpt={w.bases['gpt']}", "cost.runs=0"), ["cost.runs=0", "at least 1"]),
    # distill
    "distill an MLM teacher": (
        lambda w: _ds(w, f"teacher={w.bases['enc']}"),
        ["is a mlm checkpoint", "seq-cls, token-cls, causal-lm"],
    ),
    "distill into a student of another vocabulary": (
        lambda w: _ds(_at(w, w.published), "teacher=finetune/c", f"student={w.bases['nerenc']}"),
        ["another vocabulary", "both 300 tokens", "of them different", "one tokenizer"],
    ),
    "distill into a student of another family": (
        lambda w: _ds(_at(w, w.published), "teacher=finetune/c", f"student={w.bases['gpt']}"),
        ["gpt2", "bert", "family"],
    ),
    "distill a quantized teacher": (
        lambda w: _ds(_at(w, w.published), "teacher=quantize/q"),
        ["quantize/q", "quantized", "floating-point"],
    ),
    "distill student.num_layers too deep": (
        lambda w: _ds(_at(w, w.published), "teacher=finetune/c", "student.num_layers=9"),
        ["student.num_layers=9", "1..2"],
    ),
    "distill distill.alpha=2": (lambda w: _ds(w, "teacher=x", "distill.alpha=2"), ["distill.alpha=2", "at most 1"]),
    "distill student.num_layers=0": (
        lambda w: _ds(w, "teacher=x", "student.num_layers=0"),
        ["bad config value student.num_layers=0: must be at least 1"],
    ),
    "distill a student whose width does not split into its heads": (
        lambda w: _ds(_at(w, w.published), "teacher=finetune/c", "student.init=random", "student.num_heads=3"),
        ["student.hidden_size=32 does not split into student.num_heads=3 heads", "choose a head count"],
    ),
    "distill a Llama student whose heads split no key-value group": (
        lambda w: _ds(
            w,
            f"teacher={w.files / 'llama'}",
            "data=files",
            f"data.train={w.corpus}",
            "student.init=random",
            "student.num_heads=4",
            "student.hidden_size=32",
        ),
        ["student.num_heads=4 query heads do not split into 3 key-value groups", "multiple of 3"],
    ),
    # prune
    "prune amount=1.5": (lambda w: _pr(w, "init_from=x", "amount=1.5"), ["amount=1.5", "below 1"]),
    "prune amount=0": (lambda w: _pr(w, "init_from=x", "amount=0"), ["amount=0", "above 0"]),
    "prune without init_from": (lambda w: _pr(w), ["init_from="]),
    "prune more heads than exist": (
        lambda w: _pr(_at(w, w.published), "init_from=finetune/c", "method=structured", "prune.heads=5"),
        ["prune.heads=5", "removes all 2 heads"],
    ),
    "prune heads that split a key-value group": (
        lambda w: _pr(
            w,
            f"init_from={w.files / 'llama'}",
            "data=files",
            f"data.train={w.corpus}",
            "method=structured",
            "prune.heads=3",
        ),
        ["prune.heads=3", "multiple of 2 heads", "key-value groups"],
    ),
    "prune a share of heads that rounds to no whole group": (
        lambda w: _pr(
            w,
            f"init_from={w.files / 'llama'}",
            "data=files",
            f"data.train={w.corpus}",
            "method=structured",
            "prune.heads=0.15",
            "prune.ffn=0.5",
        ),
        ["prune.heads=0.15 rounds to removing nothing", "6 heads in 3 key-value groups of 2", "prune.heads=2"],
    ),
    "prune a quantized checkpoint": (
        lambda w: _pr(_at(w, w.published), "init_from=quantize/q"),
        ["quantize/q", "quantized", "its parent"],
    ),
    "prune method=lora": (
        lambda w: _pr(w, "init_from=x", "method=lora"),
        ["method.name=lora", "magnitude, structured or layers"],
    ),
    "prune layers without a choice": (
        lambda w: _pr(_at(w, w.published), "init_from=finetune/c", "method=layers"),
        ["prune.keep_layers"],
    ),
    # quantize
    "quantize without init_from": (lambda w: _qz(w), ["init_from="]),
    "quantize method=lora": (
        lambda w: _qz(w, "init_from=x", "method=lora"),
        ["method.name=lora", "int8-dynamic", "qat"],
    ),
    "quantize int8-dynamic in groups": (
        lambda w: _qz(_at(w, w.published), "init_from=finetune/c", "quantize.group_size=32"),
        ["quantize.group_size", "int8-dynamic", "output channel"],
    ),
    "quantize int4 groups wider than every layer": (
        lambda w: _qz(_at(w, w.published), "init_from=finetune/c", "method=int4-weight", "quantize.group_size=4096"),
        ["quantize.group_size=4096 divides the input width of no Linear layer", "quantize.group_size=32"],
    ),
    "quantize method=auto for speed without cost figures": (
        lambda w: _qz(w, "init_from=x", "method=auto", "cost=off"),
        ["method=auto quantize.goal=speed", "cost=off", "quantize.goal=quality"],
    ),
    "quantize an int8 output layer beside int8 activations": (
        lambda w: _qz(w, "init_from=x", "quantize.head_int8=true"),
        ["quantize.head_int8", "method=int8-dynamic", "choose method=int8-weight or int4-weight"],
    ),
    "quantize an int8 output layer of a classifier": (
        lambda w: _qz(_at(w, w.published), "init_from=finetune/c", "method=int8-weight", "quantize.head_int8=true"),
        ["quantize.head_int8", "no output layer", "drop quantize.head_int8"],
    ),
    "quantize a method that does not exist": (
        lambda w: _qz(w, "init_from=x", "method=int9"),
        ["unknown preset method=int9", "available: auto, int4-weight, int8-dynamic, int8-weight, qat ("],
    ),
    "distill distill.temperature=1e30": (
        lambda w: _ds(w, "teacher=x", "distill.temperature=1e30"),
        ["distill.temperature=1e+30", "must be at most 100"],
    ),
    "quantize int4 groups of 48": (
        lambda w: _qz(_at(w, w.published), "init_from=finetune/c", "method=int4-weight", "quantize.group_size=48"),
        ["quantize.group_size=48", "power of two"],
    ),
    "quantize qat toward int8-dynamic": (
        lambda w: _qz(w, "init_from=x", "method=qat", "method.base=int8-dynamic"),
        ["method.base=int8-dynamic", "int4-weight"],
    ),
    "quantize a skip pattern that matches nothing": (
        lambda w: _qz(_at(w, w.published), "init_from=finetune/c", "quantize.skip=[clasifier]"),
        ["quantize.skip", "clasifier", "matches no module"],
    ),
    "quantize a quantized checkpoint": (
        lambda w: _qz(_at(w, w.published), "init_from=quantize/q"),
        ["quantize/q", "quantize its parent finetune/c"],
    ),
    "finetune a quantized checkpoint": (
        lambda w: _ft(_at(w, w.published), "init_from=quantize/q"),
        ["quantize/q", "finetune its parent"],
    ),
    # export
    "export an encoder as gguf": (
        lambda w: _ex(_at(w, w.published), "ckpt=finetune/c", "format=gguf"),
        ["finetune/c@v001", "format=gguf takes Llama-layout and GPT-2 causal LMs", "format=onnx"],
    ),
    "export a causal LM as onnx": (
        lambda w: _ex(w, f"ckpt={w.bases['gpt']}", "format=onnx"),
        ["causal-lm", "format=onnx takes encoders", "format=gguf"],
    ),
    "export an int8 checkpoint as gguf": (
        lambda w: _ex(_at(w, w.published), "ckpt=quantize/q", "format=gguf"),
        ["quantize/q", "int8-dynamic", "int4-weight", "export its parent"],
    ),
    "export gguf.type=q5_k": (
        lambda w: _ex(w, f"ckpt={w.bases['gpt']}", "format=gguf", "gguf.type=q5_k"),
        ["gguf.type=q5_k", "q8_0"],
    ),
    "export format=tflite": (lambda w: _ex(w, f"ckpt={w.bases['gpt']}", "format=tflite"), ["format=tflite", "onnx"]),
    "export an export": (
        lambda w: _ex(_at(w, w.published), "ckpt=export/e", "format=onnx"),
        ["export/e@v001 is already an export (onnx)", "export finetune/c@v001 instead"],
    ),
    "export a missing checkpoint": (lambda w: _ex(w, "ckpt=finetune/ghost"), ["ckpt", "finetune/ghost"]),
    # serve
    "serve an encoder": (lambda w: _sv(w, f"ckpt={w.bases['enc']}"), ["is a mlm checkpoint", "serve takes causal LMs"]),
    "serve on a port that does not exist": (
        lambda w: _sv(w, f"ckpt={w.bases['gpt']}", "port=70000"),
        ["port=70000", "at most 65535"],
    ),
    "serve on an address the machine does not have": (
        lambda w: _sv(w, f"ckpt={w.bases['gpt']}", "host=203.0.113.7"),
        ["host=203.0.113.7", "cannot listen there", "host=127.0.0.1"],
    ),
    "serve max_batch=0": (lambda w: _sv(w, f"ckpt={w.bases['gpt']}", "max_batch=0"), ["max_batch=0"]),
    # ckpt
    "ckpt list of a missing root": (
        lambda w: ["ckpt", "list", "-o", str(w.out / "typo")],
        ["no checkpoint store", "typo"],
    ),
    "ckpt show of a missing ref": (
        lambda w: ["ckpt", "show", "pretrain/nope", "-o", str(w.published)],
        ["pretrain/nope"],
    ),
    "ckpt rm a parent without --yes": (
        lambda w: ["ckpt", "rm", "pretrain/p@all", "-o", str(w.published)],
        ["pretrain/p@all", "--yes"],
    ),
    "ckpt gc --older-than=soon": (
        lambda w: ["ckpt", "gc", "--older-than", "soon", "-o", str(w.published)],
        ["--older-than", "90s"],
    ),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory, bases) -> Path:
    d = tmp_path_factory.mktemp("bad")
    (d / "latin1.txt").write_bytes("The café in Zürich opened on Tuesday.\n".encode("latin-1") * 20)
    (d / "latin1.csv").write_bytes(("text,label\n" + "Crème brûlée for the team,sport\n" * 20).encode("latin-1"))
    (d / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (d / "header.csv").write_text("text,label\n")
    (d / "empty.txt").write_text("\n  \n")
    (d / "broken.jsonl").write_text('{"text": "a fine line"}\n{"text": "cut off\n')
    (d / "utf16.txt").write_text("The café opened on Tuesday.\n" * 20, encoding="utf-16")
    pickled = d / "pickled"  # an HF folder as older tools wrote it: config, tokenizer, a pickled .bin
    shutil.copytree(bases["enc"], pickled, ignore=shutil.ignore_patterns("*.safetensors", "llmctl.json"))
    (pickled / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not unpickled")
    readonly = d / "readonly"  # a folder nobody may write in (root may write anywhere but /sys)
    if os.geteuid() == 0:
        readonly.symlink_to("/sys")
    else:
        readonly.mkdir()
        readonly.chmod(0o555)
    trunc = d / "truncated"
    shutil.copytree(bases["enc"], trunc)
    weights = trunc / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (trunc / "llmctl.json").unlink()  # a plain HF folder: no manifest hash to check, the file itself is damaged
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(bases["gpt"])  # a tiny Llama with grouped-query attention: 6 heads in 3 groups
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=48,
            num_hidden_layers=1,
            num_attention_heads=6,
            num_key_value_heads=3,
            head_dim=8,
            intermediate_size=64,
        )
    ).save_pretrained(d / "llama")
    tok.save_pretrained(d / "llama")
    return d


@pytest.fixture(scope="module")
def published(tmp_path_factory, corpus, bases, reviews) -> Path:
    """pretrain/p@v001 whose weights were then overwritten in place (same size), and a child of it."""
    root = tmp_path_factory.mktemp("published")
    assert run_inprocess("pretrain", *tiny("clm", corpus, root, "name=p", "train.max_steps=2"))[0] == 0
    code, err = run_inprocess(
        "finetune", *cls_args(bases, reviews, root, f"init_from={bases['enc']}", "name=c", "train.max_steps=2")
    )
    assert code == 0, err
    store = Store(root)
    manifest = store.resolve("finetune/c").path / "llmctl.json"
    record = json.loads(manifest.read_text())
    record["parents"][0].update(ref="pretrain/p@v001", path=str(store.resolve("pretrain/p").path))  # c descends from p
    manifest.write_text(json.dumps(record))
    quantized = root / "q-draft"  # a stand-in for quantize's output: an artifact record naming its quantization
    shutil.copytree(store.resolve("finetune/c").path, quantized)
    record = json.loads((quantized / "llmctl.json").read_text())
    record["artifact"] = {"format": "hf", "quantization": {"method": "int8-dynamic"}}
    record["parents"] = [{"role": "init", "ref": "finetune/c@v001", "path": str(store.resolve("finetune/c").path)}]
    store.publish(quantized, "quantize", "q", record)
    exported = root / "e-draft"  # a stand-in for an ONNX export of finetune/c
    shutil.copytree(store.resolve("finetune/c").path, exported)
    record = json.loads((exported / "llmctl.json").read_text())
    record["artifact"] = {"format": "onnx", "files": ["model.onnx"]}
    record["parents"] = [{"role": "export", "ref": "finetune/c@v001", "path": str(store.resolve("finetune/c").path)}]
    store.publish(exported, "export", "e", record)
    weights = store.resolve("pretrain/p").path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x00\xc0\x7f"  # the last weight set to NaN: same size, loads fine, trains to nan
    weights.write_bytes(bytes(data))
    return root


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, corpus) -> Path:
    """A store with pretrain/r stopped by SIGTERM at step 4 (resumable, never published)."""
    root = tmp_path_factory.mktemp("interrupted")
    real = Trainer._optimizer_step

    def step(self, batches, accum):
        if self.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batches, accum)

    Trainer._optimizer_step = step
    try:
        code, err = run_inprocess("pretrain", *tiny("clm", corpus, root, "name=r"))
    finally:
        Trainer._optimizer_step = real
    assert code == 143, err
    assert len(Store(root).resumable_runs("pretrain", "r")) == 1
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path in the store with its size and mtime, except the shared cache (lock files: only that they exist)."""
    if not root.is_dir():
        return {".": (root.stat().st_size, root.stat().st_mtime_ns)} if root.exists() else {}
    return {
        str(p.relative_to(root)): (0, 0) if p.name.endswith(".lock") else (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if ".cache" not in p.relative_to(root).parts
    }  # a lock file holds the pid of whoever looked


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    case, tmp_path, files, corpus, bases, reviews, interrupted, published
):
    build, fragments = CASES[case]
    stores = {"interrupted": tmp_path / "interrupted", "published": tmp_path / "published"}
    shutil.copytree(interrupted, stores["interrupted"])
    shutil.copytree(published, stores["published"])
    w = World(out=tmp_path / "out", files=files, corpus=corpus, bases=bases, reviews=reviews, **stores)
    args = build(w)
    before = {name: snapshot(path) for name, path in [("out", w.out), *stores.items()]}
    result = CliRunner().invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), f"{case}: {result.exception!r}"
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, f"{case}: exit {result.exit_code}; stderr: {result.stderr}"
    assert len(lines) == 1 and lines[0].startswith("llmctl: error: "), f"{case}: {result.stderr}"
    for fragment in fragments:
        assert fragment in lines[0], f"{case}: {fragment!r} not in {lines[0]!r}"
    after = {name: snapshot(path) for name, path in [("out", w.out), *stores.items()]}
    assert after == before, f"{case}: the store changed"
