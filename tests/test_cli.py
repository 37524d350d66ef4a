"""The `llmctl` command: start-up cost, dispatch to Hydra, stubs, and one-line errors."""

import subprocess
import sys

import pytest
from conftest import REPO, run_cli

from llmctl import STAGES


def test_help_lists_every_stage_without_importing_torch():
    probe = (
        "import sys, contextlib, io, llmctl.cli; sys.argv = ['llmctl', '--help']\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()): llmctl.cli.main()\n"
        "heavy = {'torch', 'transformers', 'fastapi', 'uvicorn', 'onnx', 'onnxruntime', 'gguf', 'lm_eval'}\n"
        "assert not heavy & set(sys.modules), heavy & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=REPO)
    out = run_cli("--help")
    assert out.returncode == 0
    for stage in (*STAGES, "ckpt"):
        assert stage in out.stdout


def test_stage_help_shows_description_and_hydra_help():
    out = run_cli("pretrain", "--help")
    assert out.returncode == 0
    assert "llmctl pretrain" in out.stdout and "Objectives" in out.stdout  # the stage's own description
    assert "Powered by Hydra" in run_cli("pretrain", "--hydra-help").stdout  # Hydra's own help, on request


def test_cfg_job_prints_config_and_writes_nothing(tmp_path):
    out = run_cli("pretrain", "conf=bert-base", f"output_root={tmp_path / 'o'}", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "objective: mlm+nsp" in out.stdout and "hidden_size: 768" in out.stdout
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "stage, key", [("eval", "ckpt"), ("distill", "teacher"), ("prune", "init_from"), ("quantize", "init_from")]
)
def test_a_stage_without_its_input_names_the_key(tmp_path, stage, key):
    out = run_cli(stage, f"output_root={tmp_path}")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and key in out.stderr, out.stderr


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
        "# @package _global_\ndefaults:\n  - override /model: gpt-tiny\nobjective: clm\ntrain:\n  lr: 0.0123\n"
    )
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

    for path in (REPO / "llmctl" / "core").rglob("*.py"):
        assert "llmctl.stages" not in path.read_text(), f"{path.name} imports a stage"
    for stage in STAGES:
        text = (REPO / "llmctl" / "stages" / f"{stage}.py").read_text()
        others = [
            s
            for s in STAGES
            if s != stage and re.search(rf"llmctl\.stages\.{s}\b|from llmctl\.stages import {s}\b", text)
        ]
        assert not others, f"stages/{stage}.py imports {others}"
        assert isinstance(
            importlib.import_module(f"llmctl.stages.{stage}"), Stage
        )  # the contract: run(cfg) and a docstring


