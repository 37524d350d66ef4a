"""core/pareto.py: the front is exactly the points no other point beats on every objective, in each one's mode."""

from __future__ import annotations

from llmctl.core import pareto


def _obj(acc, latency):
    return [
        {"metric": "eval/accuracy", "mode": "max", "value": acc},
        {"metric": "cost/l", "mode": "min", "value": latency},
    ]


def test_the_front_keeps_exactly_the_points_nothing_beats_on_both_objectives():
    trials = [
        _obj(0.90, 10.0),  # best accuracy: on the front
        _obj(0.80, 5.0),  # a trade-off: on it
        _obj(0.80, 6.0),  # as accurate as the one above and slower: off
        _obj(0.70, 7.0),  # beaten on both by (0.80, 5.0): off
        _obj(0.50, 1.0),  # fastest: on it
        _obj(0.90, 10.0),  # a tie with the first: neither beats the other, both on it
        [{"metric": "eval/accuracy", "mode": "max", "value": None}, {"metric": "cost/l", "mode": "min", "value": 0.1}],
    ]
    assert pareto.front([pareto.ranks(t) for t in trials]) == [0, 1, 4, 5]


def test_a_maximised_objective_is_ranked_negated_and_a_missing_value_has_no_rank():
    assert pareto.ranks(_obj(0.9, 3.0)) == [-0.9, 3.0]
    assert pareto.ranks(_obj(None, 3.0)) is None and pareto.ranks(None) is None
    assert pareto.dominates([-0.9, 3.0], [-0.8, 3.0]) and not pareto.dominates([-0.9, 3.0], [-0.9, 3.0])
