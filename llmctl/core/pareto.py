"""Several objectives at once: each is a {"metric", "mode" (min | max), "value"} record (a manifest's
`objectives`), and a set of them has no single best, only a Pareto front — the points no other point beats
on every objective. `@best` and `llmctl ckpt sweep` read multi-objective sweeps through here."""

from __future__ import annotations


def ranks(objectives: list[dict] | None) -> list[float] | None:
    """The values as numbers where lower is better (a max objective negated); None when any value is missing."""
    if not objectives:
        return None
    values = [o.get("value") for o in objectives]
    if any(not isinstance(v, (int, float)) for v in values):
        return None
    return [float(v) if o.get("mode", "min") == "min" else -float(v) for o, v in zip(objectives, values, strict=True)]


def dominates(a: list[float], b: list[float]) -> bool:
    """`a` is at least as good as `b` on every objective and better on one (lower is better)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def front(points: list[list[float] | None]) -> list[int]:
    """Indices of the points no other point dominates (missing points are never on it), in their order."""
    scored = [(i, p) for i, p in enumerate(points) if p is not None]
    return [i for i, p in scored if not any(dominates(q, p) for j, q in scored if j != i)]
