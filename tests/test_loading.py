"""The one loader: any reference → model, tokenizer, task; heads replaced only where asked; weights
that do not match their config (or their manifest) are refused in one line."""

import json
import re
import shutil

import pytest
from conftest import cls_args, run_inprocess

from llmctl.core.errors import LlmctlError
from llmctl.core.loading import FORMATS, load_checkpoint
from llmctl.core.store import Store


@pytest.fixture(scope="module")
def classifier(bases, reviews, tmp_path_factory):
    out = tmp_path_factory.mktemp("loading")
    assert run_inprocess("finetune", *cls_args(bases, reviews, out, "name=c", "train.max_steps=2"))[0] == 0
    return Store(out)


def test_a_checkpoint_loads_as_its_own_kind_with_its_task(classifier):
    loaded = load_checkpoint(classifier, "finetune/c")
    assert loaded.kind == "seq-cls" and type(loaded.model).__name__ == "BertForSequenceClassification"
    assert loaded.task["name"] == "classification" and loaded.task["labels"][0] == "business"
    assert loaded.artifact == {"format": "hf", "class": "BertForSequenceClassification", "dtype": "float32"}
    assert (
        loaded.parent("init")["weights_sha256"]
        == loaded.sha256
        == classifier.resolve("finetune/c").manifest["weights_sha256"]
    )
    assert loaded.model.config.id2label[4] == "tech" and loaded.tokenizer("the bank")["input_ids"]


def test_a_task_head_of_another_shape_is_replaced_when_asked(classifier):
    head = {"num_labels": 3, "id2label": {0: "a", 1: "b", 2: "c"}, "label2id": {"a": 0, "b": 1, "c": 2}}
    loaded = load_checkpoint(classifier, "finetune/c", kind="seq-cls", head=head)
    assert loaded.model.classifier.weight.shape[0] == 3
    before = load_checkpoint(classifier, "finetune/c").model
    assert (
        loaded.model.bert.encoder.layer[0].output.dense.weight == before.bert.encoder.layer[0].output.dense.weight
    ).all()


def _copy_with_config(classifier, tmp_path, **changes):
    folder = tmp_path / "copy"
    shutil.copytree(classifier.resolve("finetune/c").path, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_any_other_mismatch_names_the_tensor_and_both_shapes(classifier, tmp_path):
    folder = _copy_with_config(classifier, tmp_path, intermediate_size=128)  # the weights say 64
    head = {"num_labels": 5}
    with pytest.raises(LlmctlError) as e:
        load_checkpoint(classifier, str(folder), kind="seq-cls", head=head)
    msg = str(e.value)
    assert re.search(
        r"intermediate\.dense\.bias has shape \[64\] in the checkpoint but \[128\] "
        r"in its config\.json \(and \d+ more\)",
        msg,
    ), msg
    assert "\n" not in msg


def test_a_head_mismatch_without_a_new_head_is_refused(classifier, tmp_path):
    folder = _copy_with_config(classifier, tmp_path, id2label={"0": "a", "1": "b"}, label2id={"a": 0, "b": 1})
    with pytest.raises(LlmctlError, match=r"classifier.bias has shape \[5\] in the checkpoint but \[2\]"):
        load_checkpoint(classifier, str(folder), kind="seq-cls")


def test_a_plain_hf_folder_and_an_unknown_format(classifier, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(classifier.resolve("finetune/c").path, plain)
    (plain / "llmctl.json").unlink()
    loaded = load_checkpoint(classifier, str(plain))
    assert loaded.kind == "seq-cls" and loaded.task is None and loaded.artifact == {"format": "hf"}
    manifest = json.loads((classifier.resolve("finetune/c").path / "llmctl.json").read_text())
    manifest["artifact"] = {"format": "from-the-future"}
    odd = tmp_path / "odd"
    shutil.copytree(plain, odd)
    (odd / "llmctl.json").write_text(json.dumps(manifest))
    with pytest.raises(LlmctlError, match="'from-the-future', which this llmctl cannot load"):
        load_checkpoint(classifier, str(odd))
    assert "hf" in FORMATS