def _imports() -> dict[str, set[str]]:
    """Each llmctl module → the llmctl modules it imports, at the top or inside a function."""
    import ast

    modules = {}
    for path in (REPO / "llmctl").rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path

    def known(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmctl"):
                found |= {known(node.module), *(known(f"{node.module}.{a.name}") for a in node.names)}
            elif isinstance(node, ast.Import):
                found |= {known(a.name) for a in node.names if a.name.startswith("llmctl")}
        graph[name] = {m for m in found if m and m != name and not name.startswith(m + ".")}
    return graph


def test_no_import_cycles_not_even_through_function_bodies():
    """A lazy import is for start-up time, never to hide a cycle: the graph of every import is acyclic."""
    graph = _imports()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " → ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_ckpt_runs_and_gc_dry_run_by_default(tmp_path):
    from llmctl.core.store import Store

    dead = Store(tmp_path).new_run_dir("pretrain", "x")
    out = run_cli("ckpt", "runs", "-o", str(tmp_path))
    assert out.returncode == 0 and dead.name in out.stdout and "not resumable" in out.stdout
    out = run_cli("ckpt", "gc", "-o", str(tmp_path))
    assert out.returncode == 0 and "would remove" in out.stdout and dead.exists()
    out = run_cli("ckpt", "gc", "--yes", "-o", str(tmp_path))
    assert out.returncode == 0 and "removed" in out.stdout and not dead.exists()


def test_ckpt_rm_of_a_parent_asks_unless_yes(tmp_path):
    from llmctl.core.store import Store, parent_entry

    store = Store(tmp_path)
    a = store.publish(_run(store, "pretrain", "a"), "pretrain", "a", {"kind": "mlm"})
    store.publish(
        _run(store, "finetune", "b"), "finetune", "b", {"kind": "seq-cls", "parents": [parent_entry(a, "init")]}
    )
    out = run_cli("ckpt", "rm", "pretrain/a@all", "-o", str(tmp_path))  # not a terminal: refused, one line
    assert out.returncode == 2 and "finetune/b@v001" in out.stderr and "--yes" in out.stderr
    assert store.versions("pretrain", "a") == [1]
    out = run_cli("ckpt", "rm", "pretrain/a@all", "--yes", "-o", str(tmp_path))
    assert out.returncode == 0 and store.versions("pretrain", "a") == []
    out = run_cli("ckpt", "lineage", "finetune/b", "-o", str(tmp_path))
    assert "pretrain/a@v001 (mlm, removed)" in out.stdout


def _run(store, stage, name):
    run = store.new_run_dir(stage, name)
    (run / "model.safetensors").write_bytes(b"w")
    (run / "config.json").write_text("{}")
    return run


def test_ckpt_list_fits_80_columns_and_wide_shows_everything(tmp_path):
    from llmctl.core.store import Store

    store = Store(tmp_path)
    for name in ("a-rather-long-checkpoint-name", "b"):
        store.publish(
            _run(store, "pretrain", name),
            "pretrain",
            name,
            {
                "kind": "mlm",
                "objective": {"metric": "eval/loss", "mode": "min", "value": 6.25},
                "model": {"parameters": 1_500_000},
                "parents": [{"ref": "packaged/minilm-l6@v001"}],
            },
        )
    narrow = run_cli("ckpt", "list", "-o", str(tmp_path), env={"COLUMNS": "80"})
    assert narrow.returncode == 0, narrow.stderr
    assert max(map(len, narrow.stdout.splitlines())) <= 80
    assert "pretrain/a-rather-long-checkpoint-name@v001" in narrow.stdout and "--wide" in narrow.stdout
    wide = run_cli("ckpt", "list", "--wide", "-o", str(tmp_path), env={"COLUMNS": "80"})
    assert "parent" in wide.stdout and "params" in wide.stdout


def test_stage_help_lists_only_its_own_groups_and_every_knob_with_its_comment():
    out = run_cli("pretrain", "--help")
    assert out.returncode == 0, out.stderr
    assert "conf: bert-base, bert-tiny (default)" in out.stdout and "method:" not in out.stdout
    assert "lr: 0.003  # peak learning rate (AdamW)" in out.stdout  # the bert-tiny preset's value, the knob's comment
    out = run_cli("finetune", "--help")
    assert "method: freeze, full (default), lora" in out.stdout and "conf:" not in out.stdout
    assert (
        "method: layers, magnitude (default), structured" in run_cli("prune", "--help").stdout
    )  # one group, each stage its own options
    assert "method: auto, int4-weight, int8-dynamic (default), int8-weight, qat" in run_cli("quantize", "--help").stdout
    out = run_cli("finetune", "--cfg", "job", "method=lora")
    assert "r: 8  # adapter rank" in out.stdout and "lr: 0.001  # learning rate for LoRA" in out.stdout


def test_a_damaged_manifest_is_listed_shown_and_removable_and_locks_up_nothing(tmp_path):
    """One manifest that is not valid JSON broke list, show, lineage, eval and even rm (a traceback each)."""
    from llmctl.core.store import Store, parent_entry

    store = Store(tmp_path)
    a = store.publish(_run(store, "pretrain", "a"), "pretrain", "a", {"kind": "mlm"})
    store.publish(
        _run(store, "finetune", "b"), "finetune", "b", {"kind": "seq-cls", "parents": [parent_entry(a, "init")]}
    )
    (a.path / "llmctl.json").write_text('{"kind": "mlm", "parents": [')  # cut off mid-write
    listed = run_cli("ckpt", "list", "-o", str(tmp_path))
    assert listed.returncode == 0 and "damaged" in listed.stdout and "finetune/b@v001" in listed.stdout
    shown = run_cli("ckpt", "show", "pretrain/a", "-o", str(tmp_path))
    assert shown.returncode == 0 and "not valid JSON" in shown.stdout and "ckpt rm pretrain/a@v001" in shown.stdout
    lineage = run_cli("ckpt", "lineage", "finetune/b", "-o", str(tmp_path))
    assert lineage.returncode == 0 and "pretrain/a@v001 (damaged" in lineage.stdout
    judged = run_cli("eval", "ckpt=pretrain/a", f"output_root={tmp_path}")
    assert judged.returncode == 2 and judged.stderr.count("\n") == 1 and "not valid JSON" in judged.stderr
    removed = run_cli("ckpt", "rm", "pretrain/a@v001", "--yes", "-o", str(tmp_path))
    assert removed.returncode == 0 and store.versions("pretrain", "a") == []


def test_ckpt_show_says_when_the_weights_no_longer_match(tmp_path):
    from llmctl.core.store import Store, weights_sha256

    store = Store(tmp_path)
    run = _run(store, "pretrain", "a")
    a = store.publish(run, "pretrain", "a", {"kind": "mlm", "weights_sha256": weights_sha256(run)})
    assert "(the files match)" in run_cli("ckpt", "show", "pretrain/a", "-o", str(tmp_path)).stdout
    (a.path / "model.safetensors").write_bytes(b"x")
    assert "no longer match" in run_cli("ckpt", "show", "pretrain/a", "-o", str(tmp_path)).stdout
