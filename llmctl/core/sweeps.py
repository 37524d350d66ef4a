"""Sweeps: an Optuna search optimises in the direction of the stage's objective, never against it.

hydra-optuna-sweeper's `direction` defaults to `minimize`, whatever the job returns; a fine-tune returns
its accuracy, so a sweep left at the default searched for the worst model. Before Hydra starts,
`with_direction` composes the config the sweep's jobs share (the command line without its swept
values), asks the stage which metric it returns and in which mode (`objective(cfg)`: the stage's
default, or `objective_metric` / `objective_mode`), and sets `hydra.sweeper.direction` to match. A
direction given on the command line that disagrees is refused in one line; a stage that returns
nothing to optimise (generate, several checkpoints in eval) refuses an Optuna sweep.

An Optuna study lives in SQLite under the store, so the same command continues an interrupted sweep (`study_settings`).
Every job's version records its sweep (`manifest["sweep"]`: the sweep folder's name as its id, Hydra's job number);
`trials` reads a sweep back from the store, and `llmctl ckpt sweep` prints it and writes its summary.
"""

from __future__ import annotations

from collections.abc import Callable

from llmctl.core import pareto
from llmctl.core.errors import LlmctlError
from llmctl.core.files import write_text
from llmctl.core.store import objective_rank, parse_ref

DIRECTION_KEY = "hydra.sweeper.direction"
DIRECTIONS = {"max": "maximize", "min": "minimize"}


def uses_optuna(args: list[str]) -> bool:
    return any(a.replace(" ", "") in ("hydra/sweeper=optuna", "override hydra/sweeper=optuna") for a in args)


def with_direction(stage: str, args: list[str], objective: Callable, config_dir: str) -> list[str]:
    """`args` with `hydra.sweeper.direction` set from the stage's objective(s) when they ask for an Optuna sweep
    (unchanged otherwise). `objective(cfg)` returns [(metric, "min" | "max"), ...] (several: a multi-objective
    study, whose direction is a list), or None for no objective."""
    if not uses_optuna(args):
        return args
    cfg = compose_shared(stage, args, config_dir)
    if cfg is None:  # the command line does not compose: Hydra says why in one line when it runs it
        return args
    found = objective(cfg)
    if found is None:
        raise LlmctlError(
            f"llmctl {stage} returns no objective here, so an Optuna sweep has nothing to optimise; "
            f"sweep a stage that trains or judges one checkpoint, or drop hydra/sweeper=optuna (a plain -m grid runs)"
        )
    want = [DIRECTIONS[mode] for _, mode in found]
    given = _given(args, DIRECTION_KEY)
    if given:
        named = [d.strip().lower() for d in given.strip("[]").split(",")]
        for (metric, mode), said in zip(found, named, strict=False):
            if said not in (DIRECTIONS[mode], mode):
                raise LlmctlError(
                    f"{DIRECTION_KEY}={given} would optimise {metric} the wrong way (llmctl {stage} "
                    f"{'maximises' if mode == 'max' else 'minimises'} it); drop {DIRECTION_KEY} (llmctl sets it from "
                    f"the objective) or choose another objective with objective_metric= / objective_mode= / objectives="
                )
        if len(named) != len(want):
            raise LlmctlError(
                f"{DIRECTION_KEY}={given} names {len(named)} direction(s) for {len(want)} objective(s) "
                f"({', '.join(m for m, _ in found)}); drop {DIRECTION_KEY} (llmctl sets it from the objectives)"
            )
    direction = want[0] if len(want) == 1 else "[" + ",".join(want) + "]"
    added = [f"{DIRECTION_KEY}={direction}", *study_settings(stage, args, cfg), *_one_at_a_time(args, found)]
    kept = [a for a in args if _key(a) not in {_key(o) for o in added}]  # what llmctl sets replaces what was given
    at = next(i for i, a in enumerate(kept) if uses_optuna([a])) + 1  # among the overrides, not after a flag
    return [*kept[:at], *added, *kept[at:]]


