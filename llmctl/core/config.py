"""Running a job under Hydra, and turning Hydra's multi-line errors into one clear line.

The CLI hands each stage's arguments to `run_with_hydra`, which builds a ``hydra.main`` at call
time (the compose API cannot multirun) over the absolute ``conf/`` path, so overrides, ``-m``,
``--cfg``, sweepers and launchers all behave as in any Hydra app. ``HYDRA_FULL_ERROR=1`` makes
Hydra re-raise instead of printing a trace, so the CLI can print one line and exit non-zero.
Which stage runs is the CLI's business (llmctl/cli.py); nothing here imports a stage.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from llmctl.core.errors import LlmctlError, first_line


def config_dir() -> Path:
    """`conf/` inside the installed wheel, else the checkout's top-level `conf/`."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "pretrain.yaml").is_file():
            return candidate
    raise LlmctlError(
        f"llmctl's configs are missing (looked in {here / 'conf'} and {here.parent / 'conf'}); reinstall llmctl"
    )


def run_with_hydra(
    stage: str, args: list[str], job: Callable, doc: str = "", objective: Callable | None = None
) -> None:
    """Run `job(cfg)` through Hydra with the `stage` config root and the command line `args`
    (`llmctl <stage> <args>`). `objective(cfg)` → (metric, "min" | "max") or None: what an Optuna sweep of
    the stage optimises (core.sweeps). Raises LlmctlError on bad input."""
    from llmctl.core.sweeps import with_direction

    _check_config_dirs(args)
    args = model_shorthand(stage, quote_free_text(args))

    printing = [a for a in args if a in ("--cfg", "-c", "--info", "-i")]
    if printing and {"-m", "--multirun"} & set(args):  # Hydra raises a bare ValueError
        raise LlmctlError(
            f"{printing[0]} prints one job's config and -m runs a sweep: drop -m to see the config (sweep overrides "
            f"such as a=1,2 print as given)"
        )
    if "--hydra-help" in args:  # Hydra's own help (its flags), unchanged
        args = [a if a != "--hydra-help" else "--help" for a in args]
    elif "--help" in args or "-h" in args:
        print(stage_help(stage, [a for a in args if a not in ("--help", "-h")], doc))
        return
    if "--cfg" in args and args[args.index("--cfg") + 1 :][:1] == ["job"] and not {"--package", "-p"} & set(args):
        print(_commented(stage, args))
        return
    _hydra(stage, with_direction(stage, args, objective or (lambda cfg: None), str(config_dir())), job)


def model_shorthand(stage: str, args: list[str]) -> list[str]:
    """`model=<hub id | folder | packaged:name>` where `model` is a config group: a model named rather than a
    preset, read as `model=pretrained model.pretrained=<it>` (model=Qwen/Qwen2.5-0.5B-Instruct)."""
    if "model" not in _stage_groups(stage):
        return args
    dirs = [config_dir(), *(Path(a) for i, a in enumerate(args[1:]) if args[i] in ("--config-dir", "-cd"))]
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        named = eq and key == "model" and ("/" in value or ":" in value or Path(value).expanduser().exists())
        if named and not any((d / "model" / f"{value}.yaml").is_file() for d in dirs):
            out += ["model=pretrained", f"model.pretrained={value}"]
        else:
            out.append(arg)
    return out


