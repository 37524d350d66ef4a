"""The checkpoint store: references, atomic publishing, concurrent versions, crash safety."""

import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from llmctl.core.errors import LlmctlError
from llmctl.core.store import MANIFEST, Store, weights_sha256


def _folder(store: Store, stage: str, name: str, payload: bytes = b"w") -> Path:
    run = store.new_run_dir(stage, name)
    (run / "model.safetensors").write_bytes(payload)
    (run / "config.json").write_text("{}")
    return run


def _publish(store, name, value=None, payload=b"w"):
    manifest = {"kind": "mlm", "objective": {"metric": "eval/loss", "mode": "min", "value": value}}
    return store.publish(_folder(store, "pretrain", name, payload), "pretrain", name, manifest)


def test_publish_numbers_versions_and_moves_latest(tmp_path):
    store = Store(tmp_path)
    a, b = _publish(store, "x", 3.0), _publish(store, "x", 2.0)
    assert (a.ref, b.ref) == ("pretrain/x@v001", "pretrain/x@v002")
    assert (tmp_path / "pretrain/x/latest").read_text().strip() == "v002"
    manifest = json.loads((b.path / MANIFEST).read_text())
    assert manifest["version"] == 2 and manifest["stage"] == "pretrain" and manifest["name"] == "x"
    assert not any((tmp_path / "pretrain/x/.runs").iterdir())  # the run folder became the version


def test_references_resolve(tmp_path):
    store = Store(tmp_path)
    _publish(store, "x", 3.0, b"a")
    _publish(store, "x", 1.0, b"b")
    _publish(store, "x", 2.0, b"c")
    assert store.resolve("pretrain/x").ref == "pretrain/x@v003"
    assert store.resolve("pretrain/x@latest").ref == "pretrain/x@v003"
    assert store.resolve("pretrain/x@v1").ref == "pretrain/x@v001"
    assert store.resolve("pretrain/x@best").ref == "pretrain/x@v002"  # lowest eval/loss
    folder = store.resolve("pretrain/x@v2").path
    assert store.resolve(str(folder)).path == folder  # any HF folder path is a reference too
    assert store.resolve(str(folder)).manifest["version"] == 2


@pytest.mark.parametrize(
    "ref, fragment",
    [
        ("pretrain/nope", "no checkpoint pretrain/nope"),
        ("pretrain/x@v9", "has no version v9"),
        ("not/a/ref/at/all", "neither a checkpoint"),
        ("finetune/x", "no checkpoint finetune/x"),
    ],
)
def test_bad_references_say_what_and_how(tmp_path, ref, fragment):
    store = Store(tmp_path)
    _publish(store, "x", 1.0)
    with pytest.raises(LlmctlError, match=fragment) as e:
        store.resolve(ref)
    assert "\n" not in str(e.value)


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlmctlError, match="not an HF model folder"):
        Store(tmp_path).resolve(str(tmp_path / "empty"))


def _publish_in_child(root, n):
    store = Store(root)
    _publish(store, "same", float(n), str(n).encode())


def test_concurrent_writers_get_distinct_versions(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_publish_in_child, args=(str(tmp_path), i)) for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    store = Store(tmp_path)
    assert store.versions("pretrain", "same") == [1, 2, 3, 4, 5, 6]
    hashes = {weights_sha256(store.name_dir("pretrain", "same") / f"v00{v}") for v in range(1, 7)}
    assert len(hashes) == 6  # six different payloads, none lost or overwritten


def _die_during_publish(root, at):
    """Publish, but SIGKILL ourselves at a given point (before / after the rename into vNNN)."""
    import signal

    real_rename, real_replace = os.rename, os.replace

    def rename(src, dst):
        if at == "before-rename" and str(dst).endswith("v002"):
            os.kill(os.getpid(), signal.SIGKILL)
        real_rename(src, dst)

    def replace(src, dst):
        if at == "before-latest" and str(dst).endswith("latest"):
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    os.rename, os.replace = rename, replace
    _publish(Store(root), "x", 1.0, b"second")