def _one_at_a_time(args: list[str], found: list[tuple[str, str]]) -> list[str]:
    """Timed cost objectives (latency, throughput, decode speed, peak memory) are measured one job at a time: jobs
    running side by side slow each other, so their figures would not compare. A parallel launcher is held to one
    job (said on stderr)."""
    import sys

    from llmctl.core.evaluation.cost import TIMED

    timed = [m for m, _ in found if m.startswith("cost/") and m.removeprefix("cost/").startswith(TIMED)]
    launcher = next((a.split("=", 1)[1] for a in args if _key(a) == "hydra/launcher"), None)
    if not timed or launcher in (None, "basic"):
        return []
    setting = "hydra.launcher.array_parallelism=1" if launcher.startswith("submitit") else "hydra.launcher.n_jobs=1"
    print(
        f"llmctl: note: {', '.join(timed)} is timed, so the {launcher} launcher runs one job at a time "
        f"({setting}): jobs side by side would slow each other and their figures would not compare",
        file=sys.stderr,
    )
    return [setting]


STORAGE_KEY, STUDY_KEY, TRIALS_KEY = "hydra.sweeper.storage", "hydra.sweeper.study_name", "hydra.sweeper.n_trials"
SWEEP_DIR_KEY = "hydra.sweep.dir"
DEFAULT_TRIALS = 20  # hydra-optuna-sweeper's own default n_trials


def study_settings(stage: str, args: list[str], cfg) -> list[str]:
    """The overrides that make an Optuna sweep resumable: its study in SQLite under the store
    (`<output_root>/.sweeps/optuna.db`), named after the stage, the checkpoint name and the command line, and its
    sweep folder named after the study; the same command run again (after an interruption, or with more
    `n_trials`) continues that study and runs only the trials still missing (the sweeper itself would run n_trials
    more on every start). Settings given on the command line are kept."""
    import hashlib
    import sys
    from pathlib import Path

    root = Path(str(cfg.output_root)).expanduser().absolute() / ".sweeps"
    printing = "--cfg" in args or "--info" in args  # only printing the config: nothing is created or read
    added = []
    storage = _given(args, STORAGE_KEY)
    if storage is None:
        storage = f"sqlite:///{root / 'optuna.db'}"
        added.append(f"{STORAGE_KEY}={storage}")
    study = _given(args, STUDY_KEY)
    if study is None:
        what = sorted(a for a in args if "=" in a and not _key(a).startswith("hydra."))
        digest = hashlib.sha256("\n".join(what).encode()).hexdigest()[:8]
        study = f"{stage}-{cfg.get('name') or 'default'}-{digest}"
        added.append(f"{STUDY_KEY}={study}")
    if _given(args, SWEEP_DIR_KEY) is None:
        added.append(f"{SWEEP_DIR_KEY}={root / study}")
    wanted = int(_given(args, TRIALS_KEY) or DEFAULT_TRIALS)
    done = 0 if printing else _completed(storage, study)
    if done:
        left = max(wanted - done, 0)
        added.append(f"{TRIALS_KEY}={left}")
        print(
            f"llmctl: study {study} ({storage}) has {done} of {wanted} trials done; running {left}"
            + ("" if left else f" (raise {TRIALS_KEY} for more)"),
            file=sys.stderr,
        )
    if not printing:
        root.mkdir(parents=True, exist_ok=True)
    return added


def _key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


def _given(args: list[str], key: str) -> str | None:
    """The last value the command line gives `key`, None when it gives none."""
    values = [a.split("=", 1)[1].strip() for a in args if "=" in a and _key(a) == key]
    return values[-1] if values else None


def _completed(storage: str, study: str) -> int:
    """Trials of `study` in `storage` that finished (0 when neither exists yet)."""
    from pathlib import Path

    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        return 0
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        found = optuna.load_study(study_name=study, storage=storage)
    except KeyError:
        return 0
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in found.trials)


