"""One module per stage, each read top to bottom; the CLI (llmctl/cli.py) dispatches to them.

Stages never import one another; what more than one stage needs lives in llmctl.core.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Stage(Protocol):
    """What a stage module offers the CLI.

    - Its docstring is the first part of `llmctl <stage> --help`: what it does and the commands that run it.
    - `run(cfg)` is called once per Hydra job with the composed config (`conf/<stage>.yaml` plus
      overrides). It raises `LlmctlError` for bad input (one line, exit 2), publishes at most one
      new version through `core.run.publish`, and returns the value of its objective metric
      (`objective_metric`, else the stage's default), which sweepers (Optuna) optimise and `@best`
      ranks; None when it has no objective or on a non-zero DDP rank.
    - Optionally `Config`: a `core.schema.StageConfig` subclass typing the stage's own keys; the CLI
      validates the composed config against it before `run` (default: the shared keys only).
    - Optionally `objective(cfg) -> (metric, "min" | "max") | None`: what `run` returns for this config,
      read before anything runs, so an Optuna sweep optimises in the right direction (core.sweeps); a
      stage without it returns nothing to optimise and refuses an Optuna sweep.
    """

    def run(self, cfg) -> float | None: ...