@pytest.mark.parametrize("at", ["before-rename", "before-latest"])
def test_sigkill_while_saving_leaves_latest_on_a_complete_version(tmp_path, at):
    store = Store(tmp_path)
    first = _publish(store, "x", 1.0, b"first")
    p = mp.get_context("spawn").Process(target=_die_during_publish, args=(str(tmp_path), at))
    p.start()
    p.join()
    assert p.exitcode == -9
    resolved = store.resolve("pretrain/x")
    assert resolved.ref == first.ref  # latest still names the previous complete version
    assert (resolved.path / "model.safetensors").read_bytes() == b"first"
    for v in store.versions("pretrain", "x"):  # whatever exists as a version is complete
        assert (store.name_dir("pretrain", "x") / f"v00{v}" / MANIFEST).is_file()


def test_remove_moves_latest_back(tmp_path):
    store = Store(tmp_path)
    _publish(store, "x", 1.0)
    _publish(store, "x", 2.0)
    assert store.remove("pretrain/x@v2") == ["pretrain/x@v002"]
    assert store.resolve("pretrain/x").ref == "pretrain/x@v001"
    with pytest.raises(LlmctlError):
        store.remove("pretrain/x")  # a bare name is refused: say @vN or @all
    store.remove("pretrain/x@all")
    assert store.versions("pretrain", "x") == []


def test_lineage_follows_parents(tmp_path):
    store = Store(tmp_path)
    a = _publish(store, "a", 1.0)
    from llmctl.core.store import parent_entry

    run = _folder(store, "finetune", "b")
    b = store.publish(run, "finetune", "b", {"kind": "seq-cls", "parents": [parent_entry(a, "init")]})
    assert [r.ref for r in store.lineage(b.ref)] == ["finetune/b@v001", "pretrain/a@v001"]
    assert b.manifest["parents"][0]["weights_sha256"] == weights_sha256(a.path)


def test_a_removed_versions_number_is_never_given_to_another_model(tmp_path):
    store = Store(tmp_path)
    for payload in (b"a", b"b", b"c"):
        _publish(store, "x", 1.0, payload)
    store.remove("pretrain/x@v3")
    assert (
        _publish(store, "x", 1.0, b"d").ref == "pretrain/x@v004"
    )  # not v003 again: a child of v003 must not point here
    store.remove("pretrain/x@all")
    assert _publish(store, "x", 1.0, b"e").ref == "pretrain/x@v005"


def test_weights_are_checked_against_the_manifest(tmp_path):
    from llmctl.core.store import parent_entry, verify_weights

    store = Store(tmp_path)
    run = _folder(store, "pretrain", "x", b"original")
    a = store.publish(run, "pretrain", "x", {"kind": "mlm", "weights_sha256": weights_sha256(run)})
    assert verify_weights(a) == weights_sha256(a.path)
    assert parent_entry(a, "init")["weights_sha256"] == weights_sha256(a.path)
    (a.path / "model.safetensors").write_bytes(b"damaged")
    with pytest.raises(LlmctlError, match="do not match the manifest") as e:
        verify_weights(a, what="init_from")
    assert "\n" not in str(e.value) and "pretrain/x@v001" in str(e.value)
    assert parent_entry(a, "init")["weights_sha256"] == weights_sha256(a.path)  # the files' hash, not the manifest's


def _hold_lock(run_dir, ready, release):
    from llmctl.core.store import RunLock

    lock = RunLock(run_dir)
    assert lock.try_acquire()
    ready.set()
    release.wait(60)


def test_a_run_lock_is_exclusive_across_processes(tmp_path):
    from llmctl.core.store import RunLock

    run_dir = Store(tmp_path).new_run_dir("pretrain", "x")
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(run_dir), ready, release))
    holder.start()
    assert ready.wait(60)
    mine = RunLock(run_dir)
    assert not mine.try_acquire() and mine.holder() == str(holder.pid)
    release.set()
    holder.join()
    assert mine.try_acquire()  # the lock dies with its process
    mine.release()


