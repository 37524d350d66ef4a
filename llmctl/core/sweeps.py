"""Sweeps: an Optuna search optimises in the direction of the stage's objective, never against it.

hydra-optuna-sweeper's `direction` defaults to `minimize`, whatever the job returns; a fine-tune returns
its accuracy, so a sweep left at the default searched for the worst model. Before Hydra starts,
`with_direction` composes the config the sweep's jobs share (the command line without its swept
values), asks the stage which metric it returns and in which mode (`objective(cfg)`: the stage's
default, or `objective_metric` / `objective_mode`), and sets `hydra.sweeper.direction` to match. A
direction given on the command line that disagrees is refused in one line; a stage that returns
nothing to optimise (generate, several checkpoints in eval) refuses an Optuna sweep.

Every job's version records its sweep (`manifest["sweep"]`: the sweep folder's name as its id, the trial number);
`trials` reads a sweep back from the store, and `llmctl ckpt sweep` prints it and writes its summary.
"""

from __future__ import annotations

from collections.abc import Callable

from llmctl.core.errors import LlmctlError

DIRECTION_KEY = "hydra.sweeper.direction"
DIRECTIONS = {"max": "maximize", "min": "minimize"}


def uses_optuna(args: list[str]) -> bool:
    return any(a.replace(" ", "") in ("hydra/sweeper=optuna", "override hydra/sweeper=optuna") for a in args)


def with_direction(stage: str, args: list[str], objective: Callable, config_dir: str) -> list[str]:
    """`args` with `hydra.sweeper.direction` set from the stage's objective when they ask for an Optuna sweep
    (unchanged otherwise). `objective(cfg)` returns (metric, "min" | "max"), or None for no objective."""
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
    metric, mode = found
    want = DIRECTIONS[mode]
    given = [a.split("=", 1)[1].strip() for a in args if a.split("=", 1)[0].lstrip("+~") == DIRECTION_KEY]
    if given and given[-1].lower() not in (want, mode):
        raise LlmctlError(
            f"{DIRECTION_KEY}={given[-1]} would optimise {metric} the wrong way (llmctl {stage} "
            f"{'maximises' if mode == 'max' else 'minimises'} it); drop {DIRECTION_KEY} (llmctl sets it from the "
            f"objective) or choose another objective with objective_metric= / objective_mode="
        )
    kept = [a for a in args if a.split("=", 1)[0].lstrip("+~") != DIRECTION_KEY]
    at = next(i for i, a in enumerate(kept) if uses_optuna([a])) + 1  # among the overrides, not after a flag
    return [*kept[:at], f"{DIRECTION_KEY}={want}", *kept[at:]]


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
    """(sweep id, its trials by number): each {"trial", "ref", "overrides" (its own values), "metric", "mode",
    "value"} for every version whose manifest names the sweep. `spec`: the sweep's id (its folder's name under
    `<output_root>/.sweeps/`) or that folder."""
    from pathlib import Path

    key = Path(str(spec).rstrip("/")).name
    rows = []
    for stage, name, version, manifest in store.entries():
        sweep = manifest.get("sweep") or {}
        if sweep.get("id") != key:
            continue
        objective = manifest.get("objective") or {}
        rows.append(
            {
                "trial": int(sweep.get("trial", -1)),
                "ref": f"{stage}/{name}@v{version:03d}",
                "dir": sweep.get("dir"),
                "overrides": dict(o.split("=", 1) for o in manifest.get("overrides") or [] if "=" in o),
                "metric": objective.get("metric"),
                "mode": objective.get("mode") or "min",
                "value": objective.get("value"),
            }
        )
    if not rows:
        raise LlmctlError(
            f"sweep {spec!r}: no version in {store.root}/ was published by it; give a sweep's id, the name of its "
            f"folder under {store.root}/.sweeps/ (each job's manifest records it: `llmctl ckpt show <ref>`)"
        )
    return key, sorted(rows, key=lambda r: r["trial"])


def swept_keys(rows: list[dict]) -> list[str]:
    """The overrides whose values differ between trials (what the sweep searched), in command-line order."""
    keys = list(dict.fromkeys(k for r in rows for k in r["overrides"]))
    return [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1]


def best_trial(rows: list[dict]) -> dict | None:
    """The trial with the best objective (in its mode); None when no trial recorded a value."""
    scored = [r for r in rows if isinstance(r["value"], (int, float))]
    if not scored:
        return None
    return min(scored, key=lambda r: r["value"] if r["mode"] == "min" else -r["value"])


def write_summary(folder, rows: list[dict], best: dict | None) -> tuple:
    """trials.csv (every trial: number, swept values, objective, version) and best.yaml (the best trial's
    overrides, objective and version) in `folder`; returns their paths."""
    import csv
    from pathlib import Path

    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = swept_keys(rows)
    table = folder / "trials.csv"
    with open(table, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["trial", *keys, "metric", "value", "ref"])
        for r in rows:
            out.writerow([r["trial"], *(r["overrides"].get(k, "") for k in keys), r["metric"], r["value"], r["ref"]])
    chosen = folder / "best.yaml"
    if best is not None:
        chosen.write_text(
            yaml.safe_dump(
                {
                    "trial": best["trial"],
                    "ref": best["ref"],
                    "objective": {"metric": best["metric"], "mode": best["mode"], "value": best["value"]},
                    "swept": {k: best["overrides"].get(k) for k in keys},
                    "overrides": [f"{k}={v}" for k, v in best["overrides"].items()],
                },
                sort_keys=False,
            )
        )
    return table, chosen if best is not None else None
