"""Fine-tuning as a function (what prune's recovery and distill call): model + task + configs +
run in, trained model + metrics out; the model is on the run's device before anything runs on it."""

import pytest
import torch
from conftest import reviews  # noqa: F401 - fixture
from omegaconf import OmegaConf

from llmctl.core import run as stage_run
from llmctl.core.data import load_data
from llmctl.core.finetuning import finetune
from llmctl.core.loading import load_checkpoint
from llmctl.core.store import Store
from llmctl.core.tasks import prepare

TRAIN = {
    "max_steps": 40,
    "batch_size": 8,
    "grad_accum": 1,
    "lr": 3e-3,
    "weight_decay": 0.0,
    "betas": [0.9, 0.999],
    "warmup_ratio": 0.0,
    "scheduler": "constant",
    "max_grad_norm": 1.0,
    "eval_every": 20,
    "eval_batches": None,
    "log_every": 10,
    "save_every": 0,
    "num_workers": 0,
}


def _run(tmp_path, name):
    cfg = OmegaConf.create(
        {
            "name": name,
            "output_root": str(tmp_path),
            "device": "cpu",
            "precision": "fp32",
            "seed": 0,
            "resume": None,
            "objective_metric": None,
            "objective_mode": None,
        }
    )
    return stage_run.start("finetune", cfg)


def _task(source, reviews, task="classification"):  # noqa: F811
    data = load_data(
        OmegaConf.create(
            {
                "train": str(reviews / "train.csv"),
                "validation": str(reviews / "dev.csv"),
                "test": str(reviews / "test.csv"),
                "text_column": "review",
                "label_column": "sentiment",
            }
        ),
        task="classification",
    )
    return prepare(task, data, source.tokenizer, max_seq_len=48, batch_size=8)


def test_finetune_is_a_function_a_stage_can_call_with_its_own_loss(bases, reviews, tmp_path):  # noqa: F811
    source = load_checkpoint(Store(tmp_path), str(bases["enc"]), kind="seq-cls", head=None)
    task = _task(source, reviews)
    model = load_checkpoint(Store(tmp_path), str(bases["enc"]), kind="seq-cls", head=task.head).model
    calls = []

    def counting_loss(m, batch):  # distill passes its own loss here
        calls.append(1)
        return m(**batch).loss

    with _run(tmp_path, "fn") as run:
        stage_run.open_run_dir(run, {"data_fingerprint": task.data.fingerprint})
        result = finetune(
            model,
            source.tokenizer,
            task,
            OmegaConf.create(TRAIN),
            run,
            select=("eval/loss", "min"),
            loss_fn=counting_loss,
        )
    assert len(calls) == 40
    m = result.metrics
    assert (
        m["eval/loss"] < 1.55 and "test/accuracy" in m and m["parameters/trainable_share"] == 1.0
    )  # chance loss is ln 5 = 1.61
    assert type(result.model).__name__ == "BertForSequenceClassification"
    assert not (run.run_dir / "best.safetensors").exists()


def test_sft_moves_the_model_to_the_run_device_before_sampling(bases, tmp_path, monkeypatch):
    from transformers import GPT2LMHeadModel

    source = load_checkpoint(Store(tmp_path), str(bases["gpt"]), kind="causal-lm")
    data = load_data(
        OmegaConf.create({"source": "tiny-instruct", "split_ratio": [0.8, 0.2, 0.0], "split_seed": 0}), task="sft"
    )
    task = prepare("sft", data, source.tokenizer, max_seq_len=64, batch_size=8)
    events = []
    real_to, real_generate = torch.nn.Module.to, GPT2LMHeadModel.generate

    def to(self, *args, **kwargs):
        events.append(("to", str(args[0]) if args else str(kwargs.get("device"))))
        return real_to(self, *args, **kwargs)

    def generate(self, *args, **kwargs):
        events.append(("generate", str(kwargs["input_ids"].device), str(next(self.parameters()).device)))
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(GPT2LMHeadModel, "to", to)
    monkeypatch.setattr(GPT2LMHeadModel, "generate", generate)
    with _run(tmp_path, "sft") as run:
        stage_run.open_run_dir(run, {})
        finetune(
            source.model,
            source.tokenizer,
            task,
            OmegaConf.create({**TRAIN, "max_steps": 2, "eval_every": 0}),
            run,
            samples=2,
            max_new_tokens=3,
        )
    gens = [e for e in events if e[0] == "generate"]
    assert len(gens) == 4  # two prompts, before and after training
    first = events.index(gens[0])
    assert ("to", str(run.rt.device)) in events[
        :first
    ]  # on the run's device before the first sample (on CUDA: not after)
    assert all(inputs == model_device for _, inputs, model_device in gens)  # the prompts go where the model is
    assert (run.run_dir / "samples.jsonl").is_file()


@pytest.mark.parametrize("method, name", [("freeze", "freeze"), ("nope", "nope")])
def test_methods_are_validated(bases, tmp_path, method, name):
    from llmctl.core.errors import LlmctlError
    from llmctl.core.finetuning import apply_method

    model = load_checkpoint(Store(tmp_path), str(bases["enc"]), kind="seq-cls", head={"num_labels": 2}).model
    cfg = OmegaConf.create({"name": name, "freeze_layers": 7})
    with pytest.raises(
        LlmctlError,
        match="freeze_layers=7: the model has 2 layers" if method == "freeze" else "is not one of full, freeze, lora",
    ):
        apply_method(cfg, model, "classification")
