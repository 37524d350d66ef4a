"""The typed schema of the composed config, checked once before a stage runs.

Hydra composes the YAML presets and the command line; `validate(cfg, schema)` then checks every
value against pydantic models, so `train.lr=abc`, `seed=abc`, `train.batch_size=0` or
`train.max_steps=-5` stop with one line naming the key, the value and the fix, before anything is
loaded or written. The shared parts live here (`Common`, `Train`, `Data`); each stage module
declares its own `Config` (a subclass of `StageConfig`) for its keys. Unknown keys are Hydra's
business (struct mode: "did you mean"); keys added on purpose with `+key=` pass through.
"""

from __future__ import annotations

import codecs
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from llmctl.core.errors import LlmctlError

PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]


class Section(BaseModel):
    """A config section: typed keys; keys it does not declare pass (Hydra has already refused unknown ones)."""

    model_config = ConfigDict(extra="allow", coerce_numbers_to_str=True, allow_inf_nan=False)


class Train(Section):
    """conf/train/*.yaml: the shared training loop."""

    max_steps: int = Field(ge=0, description="0 publishes the initial weights (e.g. a random-init baseline)")
    batch_size: PosInt
    grad_accum: PosInt
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    betas: tuple[float, float]
    warmup_ratio: float = Field(ge=0, le=1)
    scheduler: Literal["linear", "cosine", "constant"]
    max_grad_norm: float = Field(ge=0)
    eval_every: NonNegInt
    eval_batches: int | None = Field(default=None, ge=1)
    log_every: PosInt
    save_every: NonNegInt
    num_workers: NonNegInt

    @field_validator("betas")
    @classmethod
    def _betas(cls, betas):
        if not all(0 <= b < 1 for b in betas):
            raise ValueError("both betas must be in [0, 1)")
        return betas


class Data(Section):
    """conf/data/*.yaml: where the data comes from and how it is split."""

    source: str | None = None
    config_name: str | None = None
    train: str | list[str] | None = None
    validation: str | list[str] | None = None
    test: str | list[str] | None = None
    text_column: str = "text"
    label_column: str = "label"
    text_pair_column: str | None = None
    split_ratio: tuple[float, float, float] = (0.95, 0.05, 0.0)
    split_seed: NonNegInt
    max_docs: int | None = Field(default=None, ge=1)
    dedupe: bool = True
    streaming: bool = False
    streaming_validation: int = Field(default=200, ge=1)
    streaming_sample: int = Field(default=10000, ge=1)
    encoding: str = "utf-8"
    max_seq_len: int = Field(ge=8)

    @field_validator("split_ratio")
    @classmethod
    def _ratio(cls, ratio, info: ValidationInfo):
        if any(r < 0 for r in ratio) or ratio[0] <= 0:
            raise ValueError(
                "shares are train / validation / test, non-negative with train above 0, e.g. [0.9,0.1,0.0]"
            )
        if ratio[1] <= 0 and not info.data.get("validation"):
            raise ValueError(
                "without data.validation=<file> the validation share must be above 0 (it selects the best "
                "checkpoint and stops early), e.g. [0.9,0.1,0.0]"
            )
        return ratio

    @field_validator("encoding")
    @classmethod
    def _encoding(cls, name):
        try:
            codecs.lookup(name)
        except LookupError:
            raise ValueError(
                "unknown text encoding; use a Python codec name such as utf-8, latin-1 or cp1252"
            ) from None
        return name


class Model(Section):
    """conf/model/*.yaml: the architecture (a transformers config) or pretrained weights."""

    family: Literal["bert", "gpt2", "llama", "qwen2", "qwen3", "mistral"] | None = None  # None: from the weights
    pretrained: str | None = None
    config: dict[str, Any] = {}


class Method(Section):
    """conf/method/*.yaml: what a fine-tune trains (core/finetuning.py)."""

    name: Literal["full", "freeze", "lora"]
    lr: float | None = Field(default=None, gt=0)
    freeze_layers: NonNegInt | None = None
    r: PosInt | None = None
    alpha: float | None = Field(default=None, gt=0)
    dropout: float | None = Field(default=None, ge=0, lt=1)
    target_modules: str | list[str] | None = None


class Cost(Section):
    """A `cost:` section (eval, distill, prune): how core.evaluation.measure_cost times a model."""

    enabled: bool = True
    seq_len: PosInt
    batch_size: PosInt
    warmup: NonNegInt
    runs: PosInt
    throughput_runs: PosInt
    decode_prompt: PosInt = 32
    decode_tokens: NonNegInt = 32
    decode_runs: PosInt = 3


