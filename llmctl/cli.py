"""The `llmctl` command: stage subcommands handed to Hydra, and `llmctl ckpt` over the store.

Only dispatch lives here. Importing this module pulls neither torch nor transformers, so
`llmctl --help` and `llmctl ckpt ...` start fast; a stage module is imported when it runs.

The stage contract (see `llmctl.stages.Stage`): a module `llmctl/stages/<stage>.py` whose
docstring is its `--help` and whose `run(cfg) -> float | None` takes the composed config and
returns the objective value that sweepers optimise (None on non-zero ranks). A config root
`conf/<stage>.yaml` goes with it.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile

import typer

from llmctl import STAGES
from llmctl.core.errors import LlmctlError

app = typer.Typer(
    help="A config-driven pipeline for language models: pretrain → finetune → distill → prune → quantize → eval → generate.\n\n"
    "Every stage takes Hydra overrides (key=value), -m/--multirun sweeps, --cfg job, and its own --help.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
ckpt_app = typer.Typer(help="Inspect the versioned checkpoint store.", no_args_is_help=True)
app.add_typer(ckpt_app, name="ckpt")

_STAGE_HELP = {
    "pretrain": "Pre-train BERT (MLM, MLM+NSP) or GPT (causal LM) on a corpus.",
    "finetune": "Fine-tune for classification, NER or chat SFT (full, frozen layers, LoRA).",
    "distill": "Distil a teacher checkpoint into a smaller student.",
    "prune": "Prune a checkpoint (unstructured, structured, layers).",
    "quantize": "Quantize a checkpoint (int8 dynamic, weight-only, QAT).",
    "eval": "Evaluate and compare checkpoints.",
    "generate": "Generate text from a causal-LM checkpoint.",
}


def _fail(e: LlmctlError) -> None:
    print(f"llmctl: error: {e}", file=sys.stderr)
    raise typer.Exit(e.exit_code)


def run_stage(stage: str, args: list[str]) -> None:
    """`llmctl <stage> <args>`: the stage's `run` as a Hydra job. Raises LlmctlError on bad input."""
    from llmctl.core.config import run_with_hydra
    from llmctl.stages import Stage

    module = importlib.import_module(f"llmctl.stages.{stage}")
    assert isinstance(module, Stage), f"llmctl.stages.{stage} does not follow the stage contract"

    def job(cfg):
        from llmctl.core.device import gpu_ids

        ids = gpu_ids(cfg.device)
        if ids and len(ids) > 1 and "WORLD_SIZE" not in os.environ:
            return _run_under_torchrun(stage, ids)
        return module.run(cfg)

    run_with_hydra(stage, args, job, doc=module.__doc__ or "")


def _run_under_torchrun(stage: str, ids: list[int]) -> float | None:
    """device=[0,1,...]: this job as one process per GPU, on exactly those GPUs; returns the objective
    rank 0 published, so sweepers see it."""
    import subprocess

    from llmctl.core.config import job_overrides
    from llmctl.core.device import torchrun_command
    from llmctl.core.run import RESULT_FILE_ENV

    overrides, config_dirs = job_overrides()
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, ids)), RESULT_FILE_ENV: result}
        code = subprocess.call(torchrun_command(stage, ids, overrides, config_dirs), env=env)
        if code != 0:
            raise LlmctlError(f"the {len(ids)}-process torchrun job exited with status {code} (its own error is printed above)")
        return json.load(open(result)).get("objective") if os.path.exists(result) else None


def _stage_command(stage: str):
    def command(ctx: typer.Context) -> None:
        try:
            run_stage(stage, list(ctx.args))
        except LlmctlError as e:
            _fail(e)

    command.__doc__ = _STAGE_HELP[stage] + " Arguments go to Hydra: `llmctl " + stage + " --help` for the config."
    return command


for _stage in STAGES:
    app.command(
        _stage,
        help=_STAGE_HELP[_stage],
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    )(_stage_command(_stage))


