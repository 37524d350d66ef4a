"""method=auto: quantize copies of the checkpoint with each candidate method, measure them, and pick by the user's goal.

    record, kept = auto(model, on, run, settings=settings, goal="speed", max_drop=0.05, cost=cost, seed=0,
                        outliers=calibrate)     # model quantized in place with the pick; kept: the table, why
    pick, why = choose(rows, reference, goal="speed", max_drop=0.05)   # the rule alone, on judged rows

Every candidate is judged the same way as the unquantized reference (eval's code: the task's primary metric on
validation, cost figures on the saved folder), so the table compares like with like. The goals:
- `speed`: the fastest candidate whose primary metric stays within `max_drop` (relative) of the reference's —
  batch-1 decode tokens/s for a model that generates, batch-1 latency otherwise;
- `size`: the smallest on disk within the same budget;
- `quality`: the best primary metric (the smaller artifact on a tie).
When no candidate stays within the budget, the best-quality one is picked and the line says so.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

from llmctl.core.errors import LlmctlError
from llmctl.core.evaluation.cost import MODES
from llmctl.core.evaluation.judging import judge
from llmctl.core.evaluation.report import size_text
from llmctl.core.quantization.schemes import check, quantize
from llmctl.core.quantization.serialization import save

GOALS = ("speed", "size", "quality")
BASE_METHODS = ("int8-dynamic", "int8-weight", "int4-weight")


def candidates(model, device, *, group_size: int | None, keep_head: bool) -> tuple[list[dict], list[str]]:
    """The methods worth measuring for this model on this device: [{"method", "head_int8"}], and one line per
    method left out (the device has no kernel for it). A model that generates also tries its output layer as
    int8 beside each weight-only scheme (the largest single table of a small decoder)."""
    decoder = bool(getattr(model, "can_generate", lambda: False)())
    out, left = [], []
    for method in BASE_METHODS:
        heads = [False, True] if decoder and keep_head and method != "int8-dynamic" else [False]
        for head in heads:
            try:
                check(method, device=device, group_size=group_size if method == "int4-weight" else None, head_int8=head)
            except LlmctlError as e:
                left.append(f"{method}: {e}")
                break
            out.append({"method": method, "head_int8": head})
    return out, left


def label(candidate: dict) -> str:
    return candidate["method"] + (" + int8 head" if candidate.get("head_int8") else "")


def speed_figure(cost: dict) -> str:
    """The cost figure that measures speed for this model: decode tokens/s where it was measured, else latency."""
    return "decode_tokens_per_s" if cost.get("decode_tokens_per_s") else "latency_ms_p50"


def relative_drop(value: float | None, reference: float | None, mode: str) -> float | None:
    """How much worse `value` is than `reference`, as a share of it (negative = better)."""
    if value is None or reference is None or reference == 0:
        return None
    return (reference - value) / abs(reference) if mode == "max" else (value - reference) / abs(reference)


def choose(rows: list[dict], reference: dict, *, goal: str, max_drop: float) -> tuple[int, str]:
    """Index of the row `goal` picks, and why, in one line. rows: [{"judged": …}], each judged as
    core.evaluation.judging.judge returns it; `reference`: the unquantized model judged alike."""
    if not rows:
        raise LlmctlError("method=auto: no quantization method runs on this device for this model")
    name, mode = reference["primary"]["metric"], reference["primary"]["mode"]
    base = reference["primary"]["value"]
    drops = [relative_drop(r["judged"]["primary"]["value"], base, mode) for r in rows]

    def quality(i: int):
        d = drops[i]
        return (d is None, d if d is not None else 0.0, _cost(rows[i], "size_bytes") or 0)

    best_quality = min(range(len(rows)), key=quality)
    if goal == "quality":
        return best_quality, f"goal=quality: the best {name} of the candidates"
    within = [i for i, d in enumerate(drops) if d is not None and d <= max_drop]
    budget = f"{name} within {100 * max_drop:g} % of the unquantized model's (quantize.max_drop)"
    if not within:
        return best_quality, f"goal={goal}: no candidate keeps {budget}; picked the best {name} instead"
    if goal == "size":
        pick = min(within, key=lambda i: (_cost(rows[i], "size_bytes") or float("inf"), quality(i)))
        return pick, f"goal=size: the smallest on disk with {budget}"
    figure = speed_figure(reference.get("cost") or {})
    sign = -1 if MODES[figure] == "max" else 1
    pick = min(within, key=lambda i: sign * (_cost(rows[i], figure) or (float("inf") * sign)))
    what = "decode tokens/s at batch 1" if figure == "decode_tokens_per_s" else "batch-1 latency"
    return pick, f"goal=speed: the fastest {what} with {budget}"


def check_goal(goal: str, cost: dict | None) -> None:
    """One line for a goal that cannot be measured (before anything loads)."""
    if goal not in GOALS:
        raise LlmctlError(f"quantize.goal={goal}: choose one of {', '.join(GOALS)}")
    if cost is None and goal != "quality":
        raise LlmctlError(
            f"method=auto quantize.goal={goal} compares measured cost figures; drop cost=off or set "
            "quantize.goal=quality"
        )


def auto(
    model, on, run, *, settings: dict, goal: str, max_drop: float, cost: dict | None, seed: int, outliers, input_scales
):
    """method=auto end to end: the unquantized model and every candidate judged alike on validation, the table
    printed, `model` quantized in place with the goal's pick; returns (its record, what the manifest keeps).
    `outliers(model)`: the int8-dynamic calibration (Linears kept in floating point); `input_scales(model)`: the
    int4 one (each Linear's input RMS per channel, for the error correction), taken once from the float model."""
    check_goal(goal, cost)
    found, left = candidates(model, run.rt.device, group_size=settings["group_size"], keep_head=settings["keep_head"])
    for line in left:
        run.print(f"[dim]method=auto leaves out {line}[/]")

    def judged(m, folder: Path) -> dict:
        return judge(m, on.prepared, "validation", rt=run.rt, seed=seed, folder=folder, cost=cost, capped=True)

    scales: dict = {}  # the int4 calibration, taken once

    def quantize_as(m, candidate: dict) -> dict:
        method = candidate["method"]
        own = {**settings, "head_int8": candidate["head_int8"]}
        if method != "int4-weight":  # quantize.group_size is the int4 candidate's; int8 scales per channel
            own["group_size"] = None
        elif "int4" not in scales:
            scales["int4"] = input_scales(model)
        return quantize(
            m,
            method,
            method=method,
            outliers=outliers(m) if method == "int8-dynamic" else None,
            input_scales=scales.get("int4"),
            **own,
        )

    reference = judged(model, on.source.path)
    rows = []
    for candidate in found:  # each on its own copy, dropped once judged (only figures are kept)
        twin = copy.deepcopy(model)
        record = quantize_as(twin, candidate)
        with tempfile.TemporaryDirectory() as tmp:
            save(twin, record, Path(tmp))
            rows.append({**candidate, "label": label(candidate), "judged": judged(twin, Path(tmp))})
        del twin
    pick, why = choose(rows, reference, goal=goal, max_drop=max_drop)
    run.print(table(rows, reference, pick))
    run.print(f"method=auto picked {rows[pick]['label']}: {why}")
    record = quantize_as(model, rows[pick])  # the same deterministic quantization, now of the model itself
    name = reference["primary"]["metric"]
    figure = speed_figure(reference.get("cost") or {})
    kept = {
        "goal": goal,
        "max_drop": max_drop,
        "picked": rows[pick]["label"],
        "why": why,
        "split": "validation",
        "candidates": [
            {
                "method": r["label"],
                name: r["judged"]["primary"]["value"],
                **{k: _cost(r, k) for k in ("size_bytes", figure)},
            }
            for r in [{"label": "unquantized", "judged": reference}, *rows]
        ],
    }
    return record, kept


def _cost(row: dict, key: str):
    return (row["judged"].get("cost") or {}).get(key)


def table(rows: list[dict], reference: dict, pick: int):
    """A rich table: the reference and every candidate — primary metric and its change, size, speed."""
    from rich.table import Table

    name = reference["primary"]["metric"]
    cost = reference.get("cost") or {}
    figure = speed_figure(cost)
    speed_title = "decode tok/s" if figure == "decode_tokens_per_s" else "latency p50 ms"
    t = Table(title=f"method=auto · candidates measured on {reference['split']} ({reference['scored']} examples)")
    for col in ("method", name, "change", "size", speed_title, ""):
        t.add_column(col, justify="left" if col in ("method", "") else "right")

    def add(label_: str, judged: dict, mark: str) -> None:
        value, ref = judged["primary"]["value"], reference["primary"]["value"]
        change = "" if value is None or not ref or judged is reference else f"{100 * (value - ref) / abs(ref):+.1f} %"
        c = judged.get("cost") or {}
        t.add_row(
            label_,
            "—" if value is None else f"{value:.4f}",
            change,
            "—" if not c.get("size_bytes") else size_text(c["size_bytes"]),
            "—" if not c.get(figure) else f"{c[figure]:.1f}",
            mark,
        )

    add("unquantized", reference, "")
    for i, row in enumerate(rows):
        add(row["label"], row["judged"], "← picked" if i == pick else "")
    return t