class Common(Section):
    """conf/common.yaml: keys every stage shares."""

    name: str | None = None
    output_root: str
    init_from: str | None = None
    resume: str | None = None
    device: str | int | list[int] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    save_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: NonNegInt
    offline: bool = False
    objective_metric: str | None = None
    objective_mode: Literal["min", "max"] | None = None
    objectives: list[str] | None = None
    strategy: Literal["ddp", "fsdp"] = "ddp"
    dist_timeout_min: float = Field(default=60, gt=0)

    @field_validator("device")
    @classmethod
    def _device(cls, device):
        if isinstance(device, str) and device not in ("auto", "cpu", "cuda", "mps"):
            kind, _, index = device.partition(":")
            if kind != "cuda" or not index.isdigit():
                raise ValueError("use auto, cpu, cuda, cuda:N or a list of GPU ids such as [0,1]")
        if isinstance(device, int) and device < 0 or isinstance(device, list) and (not device or min(device) < 0):
            raise ValueError("GPU ids are non-negative integers, e.g. device=[0,1]")
        return device

    @field_validator("output_root")
    @classmethod
    def _root(cls, root):
        if not str(root).strip():
            raise ValueError("give a folder, e.g. output_root=outputs")
        return root


class StageConfig(Common):
    """A stage's whole config: the shared keys plus the stage's own (declared by each stage)."""


class TrainingStageConfig(StageConfig):
    """A stage that trains a model: the shared keys plus model, data and the training loop."""

    model: Model
    data: Data
    train: Train


class CheckpointStageConfig(StageConfig):
    """A stage that reshapes and trains a checkpoint it is given, on that checkpoint's own task (distill, prune)."""

    data: Data | None = None  # null = the checkpoint's own data, from its manifest
    train: Train
    max_seq_len: int | None = Field(default=None, ge=8)
    patience: NonNegInt
    cost: Cost


def validate(cfg, schema: type[BaseModel]) -> None:
    """Check the composed config against `schema`; the first problem becomes one LlmctlError line."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    data = {k: v for k, v in data.items() if k != "hydra"}
    try:
        schema.model_validate(_drop_missing(data))
    except ValidationError as e:
        raise LlmctlError(_line(e, data)) from None


def _drop_missing(node: Any) -> Any:
    """Leave `???` (required, unset) to the code that needs the key: it names the key and the fix."""
    if isinstance(node, dict):
        return {k: _drop_missing(v) for k, v in node.items() if v != "???"}
    return node


def _line(e: ValidationError, data: dict) -> str:
    err = e.errors(include_url=False)[0]
    parts, value = [], data  # the config key the error is about (pydantic adds list indices and union members)
    loc = list(err["loc"])
    for i, part in enumerate(loc):
        if not isinstance(value, dict) or part not in value:
            if isinstance(value, dict) and i + 1 < len(loc) and loc[i + 1] in value:
                continue  # a union member's name (student: Student | str): the key is the next part
            break
        parts.append(str(part))
        value = value[part]
    key = ".".join(parts) or "config"
    msg = err["msg"]
    kind = err["type"]
    if kind in ("int_parsing", "int_from_float", "int_type"):
        msg, example = "must be a whole number", "an integer"
    elif kind in ("float_parsing", "float_type"):
        msg, example = "must be a number", "a number such as 3e-4"
    elif kind in ("bool_parsing", "bool_type"):
        msg, example = "must be true or false", "true or false"
    elif kind == "literal_error":
        example = msg.split("Input should be ", 1)[-1].replace("'", "")
        msg = "is not one of the choices"
    elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        ((bound, limit),) = ((k, v) for k, v in (err.get("ctx") or {}).items() if k in ("ge", "gt", "le", "lt"))
        words = {
            "ge": ("at least", "or more"),
            "gt": ("above", None),
            "le": ("at most", "or less"),
            "lt": ("below", None),
        }[bound]
        limit = f"{limit:g}" if isinstance(limit, (int, float)) else limit
        msg = f"must be {words[0]} {limit}"
        return f"bad config value {key}={_show(value)}: {msg}; set {key}=" + (
            f"{limit} {words[1]}" if words[1] else f"<a value {words[0]} {limit}>"
        )
    elif kind == "finite_number":
        msg, example = "must be a finite number", "a number such as 3e-4"
    elif kind == "missing" and len(parts) < len(loc) and not isinstance(value, dict):  # a list of fixed length
        msg, example = "has too few values", f"{len(value) + 1 if isinstance(value, list) else 'more'} values"
    elif kind in ("too_short", "too_long"):
        msg, example = "has the wrong number of values", None
    elif kind == "missing":
        return f"{key} is required here; set {key}=<value>"
    else:
        msg = msg.removeprefix("Value error, ")
        example = None
    fix = f"; set {key}=<{example}>" if example else ""
    return f"bad config value {key}={_show(value)}: {msg}{fix}"


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return "null" if value is None else str(value)