def _console():
    """A rich console; when piped, wide enough that tables are not folded (scripts read them)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=220)


def _store(output_root: str):
    from llmctl.core.store import Store

    return Store(output_root)


ROOT_OPT = typer.Option("outputs", "--output-root", "-o", help="Checkpoint store root.")


@ckpt_app.command("list")
def ckpt_list(output_root: str = ROOT_OPT, stage: str = typer.Option(None, help="Only this stage.")) -> None:
    """Every complete version: reference, kind, objective, parameters, size, parent."""
    from rich.table import Table

    from llmctl.core.store import age, folder_size

    store = _store(output_root)
    table = Table(title=f"checkpoints in {store.root}/")
    table.add_column("ref", no_wrap=True)  # scripts grep for refs: never fold them
    for col in ("kind", "objective", "params", "size", "created", "parent"):
        table.add_column(col, overflow="fold")
    for st, name, v, m in store.entries():
        if stage and st != stage:
            continue
        latest = store.latest_version(st, name) == v
        obj = m.get("objective") or {}
        value = obj.get("value")
        parent = (m.get("parents") or [{}])[0].get("ref", "")
        table.add_row(
            f"{st}/{name}@v{v:03d}" + (" (latest)" if latest else ""),
            m.get("kind", "?"),
            f"{obj.get('metric')}={value:.4g}" if isinstance(value, (int, float)) else "",
            f"{m.get('model', {}).get('parameters', 0) / 1e6:.2f}M",
            f"{folder_size(store.name_dir(st, name) / f'v{v:03d}') / 2**20:.1f} MiB",
            age(m.get("created")),
            parent,
        )
    _console().print(table)


@ckpt_app.command("show")
def ckpt_show(ref: str, output_root: str = ROOT_OPT, as_json: bool = typer.Option(False, "--json", help="Print the raw manifest.")) -> None:
    """One checkpoint's manifest: kind, metrics, parents, data, config."""
    from rich.table import Table

    try:
        res = _store(output_root).resolve(ref)
    except LlmctlError as e:
        _fail(e)
    m = res.manifest or {}
    if as_json:
        print(json.dumps(m, indent=2))
        return
    console = _console()
    table = Table(title=res.ref, show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("path", str(res.path))
    for key in ("kind", "created", "command"):
        table.add_row(key, str(m.get(key, "")))
    task = m.get("task") or {}
    if task.get("name"):
        objective = task.get("objective") or {}
        labels = f" · {len(task['labels'])} labels" if task.get("labels") else ""
        table.add_row("task", f"{task['name']} · {objective.get('metric')} ({objective.get('mode')}){labels} · max_seq_len {task.get('max_seq_len')}")
    for p in m.get("parents", []):
        table.add_row(f"parent ({p.get('role')})", f"{p.get('ref')}  sha256={str(p.get('weights_sha256'))[:16]}…")
    for key, value in (m.get("metrics") or {}).items():
        table.add_row(f"metric {key}", f"{value:.6g}" if isinstance(value, float) else str(value))
    for key, value in (m.get("model") or {}).items():
        table.add_row(f"model {key}", str(value))
    for key, value in (m.get("data") or {}).items():
        table.add_row(f"data {key}", str(value))
    for key, value in (m.get("runtime") or {}).items():
        table.add_row(f"runtime {key}", str(value))
    table.add_row("weights sha256", str(m.get("weights_sha256")))
    table.add_row("libraries", ", ".join(f"{k} {v}" for k, v in (m.get("libraries") or {}).items()))
    console.print(table)


@ckpt_app.command("lineage")
def ckpt_lineage(ref: str, output_root: str = ROOT_OPT) -> None:
    """The chain of checkpoints this one descends from."""
    from rich.tree import Tree

    try:
        chain = _store(output_root).lineage(ref)
    except LlmctlError as e:
        _fail(e)
    root = node = Tree(f"[bold]{chain[0].ref}[/] ({chain[0].kind})")
    for item in chain[1:]:
        node = node.add(f"[bold]{item.ref}[/] ({item.kind or 'external'})")
    _console().print(root)


@ckpt_app.command("rm")
def ckpt_rm(ref: str = typer.Argument(..., help="<stage>/<name>@vN, or <stage>/<name>@all"), output_root: str = ROOT_OPT) -> None:
    """Delete a version (or every version of a name); `latest` moves to the newest left."""
    try:
        for removed in _store(output_root).remove(ref):
            print(f"removed {removed}")
    except LlmctlError as e:
        _fail(e)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
