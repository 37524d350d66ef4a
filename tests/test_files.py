"""core/files.py: writes land whole or not at all; a full disk is one line naming the folder and the bytes
needed, and leaves nothing hidden behind (tested on a real, tiny tmpfs where the machine allows mounting one)."""

from __future__ import annotations

import contextlib
import subprocess

import pytest
from conftest import run_inprocess, tiny

from llmctl.core.errors import LlmctlError
from llmctl.core.files import atomic_path, disk_space, write_json
from llmctl.core.store import Store
from llmctl.core.train import Trainer


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "record.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("cut off")
    assert target.read_text() == '{\n  "a": 1\n}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_a_full_disk_is_one_line_with_the_folder_and_the_bytes_needed(tmp_path):
    with pytest.raises(LlmctlError) as e, disk_space(tmp_path, 3 * 2**20, "the resumable state"):
        raise OSError(28, "No space left on device")
    assert str(e.value).startswith(f"no space left on the device of {tmp_path} (")
    assert "the resumable state needs about 3.0 MiB" in str(e.value) and "output_root=" in str(e.value)
    with pytest.raises(LlmctlError, match="no space left"), disk_space(tmp_path):  # safetensors' own wording
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")


@contextlib.contextmanager
def _tmpfs(folder, size: str):
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root, or no mount privilege)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_disk_that_fills_during_training_ends_in_one_line_and_leaves_nothing_hidden(corpus, tmp_path, monkeypatch):
    with _tmpfs(tmp_path / "small", "8m") as root:
        real = Trainer._optimizer_step

        def fill_then_step(self, batches, accum):
            if self.step == 3:  # the state saved after step 4 will not fit
                with contextlib.suppress(OSError), open(root / "filler", "wb") as fh:
                    while True:
                        fh.write(b"\0" * 65536)
            return real(self, batches, accum)

        monkeypatch.setattr(Trainer, "_optimizer_step", fill_then_step)
        code, err = run_inprocess("pretrain", *tiny("clm", corpus, root, "name=full", "train.save_every=4"))
        assert code == 2 and "\n" not in err, err
        assert err.startswith(f"no space left on the device of {root}") and "needs about" in err
        leftovers = [p for p in root.rglob("*") if p.name.startswith(".") and p.name.endswith((".tmp", ".old"))]
        assert not leftovers, leftovers
        assert Store(root).runs() == [] and not Store(root).versions("pretrain", "full")  # the failed run is gone


def test_the_leftovers_of_a_cut_off_write_are_listed_and_collected(tmp_path):
    """A state write killed half-way (a hidden `.<run>.state.<x>.tmp`) is seen by ckpt runs and removed by gc."""
    store = Store(tmp_path)
    run = store.new_run_dir("pretrain", "x")
    leftover = run.with_name(f".{run.name}.state.ab12cd34.tmp")
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 1000)
    (listed,) = store.runs()
    assert listed["id"] == run.name and listed["leftovers"] == [leftover.name] and listed["size"] >= 1000
    assert store.remove_run(run) and not leftover.exists() and store.runs() == []