def compose_shared(stage: str, args: list[str], config_dir: str):
    """The config every job of the sweep shares: the stage's config with the command line's plain overrides
    (swept ones, flags and Hydra's own settings left out), composed through Hydra's compose API; None when
    it does not compose."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    extra_dirs = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--config-dir", "-cd")]
    plain = [
        a for i, a in enumerate(args) if "=" in a and not a.startswith("-") and args[i - 1 : i] != ["--config-dir"]
    ]
    try:
        parsed = OverridesParser.create().parse_overrides(plain)
    except HydraException:
        return None
    shared = [o.input_line for o in parsed if not o.is_sweep_override() and not o.key_or_group.startswith("hydra")]
    if extra_dirs:
        shared.append("hydra.searchpath=[" + ",".join(f"file://{d}" for d in extra_dirs) + "]")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=config_dir):
            return compose(config_name=stage, overrides=shared)
    except (HydraException, OmegaConfBaseException):
        return None
    finally:
        GlobalHydra.instance().clear()


# ---------------------------------------------------------------------------------------------
# A finished (or interrupted) sweep, read back from the versions its jobs published
# ---------------------------------------------------------------------------------------------
def trials(store, spec: str) -> tuple[str, list[dict]]:
    """(sweep id, its trials in the order they finished): each {"trial", "ref", "overrides" (its own values),
    "metric", "mode", "value"} for every version whose manifest names the sweep. `spec`: the sweep's id (its
    folder's name under `<output_root>/.sweeps/`), that folder, or a checkpoint reference (finetune/bbc: the sweep
    its newest version came from)."""
    from pathlib import Path

    key = Path(str(spec).rstrip("/")).name
    if parse_ref(spec) and not (store.root / ".sweeps" / key).is_dir():
        resolved = store.resolve(spec)
        key = (resolved.manifest.get("sweep") or {}).get("id")
        if not key:
            raise LlmctlError(f"sweep {spec!r}: {resolved.ref} was not made by a sweep (its manifest names none)")
    rows = []
    for stage, name, version, manifest in store.entries():
        sweep = manifest.get("sweep") or {}
        if sweep.get("id") != key:
            continue
        objective = manifest.get("objective") or {}
        rows.append(
            {
                "created": manifest.get("created") or "",
                "ref": f"{stage}/{name}@v{version:03d}",
                "dir": sweep.get("dir"),
                "overrides": dict(o.split("=", 1) for o in manifest.get("overrides") or [] if "=" in o),
                "metric": objective.get("metric"),
                "mode": objective.get("mode") or "min",
                "value": objective.get("value"),
                "rank": objective_rank(objective),
                "objectives": manifest.get("objectives") or None,  # a multi-objective sweep's values
            }
        )
    if not rows:
        raise LlmctlError(
            f"sweep {spec!r}: no version in {store.root}/ was published by it; give a sweep's id, the name of its "
            f"folder under {store.root}/.sweeps/ (each job's manifest records it: `llmctl ckpt show <ref>`)"
        )
    rows.sort(key=lambda r: (r["created"], r["ref"]))
    for number, row in enumerate(rows):  # in the order they finished, across every start of a resumed sweep
        row["trial"] = number
    return key, rows


def swept_keys(rows: list[dict]) -> list[str]:
    """The overrides whose values differ between trials (what the sweep searched), in command-line order."""
    keys = list(dict.fromkeys(k for r in rows for k in r["overrides"]))
    return [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1]


def shown(value) -> str:
    """A swept value as tables and plots show it: a float to 4 significant figures (the CSV and YAML keep it whole)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return str(value) if number.is_integer() or len(str(value)) <= 7 else f"{number:.4g}"


def best_trial(rows: list[dict]) -> dict | None:
    """The trial with the best objective (in its mode); None when no trial recorded a value."""
    scored = [r for r in rows if r["rank"] is not None]
    return min(scored, key=lambda r: r["rank"]) if scored else None


def objectives_of(rows: list[dict]) -> list[tuple[str, str]] | None:
    """[(metric, mode)] of a sweep of several objectives (from its trials' manifests); None for one objective."""
    several = next((r["objectives"] for r in rows if r["objectives"]), None)
    return [(o["metric"], o["mode"]) for o in several] if several and len(several) > 1 else None


def front_trials(rows: list[dict]) -> list[dict]:
    """The trials on the Pareto front of a multi-objective sweep (none beats them on every objective), ordered by
    their first objective, best first."""
    on = [rows[i] for i in pareto.front([pareto.ranks(r["objectives"]) for r in rows])]
    return sorted(on, key=lambda r: pareto.ranks(r["objectives"])[0])


