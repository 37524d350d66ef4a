"""The `llmctl` command: start-up cost, dispatch to Hydra, stubs, and one-line errors."""

import subprocess
import sys

from conftest import REPO, run_cli

from llmctl import STAGES


def test_help_lists_every_stage_without_importing_torch():
    probe = "import sys, llmctl.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=REPO)
    out = run_cli("--help")
    assert out.returncode == 0
    for stage in (*STAGES, "ckpt"):
        assert stage in out.stdout


def test_stage_help_shows_description_and_hydra_help():
    out = run_cli("pretrain", "--help")
    assert out.returncode == 0
    assert "llmctl pretrain" in out.stdout and "Objectives" in out.stdout  # the stage's own description
    assert "Powered by Hydra" in out.stdout  # Hydra's help follows


def test_cfg_job_prints_config_and_writes_nothing(tmp_path):
    out = run_cli("pretrain", "conf=bert-base", f"output_root={tmp_path / 'o'}", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "objective: mlm+nsp" in out.stdout and "hidden_size: 768" in out.stdout
    assert not (tmp_path / "o").exists()


def test_unbuilt_stages_say_so_and_fail():
    for stage in ("distill", "prune", "quantize", "eval", "generate"):
        out = run_cli(stage)
        assert out.returncode != 0
        assert "not built yet" in out.stderr
        assert out.stdout.strip() == ""


def test_unknown_key_is_one_line_with_suggestion(tmp_path):
    out = run_cli("pretrain", "train.lrr=1", f"output_root={tmp_path}")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.lrr" in lines[0] and "did you mean train.lr" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_unknown_preset_lists_the_available_ones():
    out = run_cli("pretrain", "conf=bert-huge")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "conf=bert-huge" in out.stderr and "bert-base" in out.stderr and "gpt2-small" in out.stderr


def test_private_presets_from_a_user_config_dir(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "my-gpt.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: gpt-tiny\nobjective: clm\ntrain:\n  lr: 0.0123\n")
    out = run_cli("pretrain", "--config-dir", str(tmp_path), "conf=my-gpt", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "lr: 0.0123" in out.stdout and "family: gpt2" in out.stdout


def test_a_required_key_left_unset_is_named(tmp_path):
    out = run_cli("pretrain", "data=files", f"output_root={tmp_path}")
    assert out.returncode == 2
    line = out.stderr.strip()
    assert "\n" not in line and line.startswith("llmctl: error:") and "data.train=" in line


def test_core_never_imports_a_stage_and_no_stage_imports_another():
    import importlib
    import re

    from llmctl.stages import Stage

    for path in (REPO / "llmctl" / "core").glob("*.py"):
        assert "llmctl.stages" not in path.read_text(), f"{path.name} imports a stage"
    for stage in STAGES:
        text = (REPO / "llmctl" / "stages" / f"{stage}.py").read_text()
        others = [s for s in STAGES if s != stage and re.search(rf"llmctl\.stages\.{s}\b|from llmctl\.stages import {s}\b", text)]
        assert not others, f"stages/{stage}.py imports {others}"
        assert isinstance(importlib.import_module(f"llmctl.stages.{stage}"), Stage)  # the contract: run(cfg) and a docstring