@pytest.mark.parametrize("garbage", [b"\xff\xfe\x00binary\x9c", b"", b"v999\n", b"hello ../../etc\n", b"v001extra"])
def test_a_garbled_latest_is_reported_and_repaired_under_the_lock(tmp_path, capsys, garbage):
    store = Store(tmp_path)
    _publish(store, "x", 1.0)
    _publish(store, "x", 2.0)
    pointer = store.name_dir("pretrain", "x") / "latest"
    pointer.write_bytes(garbage)
    assert [e[2] for e in store.entries()] == [1, 2]  # listing the store does not fail on it
    assert store.resolve("pretrain/x").ref == "pretrain/x@v002"
    assert "warning" in capsys.readouterr().err
    assert pointer.read_text() == "v002\n"  # repaired: the next reader is not warned again
    store.resolve("pretrain/x")
    assert capsys.readouterr().err == ""


def test_latest_naming_an_older_version_is_respected(tmp_path, capsys):
    store = Store(tmp_path)
    _publish(store, "x", 1.0)
    _publish(store, "x", 2.0)
    (store.name_dir("pretrain", "x") / "latest").write_text("v001\n")  # a user pinned it back on purpose
    assert store.resolve("pretrain/x").ref == "pretrain/x@v001"
    assert capsys.readouterr().err == ""


def test_lineage_says_removed_for_a_parent_that_was_removed(tmp_path):
    from llmctl.core.store import parent_entry

    store = Store(tmp_path)
    a = _publish(store, "a", 1.0)
    b = store.publish(
        _folder(store, "finetune", "b"), "finetune", "b", {"kind": "seq-cls", "parents": [parent_entry(a, "init")]}
    )
    assert store.children("pretrain", "a", [1]) == [("finetune/b@v001", "pretrain/a@v001")]
    store.remove("pretrain/a@all")
    _publish(store, "a", 5.0, b"another model")  # takes v002, never v001
    chain = store.lineage(b.ref)
    assert [r.ref for r in chain] == ["finetune/b@v001", "pretrain/a@v001"]
    assert chain[1].manifest["missing"] == "removed"


def test_a_store_root_that_is_a_file_or_missing_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(LlmctlError, match="is a file"):
        Store(tmp_path / "f")
    with pytest.raises(LlmctlError, match="no checkpoint store"):
        Store(tmp_path / "typo", must_exist=True)
    assert Store(tmp_path / "new").root == tmp_path / "new"  # a stage creates it


def test_runs_lists_unpublished_runs_and_gc_removes_what_cannot_resume(tmp_path):
    import time

    from llmctl.core.store import RunLock, state_dir

    store = Store(tmp_path)
    dead = store.new_run_dir("pretrain", "x")  # killed before it saved any state
    (dead / "metrics.jsonl").write_text("{}\n")
    resumable = store.new_run_dir("pretrain", "x")
    state_dir(resumable).mkdir()
    (state_dir(resumable) / "trainer_state.json").write_text(json.dumps({"step": 7}))
    live = store.new_run_dir("pretrain", "y")
    lock = RunLock(live)
    assert lock.try_acquire()
    try:
        runs = {r["id"]: r for r in store.runs()}
        assert set(runs) == {dead.name, resumable.name, live.name}
        assert runs[resumable.name]["step"] == 7 and runs[resumable.name]["resumable"]
        assert not runs[dead.name]["resumable"] and not runs[dead.name]["live"]
        assert runs[live.name]["live"]
        assert not store.remove_run(live)  # a live process's run is never removed
        assert store.remove_run(dead)
        assert not dead.exists() and {r["id"] for r in store.runs()} == {resumable.name, live.name}
        assert runs[resumable.name]["age"] < 60 and time.time() > 0
    finally:
        lock.release()