def write_summary(store, key: str, rows: list[dict], keys: list[str]) -> list:
    """Beside the sweep (its recorded folder, else `<store>/.sweeps/<key>`), each written whole: trials.csv (every
    trial: number, swept values `keys`, objective(s), version); for one objective best.yaml (the best trial's
    overrides, objective and version); for several, front.yaml (the Pareto front's trials) and front.png (every
    trial on the first two objectives, the front joined). Returns the paths written."""
    import csv
    import io
    from pathlib import Path

    import yaml

    recorded = rows[0]["dir"]
    folder = Path(recorded) if recorded and Path(recorded).is_dir() else store.root / ".sweeps" / key
    folder.mkdir(parents=True, exist_ok=True)
    several = objectives_of(rows)
    table, buffer = folder / "trials.csv", io.StringIO()
    out = csv.writer(buffer)
    if several:
        out.writerow(["trial", *keys, *(m for m, _ in several), "front", "ref"])
        on = {id(r) for r in front_trials(rows)}
        for r in rows:
            values = [o["value"] for o in r["objectives"] or []] or [""] * len(several)
            out.writerow([r["trial"], *(r["overrides"].get(k, "") for k in keys), *values, id(r) in on, r["ref"]])
    else:
        out.writerow(["trial", *keys, "metric", "value", "ref"])
        for r in rows:
            out.writerow([r["trial"], *(r["overrides"].get(k, "") for k in keys), r["metric"], r["value"], r["ref"]])
    write_text(table, buffer.getvalue())
    written = [table]

    def summary(r: dict) -> dict:
        return {
            "trial": r["trial"],
            "ref": r["ref"],
            **(
                {"objectives": {o["metric"]: o["value"] for o in r["objectives"]}}
                if several
                else {"objective": {"metric": r["metric"], "mode": r["mode"], "value": r["value"]}}
            ),
            "swept": {k: r["overrides"].get(k) for k in keys},
            "overrides": [f"{k}={v}" for k, v in r["overrides"].items()],
        }

    if several:
        front = front_trials(rows)
        chosen = folder / "front.yaml"
        directions = {m: ("maximize" if mode == "max" else "minimize") for m, mode in several}
        write_text(
            chosen, yaml.safe_dump({"objectives": directions, "front": [summary(r) for r in front]}, sort_keys=False)
        )
        written += [chosen, plot_front(folder / "front.png", key, rows, front, several, keys)]
    elif (best := best_trial(rows)) is not None:
        chosen = folder / "best.yaml"
        write_text(chosen, yaml.safe_dump(summary(best), sort_keys=False))
        written.append(chosen)
    return written


def plot_front(path, key: str, rows: list[dict], front: list[dict], several: list[tuple[str, str]], keys: list[str]):
    """front.png: every trial on the first two objectives (each axis saying which way is better), the Pareto front
    joined in red, each point labelled with its trial number and swept values; written whole."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmctl.core.files import atomic_path

    (mx, modex), (my, modey) = several[:2]
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    scored = [r for r in rows if r["objectives"]]
    ax.scatter(
        [r["objectives"][0]["value"] for r in scored],
        [r["objectives"][1]["value"] for r in scored],
        color="0.6",
        label="trials",
    )
    ax.plot(
        [r["objectives"][0]["value"] for r in front],
        [r["objectives"][1]["value"] for r in front],
        "o-",
        color="tab:red",
        label="Pareto front",
    )
    for r in scored:
        swept = ", ".join(f"{k.rsplit('.', 1)[-1]}={shown(r['overrides'].get(k))}" for k in keys)
        ax.annotate(
            f"{r['trial']}: {swept}" if swept else str(r["trial"]),
            (r["objectives"][0]["value"], r["objectives"][1]["value"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel(f"{mx} ({'higher' if modex == 'max' else 'lower'} is better)")
    ax.set_ylabel(f"{my} ({'higher' if modey == 'max' else 'lower'} is better)")
    more = f" (first two of {len(several)} objectives)" if len(several) > 2 else ""
    ax.set_title(f"sweep {key}: {len(rows)} trials{more}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