def quote_free_text(args: list[str]) -> list[str]:
    """`key=value` arguments Hydra's grammar cannot read as they are (a prompt with an apostrophe, as a user types
    it: prompt="What's up?") are passed as the quoted string the user meant; everything else is left as it is."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and not arg.startswith("-") and re.fullmatch(r"[+~]{0,2}[A-Za-z_][\w.-]*", key):
            try:
                parser.parse_override(arg)
            except HydraException:
                escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)  # a quote and what precedes it
                escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)  # backslashes before the closing quote
                arg = f"{key}='{escaped}'"
        out.append(arg)
    return out


def _check_config_dirs(args: list[str]) -> None:
    """--config-dir DIR (or --config-dir=DIR) must name a folder: one line, before Hydra fails on it."""
    for i, arg in enumerate(args):
        if arg in ("--config-dir", "-cd"):
            folder = args[i + 1] if i + 1 < len(args) else None
        elif arg.startswith("--config-dir="):
            folder = arg.split("=", 1)[1]
        else:
            continue
        if not folder or not Path(folder).expanduser().is_dir():
            raise LlmctlError(
                f"--config-dir {folder or ''}: no such folder (relative to {Path.cwd()}); give a folder holding "
                f"<group>/<name>.yaml presets, e.g. --config-dir my-configs with my-configs/conf/my-preset.yaml"
            )


def _hydra(stage: str, args: list[str], job: Callable) -> None:
    import hydra
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    sys.argv = [f"llmctl {stage}", *args]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # re-raise; we print one line ourselves
    _quiet_sweepers(args)

    failure: list[LlmctlError] = []

    def task(cfg):
        try:
            return job(cfg)
        except (LlmctlError, OmegaConfBaseException) as e:
            error = e if isinstance(e, LlmctlError) else LlmctlError(_omegaconf_line(e))
            if _multirun():  # a sweep reports the failing job through Hydra
                raise error from None
            failure.append(error)  # a single run: keep Hydra from printing its own "Error executing job" line
            return None

    task.__module__ = job.__module__
    task.__qualname__ = task.__name__ = stage
    app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=stage)(task)
    try:
        app()
        if failure:
            raise failure[0]
    except LlmctlError:
        raise
    except MissingConfigException as e:
        raise LlmctlError(_missing_config_line(stage, e)) from None
    except OverrideParseException as e:
        raise LlmctlError(
            f"cannot parse the overrides: {first_line(str(e))}; write key=value (quote values with spaces)"
        ) from None
    except ConfigCompositionException as e:
        raise LlmctlError(_composition_line(stage, e)) from None
    except OmegaConfBaseException as e:
        raise LlmctlError(_omegaconf_line(e)) from None
    finally:
        _clear_hydra()


# ---------------------------------------------------------------------------------------------
# --help and --cfg job: the composed config with each knob's one-line comment from its YAML file
# ---------------------------------------------------------------------------------------------
_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.+-]*):(?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")


def stage_help(stage: str, args: list[str], doc: str) -> str:
    """The stage's description, the config groups it takes, and its composed config with comments."""
    groups = _stage_groups(stage)
    lines = [
        doc.strip(),
        "",
        "Config groups (choose with group=option; add your own with --config-dir DIR holding <group>/<name>.yaml):",
    ]
    for group, default in groups.items():
        options = sorted(p.stem for p in (config_dir() / group).glob("*.yaml") if stage in _option_stages(p, stage))
        lines.append(f"  {group}: {', '.join(o + (' (default)' if o == default else '') for o in options)}")
    lines += [
        "",
        "Flags: -m/--multirun (sweeps: key=a,b; hydra/sweeper=optuna; hydra/launcher=joblib), --cfg job (the composed",
        "config, nothing run), --config-dir DIR, --hydra-help (Hydra's own help).",
        "",
        f"Config{' with your overrides' if args else ''} (every key can be overridden: key=value):",
        "",
        _commented(stage, [*args, "--cfg", "job"]),
    ]
    return "\n".join(lines)


def _option_stages(path: Path, stage: str) -> set[str]:
    """The stages a config option is for: its `# for: a, b` line (a group shared by stages, like `method`), else
    every stage."""
    for line in path.read_text().splitlines()[:3]:
        if line.startswith("# for:"):
            return {s.strip() for s in line[len("# for:") :].split(",")}
    return {stage}


def _stage_groups(stage: str) -> dict[str, str | None]:
    """group → default option, for the config groups in the stage's defaults list (conf/<stage>.yaml)."""
    from omegaconf import OmegaConf

    groups: dict[str, str | None] = {}
    for entry in OmegaConf.load(config_dir() / f"{stage}.yaml").get("defaults", []):
        if isinstance(entry, str) or entry is None:
            continue
        for key, value in entry.items():
            if not str(key).startswith("override ") and (config_dir() / str(key)).is_dir():
                groups[str(key)] = value
    return groups


def _commented(stage: str, args: list[str]) -> str:
    """Hydra's `--cfg job` output for these arguments, each key followed by its comment."""
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        _hydra(stage, [a for a in args if a not in ("--cfg", "job")] + ["--cfg", "job"], job=lambda cfg: None)
    comments = _comments(stage, args)
    out, stack = [], []
    for line in buffer.getvalue().rstrip("\n").splitlines():
        m = _KEY_LINE.match(line)
        if m and not line.lstrip().startswith("- "):
            depth = len(m.group("indent")) // 2
            stack = stack[:depth] + [m.group("key")]
            comment = comments.get(".".join(stack))
            if comment:
                line = f"{line}  # {comment}"
        out.append(line)
    return "\n".join(out)


def _comments(stage: str, args: list[str]) -> dict[str, str]:
    """Dotted key → its comment, from every YAML file the stage can use; the stage's own file, common.yaml
    and the chosen option of each group (`group=option` in `args`, else the default) take precedence
    over other options and presets."""
    root = config_dir()
    defaults = _stage_groups(stage)
    defaults.update({k: v for k, _, v in (a.partition("=") for a in args) if k in defaults and v})
    files = sorted(root.glob("conf/*.yaml"))  # presets (lowest precedence)
    files += [p for g in defaults for p in sorted((root / g).glob("*.yaml")) if p.stem != defaults[g] and g != "conf"]
    files += [root / g / f"{o}.yaml" for g, o in defaults.items() if o and g != "conf"] + [
        root / "common.yaml",
        root / f"{stage}.yaml",
    ]
    found: dict[str, str] = {}
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text()
        prefix = "" if path.parent == root or "@package _global_" in text else path.parent.name + "."
        stack: list[str] = []
        for line in text.splitlines():
            m = _KEY_LINE.match(line)
            if not m or line.lstrip().startswith("-"):
                continue
            depth = len(m.group("indent")) // 2
            stack = stack[:depth] + [m.group("key")]
            if m.group("comment") and stack[0] not in ("defaults", "hydra"):
                found[prefix + ".".join(stack)] = m.group("comment").strip()
    return found


