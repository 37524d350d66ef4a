"""Runs around a stage: resume takes only what the interrupted run was, never a live process's run,
and the resumable state outlives every failure until the version is published."""

import contextlib
import multiprocessing as mp
import os
import re
import signal

from conftest import cls_args, metrics_log, run_inprocess, tiny
from transformers import AutoTokenizer

from llmctl.core.store import RunLock, Store
from llmctl.core.train import Trainer


def _interrupted(corpus, out, monkeypatch, *extra):
    """A pretrain run stopped by SIGTERM at step 4: resumable, unpublished."""
    real = Trainer._optimizer_step

    def step(self, batches, accum):
        if self.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batches, accum)

    monkeypatch.setattr(Trainer, "_optimizer_step", step)
    code, err = run_inprocess("pretrain", *tiny("clm", corpus, out, "name=r", *extra))
    monkeypatch.undo()
    assert code == 143, err
    runs = Store(out).resumable_runs("pretrain", "r")
    assert len(runs) == 1
    return runs[0]


def _hold(run_dir, ready, release):
    lock = RunLock(run_dir)
    assert lock.try_acquire()
    ready.set()
    release.wait(120)


def test_resume_auto_leaves_a_run_that_a_live_process_holds(corpus, tmp_path, monkeypatch, capsys):
    held = _interrupted(corpus, tmp_path, monkeypatch)
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(held), ready, release))  # e.g. another sweep job still on it
    holder.start()
    try:
        assert ready.wait(60)
        code, err = run_inprocess("pretrain", *tiny("clm", corpus, tmp_path, "name=r", "resume=auto"))
        assert code == 0, err
    finally:
        release.set()
        holder.join()
    assert "belongs to a live process" in capsys.readouterr().out
    published = Store(tmp_path).resolve("pretrain/r")
    assert metrics_log(published.path)[0]["step"] == 0  # a fresh run, not a take-over
    assert Store(tmp_path).resumable_runs("pretrain", "r") == [held]  # the live run is untouched


def test_resume_refuses_a_run_of_other_data(corpus, tmp_path, monkeypatch):
    _interrupted(corpus, tmp_path, monkeypatch)
    code, err = run_inprocess("pretrain", *tiny("clm", corpus, tmp_path, "name=r", "resume=auto", "data.max_docs=20"))
    assert code == 2 and "trained with other data" in err and "\n" not in err
    assert Store(tmp_path).versions("pretrain", "r") == []


def test_the_resumable_state_survives_a_failed_publish(corpus, tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Store, "publish", broken)
    args = tiny("clm", corpus, tmp_path, "name=r", "train.max_steps=10", "train.save_every=5")
    with contextlib.suppress(OSError):
        run_inprocess("pretrain", *args)
    monkeypatch.undo()
    assert Store(tmp_path).versions("pretrain", "r") == []
    assert len(Store(tmp_path).resumable_runs("pretrain", "r")) == 1  # still resumable: the state was kept
    code, err = run_inprocess("pretrain", *args, "resume=auto")
    assert code == 0, err
    assert Store(tmp_path).versions("pretrain", "r") == [1]


def test_a_damaged_parent_is_refused_in_one_line(corpus, tmp_path):
    assert run_inprocess("pretrain", *tiny("clm", corpus, tmp_path, "name=p", "train.max_steps=2"))[0] == 0
    weights = Store(tmp_path).resolve("pretrain/p").path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last weight
    weights.write_bytes(bytes(data))
    code, err = run_inprocess("pretrain", *tiny("clm", corpus, tmp_path, "name=c", "init_from=pretrain/p"))
    assert code == 2 and "do not match the manifest" in err and "\n" not in err
    assert Store(tmp_path).versions("pretrain", "c") == []


def test_a_resume_may_extend_max_steps_and_the_manifest_records_it(corpus, tmp_path, monkeypatch):
    _interrupted(corpus, tmp_path, monkeypatch)  # 16 steps planned, stopped at step 4
    code, err = run_inprocess("pretrain", *tiny("clm", corpus, tmp_path, "name=r", "resume=auto", "train.max_steps=20"))
    assert code == 0, err
    published = Store(tmp_path).resolve("pretrain/r")
    resumed = published.manifest["resumed"]
    assert resumed["changed"] == {"train.max_steps": [16, 20]} and resumed["from_step"] >= 4
    assert metrics_log(published.path)[-1]["step"] == 20


