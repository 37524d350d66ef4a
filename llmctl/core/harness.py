"""EleutherAI lm-evaluation-harness, in-process on an already loaded causal LM, offline.

    results = run_tasks(hf_lm(model, tokenizer, rt=rt), ["llmctl_arith"], documents=texts)
    results = run_tasks(served_lm("http://127.0.0.1:8000/v1", "finetune/x", tokenizer=folder), [...])  # over HTTP

The harness is an optional extra (`pip install 'llmctl[harness]'`); without it, asking for
harness tasks is one line with that hint. Tasks come from the harness's own registry plus local
task folders: llmctl ships `llmctl_arith` (assets/harness/, a small multiple-choice task of its own
making) and builds `llmctl_perplexity` on the fly from the documents `llmctl eval` scored, so the
harness's rolling-window perplexity and llmctl's packed-sequence perplexity are measured on the
same text. Local task files read their data with `dataset_path: json`, so nothing is fetched.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

from llmctl.core.errors import LlmctlError, first_line

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "harness"
PERPLEXITY_TASK = "llmctl_perplexity"
INSTALL = "pip install 'llmctl[harness]' (lm-eval==0.4.13)"


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def check_installed() -> None:
    if not available():
        raise LlmctlError(f"harness.tasks needs EleutherAI lm-evaluation-harness, which is not installed; {INSTALL}")


def task_folder(tmp: Path, include_path: str | None, documents: list[str] | None) -> list[str]:
    """Local task folders for the harness: llmctl's shipped tasks (their data paths made absolute),
    `llmctl_perplexity` over `documents`, and the user's include_path."""
    folder = tmp / "llmctl_tasks"
    folder.mkdir()
    for src in SHIPPED.iterdir():
        if src.suffix == ".yaml":
            (folder / src.name).write_text(src.read_text().replace("@HERE@", str(SHIPPED)))
    if documents:
        docs = tmp / "perplexity.jsonl"
        docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents if d.strip()))
        (folder / f"{PERPLEXITY_TASK}.yaml").write_text(
            f'task: {PERPLEXITY_TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "{docs}"\n'
            'test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
            "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
            "metadata:\n  version: 1.0\n"
        )
    paths = [str(folder)]
    if include_path:
        user = Path(str(include_path)).expanduser()
        if not user.is_dir():
            raise LlmctlError(
                f"harness.include_path={include_path}: no such folder; give a folder of lm-eval task YAML files"
            )
        paths.append(str(user.resolve()))
    return paths


def task_manager(paths: list[str], tasks: list[str]):
    """The harness's task registry with our folders; an unknown task name is one line."""
    import logging

    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=paths, include_defaults=False)  # llmctl's and the user's folders: fast
    if not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(
            include_path=paths
        )  # the harness's own registry too (indexes its thousands of task files)
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            import difflib

            close = difflib.get_close_matches(task, sorted(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise LlmctlError(
                f"harness.tasks: no lm-evaluation-harness task named {task!r}{hint}; llmctl ships llmctl_arith and "
                f"{PERPLEXITY_TASK}, harness.include_path=<folder> adds your own task YAML files"
            )
    return manager


def hf_lm(model, tokenizer, *, rt, batch_size: int = 8):
    """The harness's view of a loaded transformers model (its HFLM), on the run's device and precision."""
    check_installed()
    from lm_eval.models.huggingface import HFLM

    return HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        device=str(rt.device),
        batch_size=int(batch_size),
        dtype={"bf16": "bfloat16", "fp16": "float16"}.get(rt.precision, "float32"),
    )


def served_lm(base_url: str, model: str, *, tokenizer: str, max_length: int, batch_size: int = 8, api_key=None):
    """The harness's `local-completions` model: an OpenAI-compatible completions endpoint (`llmctl serve`, vLLM),
    scored through `echo` + `logprobs`, with the model's own tokenizer (a folder) tokenizing requests here."""
    check_installed()
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI(
        base_url=base_url.rstrip("/") + "/completions",
        model=model,
        tokenizer=str(tokenizer),
        tokenizer_backend="huggingface",
        tokenized_requests=True,
        max_length=int(max_length),
        batch_size=int(batch_size),
        num_concurrent=1,
        header={"Authorization": f"Bearer {api_key}"} if api_key else None,
    )


def run_tasks(
    lm,
    tasks: list[str],
    *,
    documents: list[str] | None = None,
    include_path: str | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    seed: int = 0,
) -> dict:
    """Run `tasks` on an lm-eval model (`hf_lm`, `served_lm`); returns {task: {metric: value}} (standard errors
    as `<metric>_stderr`)."""
    check_installed()
    tasks = [str(t) for t in tasks]
    if PERPLEXITY_TASK in tasks and not documents:
        raise LlmctlError(f"harness.tasks={PERPLEXITY_TASK} needs text documents (a causal LM evaluated on text data)")
    with tempfile.TemporaryDirectory(prefix="llmctl-harness-") as tmp:
        manager = task_manager(task_folder(Path(tmp), include_path, documents), tasks)
        from lm_eval import simple_evaluate

        try:  # the harness's own progress bars (it passes tqdm's `disable` itself) go nowhere: llmctl reports what ran
            with contextlib.redirect_stderr(io.StringIO()):
                out = simple_evaluate(
                    model=lm,
                    tasks=tasks,
                    task_manager=manager,
                    limit=limit,
                    num_fewshot=num_fewshot,
                    log_samples=False,
                    random_seed=seed,
                    numpy_random_seed=seed,
                    torch_random_seed=seed,
                    fewshot_random_seed=seed,
                    bootstrap_iters=1000,
                )
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise LlmctlError(
                f"harness.tasks={','.join(tasks)}: the harness failed ({type(e).__name__}: {first_line(str(e))})"
            ) from None
    results = {}
    for task, values in (out or {}).get("results", {}).items():
        clean = {}
        for key, value in values.items():
            name, _, _filter = key.partition(",")
            if isinstance(value, (int, float)) and name != "alias":
                clean[name] = (
                    int(value) if name == "sample_len" else float(value)
                )  # "acc,none" → acc, "acc_stderr,none" → acc_stderr
        results[task] = clean
    return results
