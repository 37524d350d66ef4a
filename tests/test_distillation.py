"""core/distillation.py: the loss against a hand computation, masking, students built from teacher layers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from llmctl.core.distillation import DistillLoss, evenly_spaced, kd_loss, student_from_teacher


def test_kd_loss_equals_a_hand_computation_on_fixed_logits():
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    t = torch.tensor([[1.0, 1.0, 0.0], [3.0, -2.0, 0.0]])
    T = 2.0
    expected = 0.0
    for row_s, row_t in zip(s.tolist(), t.tolist()):
        zs = [math.exp(v / T) for v in row_s]
        zt = [math.exp(v / T) for v in row_t]
        ps = [v / sum(zs) for v in zs]
        pt = [v / sum(zt) for v in zt]
        expected += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    expected = expected / 2 * T * T
    assert kd_loss(s, t, None, T).item() == pytest.approx(expected, rel=1e-6)
    # masked positions do not count; a fully masked batch is 0, not NaN
    assert kd_loss(s, t, torch.tensor([True, False]), T).item() == pytest.approx(
        kd_loss(s[:1], t[:1], None, T).item(), rel=1e-6
    )
    assert kd_loss(s, t, torch.tensor([False, False]), T).item() == 0.0


class _Out:
    def __init__(self, logits, loss=None):
        self.logits, self.loss, self.hidden_states = logits, loss, None


def test_the_causal_loss_shifts_masks_and_mixes_alpha():
    torch.manual_seed(0)
    s_logits, t_logits = torch.randn(1, 4, 5), torch.randn(1, 4, 5)
    labels = torch.tensor([[1, 2, -100, 3]])
    student = lambda **kw: _Out(s_logits, torch.tensor(1.5))  # noqa: E731
    teacher = lambda **kw: _Out(t_logits)  # noqa: E731
    loss, terms = DistillLoss(teacher, kind="causal-lm", alpha=0.25, temperature=1.0)(
        student, {"input_ids": torch.zeros(1, 4), "labels": labels}
    )
    mask = labels[:, 1:] != -100  # position i predicts token i + 1
    kd = kd_loss(s_logits[:, :-1], t_logits[:, :-1], mask, 1.0)
    assert terms["loss/kd"].item() == pytest.approx(kd.item()) and terms["loss/ce"].item() == pytest.approx(1.5)
    assert loss.item() == pytest.approx(0.25 * kd.item() + 0.75 * 1.5)
    all_masked = torch.full((1, 4), -100)
    nan_ce = lambda **kw: _Out(s_logits, torch.tensor(float("nan")))  # noqa: E731 - HF's mean over no labels
    loss, _ = DistillLoss(teacher, kind="causal-lm", alpha=0.5, temperature=2.0)(
        nan_ce, {"input_ids": torch.zeros(1, 4), "labels": all_masked}
    )
    assert loss.item() == 0.0


def test_evenly_spaced_layers_follow_distilbert():
    assert evenly_spaced(6, 3) == [0, 2, 4]
    assert evenly_spaced(12, 6) == [0, 2, 4, 6, 8, 10]
    assert evenly_spaced(30, 15)[:3] == [0, 2, 4] and evenly_spaced(5, 5) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_a_student_from_teacher_layers_holds_exactly_those_layers(family):
    torch.manual_seed(0)
    if family == "bert":
        teacher = BertForSequenceClassification(
            BertConfig(
                vocab_size=50,
                hidden_size=16,
                num_hidden_layers=4,
                num_attention_heads=2,
                intermediate_size=32,
                num_labels=3,
            )
        )
        layers = lambda m: m.bert.encoder.layer  # noqa: E731
    else:
        teacher = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=50,
                hidden_size=16,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=32,
            )
        )
        layers = lambda m: m.model.layers  # noqa: E731
    student, kept = student_from_teacher(teacher, num_layers=2)
    assert kept == [0, 2] and len(layers(student)) == 2
    for j, i in enumerate(kept):
        for (name, a), (_, b) in zip(layers(student)[j].state_dict().items(), layers(teacher)[i].state_dict().items()):
            assert torch.equal(a, b), name
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    random, none = student_from_teacher(teacher, num_layers=2, init="random")
    assert none == [] and not torch.equal(
        layers(random)[0].state_dict()[next(iter(layers(random)[0].state_dict()))],
        layers(teacher)[0].state_dict()[next(iter(layers(teacher)[0].state_dict()))],
    )


def test_alpha_zero_trains_on_the_hard_labels_without_running_the_teacher():
    def teacher(**kw):
        raise AssertionError("the teacher ran")

    student = lambda **kw: _Out(torch.zeros(1, 3, 4), torch.tensor(0.7))  # noqa: E731
    loss, terms = DistillLoss(teacher, kind="causal-lm", alpha=0.0, temperature=2.0)(
        student, {"input_ids": torch.zeros(1, 3), "labels": torch.ones(1, 3)}
    )
    assert loss.item() == pytest.approx(0.7) and set(terms) == {"loss/ce"}
