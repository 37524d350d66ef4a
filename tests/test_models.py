"""core/models.py: models users bring. A Hugging Face hub id works wherever a model is named (resolved through the
HF cache: offline, what is cached), and the Llama-layout families (Qwen2, Qwen3, Mistral) go through build, prune,
distill, LoRA and quantize like Llama."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import run_cli, run_inprocess
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llmctl.core.store import Store

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _tiny(family: str, vocab: int):
    torch.manual_seed(0)
    shapes = {
        "vocab_size": vocab,
        "hidden_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 3,
        "intermediate_size": 64,
        "max_position_embeddings": 256,
    }
    if family == "qwen3":
        shapes["head_dim"] = 8
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **shapes))


@pytest.fixture(scope="module")
def hub_cache(bases, tmp_path_factory):
    """A Hugging Face cache holding one hub model, laid out as huggingface_hub writes it."""
    cache = tmp_path_factory.mktemp("hf-cache")
    repo = cache / "models--llmctl-test--tiny-qwen"
    snapshot = repo / "snapshots" / COMMIT
    _tiny("qwen2", len(AutoTokenizer.from_pretrained(bases["gpt"]))).save_pretrained(snapshot)
    AutoTokenizer.from_pretrained(bases["gpt"]).save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


def test_a_hub_id_is_a_model_anywhere_a_model_is_named(hub_cache, tmp_path):
    env = {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    common = ["precision=fp32", f"output_root={tmp_path}"]
    out = run_cli("generate", "ckpt=llmctl-test/tiny-qwen", "prompt=The bank", "max_new_tokens=4", *common, env=env)
    assert out.returncode == 0, out.stderr
    out = run_cli(
        "finetune",
        "model=llmctl-test/tiny-qwen",
        "task=sft",
        "data=tiny-instruct",
        "train.max_steps=2",
        "train.batch_size=4",
        "sft.num_samples=0",
        *common,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    (name,) = [p.name for p in (tmp_path / "finetune").iterdir()]
    manifest = Store(tmp_path).resolve(f"finetune/{name}").manifest
    assert name == "tiny-qwen-sft" and manifest["parents"][0]["ref"] == "llmctl-test/tiny-qwen"
    out = run_cli("eval", "ckpt=[llmctl-test/tiny-qwen]", "data=tiny-instruct", "cost=off", *common, env=env)
    assert out.returncode == 0 and "sft" in out.stdout, out.stderr
    missing = run_cli("eval", "ckpt=llmctl-test/not-cached", "data=tiny-instruct", *common, env=env)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "not in the Hugging Face cache" in missing.stderr and "HF_HUB_OFFLINE" in missing.stderr


def test_offline_true_turns_the_hugging_face_libraries_offline_before_they_load(tmp_path):
    """`offline=true` on the command line (no HF_*_OFFLINE in the environment): a hub id that is not cached fails at
    once as an offline miss (the libraries never try the network), and the stage sees every switch set."""
    env = {"HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": "", "TRANSFORMERS_OFFLINE": "", "HF_HUB_CACHE": str(tmp_path)}
    common = ["data=tiny-instruct", "precision=fp32", f"output_root={tmp_path}"]
    out = run_cli("eval", "ckpt=llmctl-test/not-cached", "offline=true", *common, env=env)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "not in the Hugging Face cache" in out.stderr and "HF_HUB_OFFLINE is set" in out.stderr
    probe = (
        "import sys, llmctl.core.offline as o; from llmctl.cli import run_stage; import huggingface_hub.constants as c;"
        "o.go_offline(); print(c.HF_HUB_OFFLINE, o.is_offline())"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ, **env})
    assert done.stdout.split() == ["True", "True"], done.stderr  # a library loaded before is switched too


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_llama_layout_families_prune_distill_lora_and_quantize(family, bases, corpus, tmp_path):
    folder = tmp_path / family
    _tiny(family, len(AutoTokenizer.from_pretrained(bases["gpt"]))).save_pretrained(folder)
    AutoTokenizer.from_pretrained(bases["gpt"]).save_pretrained(folder)
    data = ["data=files", f"data.train={corpus}", "data.max_seq_len=32"]
    short = ["train.max_steps=2", "train.batch_size=4", "precision=fp32", f"output_root={tmp_path}", "cost=off"]
    runs = {
        "prune": (
            "prune",
            f"init_from={folder}",
            "method=structured",
            "prune.heads=2",
            "prune.ffn=0.25",
            *data,
            *short,
        ),
        "distill": ("distill", f"teacher={folder}", "student.num_layers=1", *data, *short),
        "quantize": ("quantize", f"init_from={folder}", "method=int8-weight", *data, *short),
        "lora": (
            "finetune",
            f"init_from={folder}",
            "task=sft",
            "data=tiny-instruct",
            "method=lora",
            "name=lora",
            "sft.num_samples=0",
            *short[:-1],
        ),
    }
    for stage, args in runs.items():
        code, err = run_inprocess(*args)
        assert code == 0, f"{family} {stage}: {err}"
    store = Store(tmp_path)
    pruned = AutoModelForCausalLM.from_pretrained(store.resolve(f"prune/{family}").path)  # plain from_pretrained
    assert pruned.config.num_attention_heads == 4 and pruned.config.num_key_value_heads == 2
    assert pruned.config.intermediate_size == 48 and pruned.config.model_type == family
    student = json.loads((store.resolve(f"distill/{family}").path / "config.json").read_text())
    assert student["num_hidden_layers"] == 1 and student["model_type"] == family
    lora = store.resolve("finetune/lora")
    assert (lora.path / "adapter" / "adapter_config.json").is_file()
    assert set(json.loads((lora.path / "adapter" / "adapter_config.json").read_text())["target_modules"]) == {
        "q_proj",
        "v_proj",
    }
    assert store.resolve(f"quantize/{family}").manifest["artifact"]["quantization"]["linear"]


def test_a_family_llmctl_cannot_reshape_is_one_line_naming_those_it_can(bases, corpus, tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tok = AutoTokenizer.from_pretrained(bases["gpt"])
    GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
        )
    ).save_pretrained(tmp_path / "neox")
    tok.save_pretrained(tmp_path / "neox")
    code, err = run_inprocess(
        "prune",
        f"init_from={tmp_path / 'neox'}",
        "method=structured",
        "data=files",
        f"data.train={corpus}",
        "precision=fp32",
        f"output_root={tmp_path}",
    )
    assert code == 2 and "the gpt_neox family is not supported" in err and "qwen2, qwen3, mistral" in err
    assert os.path.isdir(tmp_path) and not (tmp_path / "prune").exists()