def test_a_crash_after_a_saved_state_leaves_each_step_once_in_tensorboard(corpus, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    real = Trainer._optimizer_step

    def crash(self, batches, accum):
        if self.step == 7:
            raise RuntimeError("power cut")  # steps 5-7 were logged after the state saved at step 4
        return real(self, batches, accum)

    monkeypatch.setattr(Trainer, "_optimizer_step", crash)
    args = tiny("clm", corpus, tmp_path, "name=r", "train.save_every=4")
    with contextlib.suppress(RuntimeError):
        run_inprocess("pretrain", *args)
    monkeypatch.undo()
    assert len(Store(tmp_path).resumable_runs("pretrain", "r")) == 1  # failed after a saved state: kept, resumable
    assert run_inprocess("pretrain", *args, "resume=auto")[0] == 0
    events = EventAccumulator(str(Store(tmp_path).resolve("pretrain/r").path / "tb"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(1, 17)), steps  # each step once: what the crashed run logged after step 4 is purged


def test_a_run_that_fails_before_saving_a_state_leaves_nothing(bases, reviews, tmp_path):
    from conftest import cls_args

    code, err = run_inprocess(
        "finetune", *cls_args(bases, reviews, tmp_path, "method=freeze", "method.freeze_layers=99")
    )
    assert code == 2 and "freeze_layers" in err
    assert [p for p in tmp_path.rglob("*") if ".cache" not in p.parts] == []


def _float_dtypes(folder) -> set:
    """The floating dtypes of a folder's weights (a quantized tensor's scales are part of its encoding: left out)."""
    from safetensors import safe_open

    from llmctl.core.store import weight_files

    (weights,) = weight_files(folder)  # model.safetensors, or llmctl-quantized.safetensors for a quantized folder
    with safe_open(str(weights), "pt") as fh:
        dtypes = {k: fh.get_slice(k).get_dtype() for k in fh.keys() if "scale" not in k and "zero_point" not in k}
    return set(dtypes.values()) & {"F32", "BF16", "F16"}


def test_a_bf16_parent_loads_in_fp32_and_every_child_is_saved_as_it_was(bases, reviews, tmp_path):
    """The dtype rule: fp32 in memory (fp32 master weights while training, the same measurement for every
    checkpoint), saved as the input was stored (save_dtype=auto), stated in the manifest. A bf16 classifier
    goes through finetune, distill, prune and quantize: each child is bf16 on disk, no larger than its parent."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from llmctl.core.loading import load_checkpoint
    from llmctl.core.store import weight_files

    out = tmp_path / "store"
    assert run_inprocess("finetune", *cls_args(bases, reviews, out, "name=c", "train.max_steps=4"))[0] == 0
    parent = tmp_path / "bf16"
    model = AutoModelForSequenceClassification.from_pretrained(Store(out).resolve("finetune/c").path)
    model.to(torch.bfloat16).save_pretrained(parent)
    AutoTokenizer.from_pretrained(bases["enc"]).save_pretrained(parent)
    assert _float_dtypes(parent) == {"BF16"}

    loaded = load_checkpoint(Store(out), str(parent))
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32} and loaded.dtype == "bfloat16"
    data = ["data=files", f"data.train={reviews / 'train.csv'}", f"data.validation={reviews / 'dev.csv'}"]
    data += ["data.text_column=review", "data.label_column=sentiment", "data.max_seq_len=48"]
    short = ["train.max_steps=2", "precision=fp32", f"output_root={out}", "cost=off"]
    runs = {
        "finetune/ft": ("finetune", "task=classification", f"init_from={parent}", "name=ft", *data, *short[:3]),
        "distill/ds": ("distill", f"teacher={parent}", "student.num_layers=1", "name=ds", *data, *short),
        "prune/pr": ("prune", f"init_from={parent}", "method=structured", "amount=0.5", "name=pr", *data, *short),
        "quantize/qz": ("quantize", f"init_from={parent}", "method=int8-weight", "name=qz", *data, *short),
    }
    size = (parent / "model.safetensors").stat().st_size
    for ref, args in runs.items():
        code, err = run_inprocess(*args)
        assert code == 0, f"{ref}: {err}"
        child = Store(out).resolve(ref)
        assert child.manifest["artifact"]["dtype"] == "bfloat16", ref
        assert "BF16" in _float_dtypes(child.path) and "F32" not in _float_dtypes(child.path), ref
        assert sum(f.stat().st_size for f in weight_files(child.path)) <= 1.05 * size, ref
        again = load_checkpoint(Store(out), ref)
        assert all(p.dtype == torch.float32 for p in again.model.parameters() if p.is_floating_point()), ref


def test_a_resumed_run_says_where_its_weights_come_from(corpus, tmp_path, monkeypatch, capsys):
    _interrupted(corpus, tmp_path, monkeypatch)
    capsys.readouterr()
    code, err = run_inprocess("pretrain", *tiny("clm", corpus, tmp_path, "name=r", "resume=auto"))
    out = capsys.readouterr().out
    assert code == 0, err
    assert re.search(r"weights from the interrupted run's state \(\S+, step 5\)", out) and "random init" not in out
