"""`llmctl distill` on tiny models: a student from teacher layers learns the teacher's task, its manifest
names the teacher and holds both models' figures, it reloads with plain from_pretrained; a causal LM
distils on a text corpus; any checkpoint can be the student."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cls_args, run_inprocess
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from llmctl.core.store import Store


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, bases, reviews):
    root = tmp_path_factory.mktemp("distill")
    code, err = run_inprocess("finetune", *cls_args(bases, reviews, root, "name=t"))
    assert code == 0, err
    return root


def _distill(root, *extra):
    code, err = run_inprocess(
        "distill",
        "teacher=finetune/t",
        "train.max_steps=60",
        "train.batch_size=8",
        "train.eval_every=20",
        "train.lr=3e-3",
        "patience=0",
        "precision=fp32",
        f"output_root={root}",
        "cost.runs=3",
        "cost.throughput_runs=1",
        "cost.seq_len=32",
        *extra,
    )
    assert code == 0, err


def test_a_student_from_teacher_layers_learns_the_teachers_task_and_records_both(teacher, reviews):
    _distill(teacher, "student.num_layers=1", "name=s")
    store = Store(teacher)
    res = store.resolve("distill/s")
    m = res.manifest
    assert [p["role"] for p in m["parents"]] == ["teacher"] and m["parents"][0]["ref"] == "finetune/t@v001"
    teacher_acc = m["metrics"]["teacher/test/accuracy"]
    assert m["metrics"]["test/accuracy"] >= 0.6 and teacher_acc >= 0.6, m[
        "metrics"
    ]  # 5 topics: chance is 0.2; seeded runs reach 0.8
    assert m["distill"]["kept_layers"] == [0] and m["distill"]["init"] == "from teacher layers [0]"
    before, after = m["compare"]["teacher"], m["compare"]["student"]
    assert before["primary"]["value"] == pytest.approx(teacher_acc)
    assert (
        after["cost"]["parameters"] < before["cost"]["parameters"]
        and after["cost"]["size_bytes"] < before["cost"]["size_bytes"]
    )
    assert after["delta"]["metric"] == pytest.approx(after["primary"]["value"] - before["primary"]["value"])
    log = [json.loads(line) for line in (res.path / "metrics.jsonl").read_text().splitlines()]
    terms = [r for r in log if "loss/kd" in r]
    assert terms and all("loss/ce" in r for r in terms) and terms[-1]["loss/kd"] < terms[0]["loss/kd"]
    model = AutoModelForSequenceClassification.from_pretrained(res.path)  # a plain HF checkpoint
    assert model.config.num_hidden_layers == 1
    assert list(model.config.id2label.values()) == m["task"]["labels"]


def test_a_random_student_and_an_existing_checkpoint_as_student(teacher):
    _distill(teacher, "student.num_layers=1", "student.init=random", "name=r")
    _distill(teacher, "student=distill/s", "name=again", "train.max_steps=10")
    store = Store(teacher)
    assert store.resolve("distill/r").manifest["distill"]["init"] == "random init"
    again = store.resolve("distill/again").manifest
    assert [p["role"] for p in again["parents"]] == ["init", "teacher"] and again["parents"][0][
        "ref"
    ] == "distill/s@v001"


def test_a_causal_lm_distils_next_token_logits_on_a_text_corpus(tmp_path, bases, corpus):
    code, err = run_inprocess(
        "distill",
        f"teacher={bases['gpt']}",
        "data=files",
        f"data.train={corpus}",
        "student.num_layers=1",
        "distill.hidden_weight=1.0",
        "train.max_steps=30",
        "train.batch_size=8",
        "train.eval_every=10",
        "train.lr=3e-3",
        "patience=0",
        "precision=fp32",
        f"output_root={tmp_path}",
        "name=g",
        "cost.enabled=false",
    )
    assert code == 0, err
    res = Store(tmp_path).resolve("distill/g")
    assert res.manifest["task"]["name"] == "clm" and res.manifest["kind"] == "causal-lm"
    log = [json.loads(line) for line in (res.path / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/hidden" in r for r in log)
    evals = [r["eval/loss"] for r in log if "eval/loss" in r]
    assert evals[-1] < evals[0]
    model = AutoModelForCausalLM.from_pretrained(res.path)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_a_head_pruned_bert_teacher_gives_its_students_its_per_layer_heads(teacher):
    """The student copied from a head-pruned teacher's layers has those layers' head counts (it crashed: the
    student was built with the config's full heads and the teacher's smaller matrices did not fit)."""
    code, err = run_inprocess(
        "prune",
        "init_from=finetune/t",
        "method=structured",
        "prune.heads=1",
        "prune.ffn=0",
        "name=tp",
        "precision=fp32",
        f"output_root={teacher}",
        "cost=off",
    )
    assert code == 0, err
    code, err = run_inprocess(
        "distill",
        "teacher=prune/tp",
        "student.num_layers=1",
        "name=from-pruned",
        "train.max_steps=4",
        "precision=fp32",
        f"output_root={teacher}",
        "cost=off",
    )
    assert code == 0, err
    student = Store(teacher).resolve("distill/from-pruned")
    assert student.manifest["artifact"]["format"] == "pruned" and student.manifest["artifact"]["attention_heads"] == [1]
    from llmctl.core.loading import load_checkpoint

    loaded = load_checkpoint(Store(teacher), "distill/from-pruned")
    assert loaded.model.bert.encoder.layer[0].attention.self.query.out_features == 16  # 1 head of 16