def _quiet_sweepers(args: list[str]) -> None:
    """The Optuna sweeper's storage set-up logs a line per alembic plugin, and Optuna logs in colour
    through its own handler: keep alembic to warnings and route Optuna's lines through Hydra's log."""
    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)
    if any("sweeper=optuna" in a for a in args):
        try:
            import optuna
        except ImportError:
            return
        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()


def _omegaconf_line(e) -> str:
    key = getattr(e, "full_key", None)
    if type(e).__name__ == "MissingMandatoryValue" and key:
        return f"{key} is required here; set {key}=<value>"
    return f"bad config value{f' at {key}' if key else ''}: {first_line(str(e))}"


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _clear_hydra() -> None:
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()


def _missing_config_line(stage: str, e) -> str:
    """An unknown preset, with the options of that group this stage takes (a group shared by stages, like
    `method`, lists only this stage's; the user's own presets from --config-dir are all listed)."""
    missing = getattr(e, "missing_cfg_file", None) or ""
    group, _, choice = missing.rpartition("/")
    options = [
        o
        for o in getattr(e, "options", None) or []
        if not (config_dir() / group / f"{o}.yaml").is_file()
        or stage in _option_stages(config_dir() / group / f"{o}.yaml", stage)
    ]
    if group:
        return (
            f"unknown preset {group}={choice}; available: {', '.join(sorted(options)) or '(none)'}"
            " (add your own with --config-dir DIR holding <group>/<name>.yaml)"
        )
    return first_line(str(e))


def _composition_line(stage: str, e) -> str:
    cause = e.__cause__
    key = getattr(cause, "full_key", None)
    msg = first_line(str(e))
    group = re.match(r"Could not override '([^']+)'\. No match in the defaults list", msg)
    if group:
        return (
            f"llmctl {stage} takes no config group {group.group(1)!r} (its groups: {', '.join(_stage_groups(stage))}); "
            f"drop {group.group(1)}=..., or see `llmctl {stage} --help`"
        )
    if key and "not in struct" in str(cause):
        known = _all_keys(stage)
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}?" if close else f"`llmctl {stage} --cfg job` lists the keys"
        return f"unknown config key {key!r}; {hint} (prefix with + to add a new key on purpose)"
    return f"{msg} {first_line(str(cause)) if cause else ''}".strip()


def _all_keys(stage: str) -> list[str]:
    """Every dotted key of the stage's default config (for 'did you mean')."""
    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig, OmegaConf

    _clear_hydra()
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose(config_name=stage)
    keys: list[str] = []

    def walk(node, prefix):
        for k in node:
            full = f"{prefix}{k}"
            keys.append(full)
            child = node._get_node(k)
            if isinstance(child, DictConfig):
                walk(child, full + ".")

    walk(cfg, "")
    OmegaConf.set_struct(cfg, True)
    return keys


def to_container(cfg) -> dict:
    """The fully resolved config as plain data (for the manifest)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def preset_name(default: str = "custom") -> str:
    """The `conf=` preset chosen for this run (Hydra's runtime choices)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get("conf") or default
    except Exception:  # not running under Hydra (tests calling a stage directly)
        return default


def job_overrides() -> tuple[list[str], list[str]]:
    """This Hydra job's own overrides (one sweep point's values under -m, without -m or sweep lists)
    and the user's --config-dir folders: what a child process needs to run exactly this job."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():  # a stage called directly, not through the CLI
        return [], []
    hc = HydraConfig.get()
    dirs = [s.path for s in hc.runtime.config_sources if s.provider == "command-line" and s.schema == "file"]
    return list(hc.overrides.task), dirs


def sweep_record() -> dict | None:
    """Under -m: the sweep this job belongs to (its folder under `hydra.sweep.dir`, whose name identifies it), the
    sweeper and the job's number in this start of the sweep; None for a single run."""
    if not _multirun():
        return None
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    folder = Path(str(hc.sweep.dir)).absolute()
    sweeper = hc.runtime.choices.get("hydra/sweeper") or "basic"
    return {"id": folder.name, "dir": str(folder), "job": int(hc.job.num), "sweeper": sweeper}


def command_line() -> str:
    import shlex

    return " ".join([sys.argv[0], *(shlex.quote(a) for a in sys.argv[1:])]) if sys.argv else ""
