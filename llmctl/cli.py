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
from pathlib import Path

import typer

from llmctl import STAGES
from llmctl.core.errors import LlmctlError

app = typer.Typer(
    help="A config-driven pipeline for language models: "
    "pretrain → finetune → distill → prune → quantize → export → eval → generate → serve.\n\n"
    "Every stage takes Hydra overrides (key=value), -m/--multirun sweeps, --cfg job, and its own --help.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
ckpt_app = typer.Typer(help="Inspect the versioned checkpoint store.", no_args_is_help=True)
app.add_typer(ckpt_app, name="ckpt")


def stage_summary(stage: str) -> str:
    """The first paragraph of a stage module's docstring (its one source of help), read without importing it
    (stage modules import torch; `llmctl --help` must not)."""
    import ast
    import importlib.util

    origin = importlib.util.find_spec(f"llmctl.stages.{stage}").origin
    doc = ast.get_docstring(ast.parse(Path(origin).read_text(encoding="utf-8"))) or stage
    first = " ".join(doc.split("\n\n")[0].split())
    first = first.split(" — ", 1)[1] if " — " in first else first
    return first[:1].upper() + first[1:]


def _fail(e: LlmctlError) -> None:
    print(f"llmctl: error: {e}", file=sys.stderr)
    raise typer.Exit(e.exit_code)


def run_stage(stage: str, args: list[str]) -> None:
    """`llmctl <stage> <args>`: the stage's `run` as a Hydra job. Raises LlmctlError on bad input."""
    from llmctl.core import offline

    if offline.requested(args):  # before the stage module (and the Hugging Face libraries it pulls in) loads
        offline.go_offline()
    from llmctl.core.config import run_with_hydra
    from llmctl.stages import Stage

    module = importlib.import_module(f"llmctl.stages.{stage}")
    assert isinstance(module, Stage), f"llmctl.stages.{stage} does not follow the stage contract"

    def checked(cfg):
        from llmctl.core.schema import StageConfig, validate

        validate(cfg, getattr(module, "Config", StageConfig))  # every value typed and in range, before anything runs
        return cfg

    def job(cfg):
        import torch
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from llmctl.core.device import gpu_ids, join_scheduler_tasks, parallel_job_device

        checked(cfg)
        join_scheduler_tasks()  # a task of a multi-task submitit job becomes a torchrun-style rank
        hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
        if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN:  # parallel sweep jobs: a GPU each
            launcher = hydra_cfg.runtime.choices.get("hydra/launcher")
            cfg.device = parallel_job_device(cfg.device, launcher, int(hydra_cfg.job.num), torch.cuda.device_count())
        if cfg.get("offline"):  # (set by a preset or config file: read after the libraries loaded)
            offline.go_offline()
        ids = gpu_ids(cfg.device)
        if ids and len(ids) > 1 and "WORLD_SIZE" not in os.environ:
            return _run_under_torchrun(stage, ids)
        return module.run(cfg)

    def objective(cfg):
        """What an Optuna sweep of this stage optimises: [(metric, "min" | "max"), ...] (the stage's objective, or
        the config's `objectives`), None when the stage returns nothing."""
        from llmctl.core.run import resolve_objectives

        found = module.objective(checked(cfg)) if hasattr(module, "objective") else None
        return None if found is None else resolve_objectives(cfg) or [found]

    run_with_hydra(stage, args, job, doc=module.__doc__ or "", objective=objective)


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
            raise LlmctlError(
                f"the {len(ids)}-process torchrun job exited with status {code} (its own error is printed above)"
            )
        return json.load(open(result)).get("objective") if os.path.exists(result) else None


def _stage_command(stage: str):
    def command(ctx: typer.Context) -> None:
        try:
            run_stage(stage, list(ctx.args))
        except LlmctlError as e:
            _fail(e)

    command.__doc__ = stage_summary(stage) + " Arguments go to Hydra: `llmctl " + stage + " --help` for the config."
    return command


for _stage in STAGES:
    app.command(
        _stage,
        help=stage_summary(_stage),
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    )(_stage_command(_stage))


def _console():
    """A rich console; when piped (and COLUMNS unset), wide enough that tables are not folded (scripts read them)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() or os.environ.get("COLUMNS") else Console(width=220)


def _store(output_root: str, *, must_exist: bool = True):
    from llmctl.core.store import Store

    return Store(output_root, must_exist=must_exist)


ROOT_OPT = typer.Option("outputs", "--output-root", "-o", help="Checkpoint store root.")


def _column_width(name: str, cells: list[str]) -> int:
    return max([len(name), *map(len, cells)]) + 3  # the cells plus rich's padding and border


def _fit(columns: list[tuple[str, list[str]]], width: int, wide: bool) -> list[tuple[str, list[str]]]:
    """The columns that fit `width` side by side, in order of importance (the first always stays)."""
    if wide:
        return columns
    kept, used = [], 4
    for name, cells in columns:
        need = _column_width(name, cells)
        if not kept or used + need <= width:
            kept.append((name, cells))
            used += need
    return kept


@ckpt_app.command("list")
def ckpt_list(
    output_root: str = ROOT_OPT,
    stage: str = typer.Option(None, help="Only this stage."),
    wide: bool = typer.Option(
        False, "--wide", "-w", help="Every column at full width (lines may run past the terminal)."
    ),
) -> None:
    """Every complete version: reference, kind, objective, size, parameters, age, parent (as many as fit)."""
    from rich.table import Table

    from llmctl.core.store import age, folder_size

    try:
        store = _store(output_root)
        rows = [(st, name, v, m) for st, name, v, m in store.entries() if not stage or st == stage]
    except LlmctlError as e:
        _fail(e)
    cells: dict[str, list[str]] = {k: [] for k in ("ref", "kind", "objective", "size", "params", "created", "parent")}
    latest = {(st, name): store.latest_version(st, name) for st, name, _, _ in rows}  # once per name, not per version
    for st, name, v, m in rows:
        obj = m.get("objective") or {}
        value = obj.get("value")
        cells["ref"].append(f"{st}/{name}@v{v:03d}" + (" (latest)" if latest[st, name] == v else ""))
        cells["kind"].append("damaged" if m.get("damaged") else m.get("kind", "?"))
        cells["objective"].append(f"{obj.get('metric')}={value:.4g}" if isinstance(value, (int, float)) else "")
        cells["size"].append(f"{folder_size(store.name_dir(st, name) / f'v{v:03d}') / 2**20:.1f} MiB")
        cells["params"].append(f"{m.get('model', {}).get('parameters', 0) / 1e6:.2f}M")
        cells["created"].append(age(m.get("created")))
        cells["parent"].append((m.get("parents") or [{}])[0].get("ref", ""))
    console = _console()
    columns = _fit(list(cells.items()), console.width, wide)
    if wide:  # every column at full width: lines longer than the terminal rather than folded cells
        from rich.console import Console

        console = Console(width=max(console.width, 4 + sum(_column_width(n, c) for n, c in columns)))
    table = Table(
        title=f"checkpoints in {store.root}/"
        + (f" ({len(cells) - len(columns)} more columns with --wide)" if len(columns) < len(cells) else "")
    )
    for name, _ in columns:
        table.add_column(name, no_wrap=name == "ref", overflow="fold")  # scripts grep for refs: never fold them
    for i in range(len(rows)):
        table.add_row(*(col[i] for _, col in columns))
    console.print(table)


@ckpt_app.command("show")
def ckpt_show(
    ref: str, output_root: str = ROOT_OPT, as_json: bool = typer.Option(False, "--json", help="Print the raw manifest.")
) -> None:
    """One checkpoint's manifest: kind, metrics, parents, data, the overrides and training config it ran with."""
    from rich.table import Table

    try:
        res = _store(output_root, must_exist=False).resolve(ref)
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
    if m.get("damaged"):
        table.add_row("damaged", f"[red]{m['damaged']}[/]: it cannot be used; `llmctl ckpt rm {res.ref}` removes it")
        console.print(table)
        return
    for key in ("kind", "created", "command"):
        table.add_row(key, str(m.get(key, "")))
    if "overrides" in m:
        table.add_row("overrides", " ".join(m["overrides"]) or "(none: the embedded defaults)")
    task = m.get("task") or {}
    if task.get("name"):
        objective = task.get("objective") or {}
        labels = f" · {len(task['labels'])} labels" if task.get("labels") else ""
        table.add_row(
            "task",
            f"{task['name']} · {objective.get('metric')} ({objective.get('mode')}){labels} · max_seq_len "
            f"{task.get('max_seq_len')}",
        )
    for p in m.get("parents", []):
        table.add_row(f"parent ({p.get('role')})", f"{p.get('ref')}  sha256={str(p.get('weights_sha256'))[:16]}…")
    if m.get("resumed"):
        r = m["resumed"]
        table.add_row(
            "resumed",
            f"{r.get('run')} from step {r.get('from_step')}"
            + "".join(f" · {k} {a} → {b}" for k, (a, b) in (r.get("changed") or {}).items()),
        )
    for key, value in (m.get("metrics") or {}).items():
        table.add_row(f"metric {key}", f"{value:.6g}" if isinstance(value, float) else str(value))
    for key, value in (m.get("model") or {}).items():
        table.add_row(f"model {key}", str(value))
    for key, value in (m.get("data") or {}).items():
        table.add_row(f"data {key}", str(value))
    config = m.get("config") or {}
    for section in ("train", "method"):
        if isinstance(config.get(section), dict):
            table.add_row(section, " ".join(f"{k}={v}" for k, v in config[section].items()))
    for key, value in (m.get("runtime") or {}).items():
        table.add_row(f"runtime {key}", str(value))
    table.add_row("weights sha256", _weights_state(res))
    table.add_row("libraries", ", ".join(f"{k} {v}" for k, v in (m.get("libraries") or {}).items()))
    console.print(table)


def _weights_state(res) -> str:
    """The recorded weights hash, and whether the files on disk still match it (they are read now)."""
    from llmctl.core.store import verify_weights

    recorded = (res.manifest or {}).get("weights_sha256")
    try:
        verify_weights(res)
    except LlmctlError:
        return f"{recorded} [red](the files on disk no longer match it: a weights file was modified or damaged)[/]"
    return f"{recorded} (the files match)" if recorded else "not recorded"


@ckpt_app.command("lineage")
def ckpt_lineage(ref: str, output_root: str = ROOT_OPT) -> None:
    """The chain of checkpoints this one descends from."""
    from rich.tree import Tree

    try:
        chain = _store(output_root, must_exist=False).lineage(ref)
    except LlmctlError as e:
        _fail(e)

    def label(item) -> str:
        m = item.manifest or {}
        if m.get("damaged"):
            return f"[bold]{item.ref}[/] ([red]damaged[/]: {m['damaged']})"
        state = f"{m.get('kind') or '?'}, {m['missing']}" if m.get("missing") else (item.kind or "external")
        return f"[bold]{item.ref}[/] ({state})"

    root = node = Tree(label(chain[0]))
    for item in chain[1:]:
        node = node.add(label(item))
    _console().print(root)


@ckpt_app.command("rm")
def ckpt_rm(
    ref: str = typer.Argument(..., help="<stage>/<name>@vN, or <stage>/<name>@all"),
    output_root: str = ROOT_OPT,
    yes: bool = typer.Option(False, "--yes", "-y", help="Remove even versions that other checkpoints were made from."),
) -> None:
    """Delete a version (or every version of a name); `latest` moves to the newest left. Asks first when
    other checkpoints were made from what is removed (their lineage will say "removed")."""
    try:
        store = _store(output_root)
        stage, name, versions = store.removal(ref)
        children = store.children(stage, name, versions)
        if children and not yes:
            shown = ", ".join(f"{child} (from {parent})" for child, parent in children[:4]) + (
                " …" if len(children) > 4 else ""
            )
            if not sys.stdin.isatty():  # a script: refuse rather than wait for an answer
                raise LlmctlError(
                    f"not removing {ref}: {len(children)} checkpoint(s) were made from it ({shown}); "
                    f"pass --yes to remove it anyway (their lineage will then say 'removed')"
                )
            print(f"llmctl: warning: {len(children)} checkpoint(s) were made from {ref}: {shown}", file=sys.stderr)
            if not typer.confirm(f"remove {ref} anyway?", default=False):
                raise typer.Exit(1)
        for removed in store.remove(ref):
            print(f"removed {removed}")
    except LlmctlError as e:
        _fail(e)


@ckpt_app.command("sweep")
def ckpt_sweep(
    sweep: str = typer.Argument(
        ...,
        help="A sweep's id (its folder's name under <output-root>/.sweeps/), that folder, or a checkpoint reference "
        "(finetune/bbc: the sweep its newest version came from).",
    ),
    output_root: str = ROOT_OPT,
) -> None:
    """A sweep's trials (the values each tried, its objective(s), its version) and the best, or for several
    objectives the Pareto front; writes trials.csv and best.yaml (front.yaml and front.png) beside the sweep."""
    from rich.table import Table

    from llmctl.core import sweeps

    try:
        store = _store(output_root)
        key, rows = sweeps.trials(store, sweep)
    except LlmctlError as e:
        _fail(e)
    keys = sweeps.swept_keys(rows)
    several = sweeps.objectives_of(rows)
    console = _console()
    if several:
        front = sweeps.front_trials(rows)
        said = ", ".join(f"{m} ({'higher' if mode == 'max' else 'lower'} is better)" for m, mode in several)
        table = Table(title=f"sweep {key}: {len(rows)} trials · {said} · ★ Pareto front")
        for col in ("trial", *keys, *(m for m, _ in several), "ref", "front"):
            table.add_column(str(col), no_wrap=col == "ref")
        for r in rows:
            values = [_figure(o["value"]) for o in r["objectives"] or []] or ["—"] * len(several)
            table.add_row(
                str(r["trial"]),
                *(sweeps.shown(r["overrides"].get(k, "")) for k in keys),
                *values,
                r["ref"],
                "★" if r in front else "",
            )
        console.print(table)
        console.print(
            f"Pareto front: {len(front)} of {len(rows)} trials (none of the others beats one of them on every "
            f"objective): " + ", ".join(f"trial {r['trial']} → {r['ref']}" for r in front)
        )
    else:
        best = sweeps.best_trial(rows)
        metric = rows[0]["metric"]
        better = "higher" if rows[0]["mode"] == "max" else "lower"
        table = Table(title=f"sweep {key}: {len(rows)} trials, {metric} ({better} is better)")
        for col in ("trial", *keys, metric or "objective", "ref", "best"):
            table.add_column(str(col), no_wrap=col == "ref")
        for r in rows:
            value = f"{r['value']:.4g}" if isinstance(r["value"], (int, float)) else "—"
            table.add_row(
                str(r["trial"]),
                *(sweeps.shown(r["overrides"].get(k, "")) for k in keys),
                value,
                r["ref"],
                "★" if r is best else "",
            )
        console.print(table)
        if best is not None:
            console.print(f"best: trial {best['trial']} → {best['ref']} ({metric}={best['value']:.4g})")
    written = sweeps.write_summary(store, key, rows, keys)
    console.print(f"[dim]written: {', '.join(str(p) for p in written)}[/]")


def _figure(value: float) -> str:
    """A sweep's objective value as a table shows it: counts and bytes whole (with separators), others to 4 figures."""
    return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"


@ckpt_app.command("runs")
def ckpt_runs(output_root: str = ROOT_OPT) -> None:
    """Unpublished runs: interrupted (resumable with resume=auto), failed, or still running."""
    from rich.table import Table

    from llmctl.core.store import duration

    try:
        runs = _store(output_root).runs()
    except LlmctlError as e:
        _fail(e)
    table = Table(title=f"unpublished runs in {output_root}/")
    for col in ("name", "run", "step", "state", "age", "size"):
        table.add_column(col, no_wrap=col in ("name", "run"))
    for r in runs:
        state = "running" if r["live"] else "resumable" if r["resumable"] else "not resumable"
        table.add_row(
            r["ref"],
            r["id"],
            "" if r["step"] is None else str(r["step"]),
            state,
            duration(r["age"]) + " ago",
            f"{r['size'] / 2**20:.1f} MiB",
        )
    _console().print(table)


@ckpt_app.command("gc")
def ckpt_gc(
    output_root: str = ROOT_OPT,
    older_than: str = typer.Option(
        None, "--older-than", help="Also remove resumable runs idle this long: 30m, 12h, 7d."
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Delete; without it, only say what would be deleted."),
) -> None:
    """Remove unpublished runs that cannot be resumed (and, with --older-than, stale resumable ones).
    Runs a live process holds are never touched. A dry run unless --yes."""
    from llmctl.core.store import duration, parse_duration

    try:
        store = _store(output_root)
        limit = parse_duration(older_than, "--older-than") if older_than else None
        doomed = [
            r
            for r in store.runs()
            if not r["live"] and (not r["resumable"] or (limit is not None and r["age"] > limit))
        ]
    except LlmctlError as e:
        _fail(e)
    freed = 0
    for r in doomed:
        why = "not resumable" if not r["resumable"] else f"resumable at step {r['step']}, idle {duration(r['age'])}"
        if yes and not store.remove_run(r["path"]):
            continue
        freed += r["size"]
        print(f"{'removed' if yes else 'would remove'} {r['ref']} run {r['id']} ({why}, {r['size'] / 2**20:.1f} MiB)")
    print(
        f"{'freed' if yes else 'would free'} {freed / 2**20:.1f} MiB in {len(doomed)} run(s)"
        + ("" if yes or not doomed else "; run again with --yes to delete")
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
