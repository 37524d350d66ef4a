"""The versioned checkpoint store shared by every stage.

Layout::

    <output_root>/<stage>/<name>/
        v001/ v002/ ...        complete versions: HF model files, tokenizer, llmctl.json (manifest)
        latest                 text file naming the newest complete version ("v002")
        .lock                  flock(2) target serialising version allocation
        .highwater             the highest version number ever given out (never reused after `rm`)
        .runs/<run-id>/        work in progress: metrics, TensorBoard events, weights; becomes vNNN
        .runs/<run-id>.state/  its resumable training state (deleted once the version is published)
        .runs/<run-id>.lock    flock(2) held by the live process that owns the run

A run trains inside ``.runs/<run-id>/``. Publishing writes the manifest last, renames the whole
directory to the next free ``vNNN`` under an exclusive lock, then flips ``latest`` with an atomic
``os.replace``; only then is the resumable state deleted. A crash at any point leaves either a
resumable run (never listed) or a complete version; ``latest`` only ever names a complete version.
Version numbers only grow: a high-water mark kept under the lock means a removed version's number
is never given to a different model (children's lineage keeps pointing at what they came from).

References (``resolve``): ``stage/name`` (latest), ``stage/name@v3``, ``stage/name@latest``,
``stage/name@best`` (best objective among versions; when the newest version came from a sweep, among that
sweep's versions only), or a path to any HF model folder.

This module imports neither torch nor transformers, so ``llmctl ckpt`` stays fast.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from llmctl import STAGES
from llmctl.core import pareto
from llmctl.core.errors import LlmctlError
from llmctl.core.files import TMP_SUFFIX, fsync_tree, remove, write_json, write_text
from llmctl.core.manifest import MANIFEST, read_manifest

STORE_STAGES = (*STAGES, "packaged")  # "packaged": registry-installed models converted once (e.g. GGUF → HF)
LATEST = "latest"
RUNS = ".runs"
HIGHWATER = ".highwater"
STATE_SUFFIX = ".state"
TRAINER_STATE = "trainer_state.json"
_VERSION_DIR = re.compile(r"^v(\d{3,})$")
_REF = re.compile(r"^(?P<stage>[a-z]+)/(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<sel>v\d+|latest|best))?$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
REF_HELP = "use <stage>/<name>[@vN|@latest|@best] (see `llmctl ckpt list`) or a path to an HF model folder"


@dataclass(frozen=True)
class Resolved:
    """What a reference points at: a model folder and, for llmctl checkpoints, its manifest."""

    path: Path
    ref: str  # canonical: "pretrain/x@v002" for store entries, the absolute path otherwise
    manifest: dict | None

    @property
    def kind(self) -> str | None:
        return (self.manifest or {}).get("kind")


def parse_ref(text: str) -> tuple[str, str, str] | None:
    """(stage, name, selector) of a store reference `stage/name[@vN|@latest|@best]`, else None."""
    m = _REF.match(str(text).strip())
    if not m or m.group("stage") not in STORE_STAGES:
        return None
    return m.group("stage"), m.group("name"), m.group("sel") or "latest"


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise LlmctlError(f"name={name!r} is not a valid checkpoint name; use letters, digits, '.', '_' or '-'")
    return name


def version_dirname(version: int) -> str:
    return f"v{version:03d}"


WEIGHT_FILES = ("*.safetensors", "*.onnx", "*.onnx.data", "*.onnx_data", "*.gguf")  # what the weights hash covers


def weight_files(folder: Path) -> list[Path]:
    """A checkpoint's weight files: safetensors, or an export's ONNX graph and data or GGUF file, sorted by name."""
    return sorted({p for pattern in WEIGHT_FILES for p in Path(folder).glob(pattern)}, key=lambda p: p.name)


def weights_sha256(folder: Path) -> str | None:
    """sha256 over the folder's weight files (sorted by name); None when there are none."""
    files = weight_files(folder)
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def verify_weights(resolved: Resolved, *, what: str = "reference") -> str | None:
    """The weights' sha256 computed from the files; for an llmctl checkpoint it must equal the hash
    its manifest recorded at publishing (one clear line when a weights file was changed or damaged)."""
    actual = weights_sha256(resolved.path)
    recorded = (resolved.manifest or {}).get("weights_sha256")
    if recorded and actual != recorded:
        raise LlmctlError(
            f"{what} {resolved.ref}: its weights on disk do not match the manifest (sha256 "
            f"{actual[:12] if actual else 'none'}… "
            f"on disk, {recorded[:12]}… recorded): a .safetensors file in {resolved.path} was modified or damaged; "
            f"restore it or use another version"
        )
    return actual


class Store:
    """The checkpoint store rooted at ``output_root``."""

    def __init__(self, root: str | os.PathLike, *, must_exist: bool = False):
        """`must_exist`: the root is only read (`llmctl ckpt ...`), so a missing one is a typo, not an empty store."""
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise LlmctlError(f"output_root={root} is a file, not a folder; choose a folder for the checkpoint store")
        if must_exist and not self.root.is_dir():
            raise LlmctlError(
                f"no checkpoint store at {root} (relative to {Path.cwd()}); check -o/--output-root "
                f"(the default is outputs, where stages write)"
            )

    # ---- layout -------------------------------------------------------------------------------
    def name_dir(self, stage: str, name: str) -> Path:
        return self.root / stage / name

    def versions(self, stage: str, name: str) -> list[int]:
        """Complete versions (a vNNN folder whose manifest exists), ascending."""
        d = self.name_dir(stage, name)
        if not d.is_dir():
            return []
        found = []
        for p in d.iterdir():
            m = _VERSION_DIR.match(p.name)
            if m and (p / MANIFEST).is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    def latest_version(self, stage: str, name: str) -> int | None:
        """The version `latest` names. A `latest` that names no complete version (garbage, empty, a
        removed version) is reported on stderr and repaired under the name's lock to the newest one."""
        d = self.name_dir(stage, name)
        versions = self.versions(stage, name)
        pointer = _read_pointer(d / LATEST)
        m = _VERSION_DIR.match(pointer or "")
        if m and int(m.group(1)) in versions:
            return int(m.group(1))
        if not versions:
            return None
        if pointer is not None:
            try:
                with self._locked(stage, name):
                    if _read_pointer(d / LATEST) == pointer:  # nobody fixed it meanwhile
                        self._write_latest(d, versions[-1])
                fixed = "reset it"
            except OSError:
                fixed = "left it (read-only store)"
            print(
                f"llmctl: warning: {d / LATEST} named {pointer[:40]!r}, not a version of {stage}/{name}; "
                f"{fixed} to {version_dirname(versions[-1])}",
                file=sys.stderr,
            )
        return versions[-1]

    def entries(self) -> list[tuple[str, str, int, dict]]:
        """Every complete version in the store as (stage, name, version, manifest)."""
        out = []
        for stage in STORE_STAGES:
            sdir = self.root / stage
            if not sdir.is_dir():
                continue
            for ndir in sorted(p for p in sdir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                for v in self.versions(stage, ndir.name):
                    manifest = read_manifest(ndir / version_dirname(v)) or {}
                    out.append((stage, ndir.name, v, manifest))
        return out

    # ---- references ---------------------------------------------------------------------------
    def resolve(self, ref: str, *, what: str = "reference") -> Resolved:
        """Turn a reference into a folder. Raises LlmctlError with the fix when it cannot."""
        text = str(ref).strip()
        parsed = parse_ref(text)
        if parsed:
            stage, name, sel = parsed
            if self.name_dir(stage, name).is_dir() or not Path(text).exists():
                return self._resolve_store(stage, name, sel, text, what)
        path = Path(text).expanduser()
        if path.is_dir() and (path / "config.json").is_file():
            path, manifest = path.resolve(), read_manifest(path)
            return Resolved(path=path, ref=self._ref_of(path) or str(path), manifest=manifest)
        if path.exists():
            raise LlmctlError(f"{what} {text!r} is not an HF model folder (no config.json in it); {REF_HELP}")
        raise LlmctlError(f"{what} {text!r} is neither a checkpoint in {self.root}/ nor an existing folder; {REF_HELP}")

    def _ref_of(self, folder: Path) -> str | None:
        """The reference of a version folder inside this store (`<stage>/<name>/vNNN`), from where it is."""
        try:
            stage, name, version = folder.relative_to(self.root.resolve()).parts
        except ValueError:
            return None
        ok = stage in STORE_STAGES and _VERSION_DIR.match(version) and (folder / MANIFEST).is_file()
        return f"{stage}/{name}@{version}" if ok else None

    def _resolve_store(self, stage: str, name: str, sel: str, text: str, what: str) -> Resolved:
        versions = self.versions(stage, name)
        if not versions:
            raise LlmctlError(
                f"{what} {text!r}: no checkpoint {stage}/{name} in {self.root}/; `llmctl ckpt list` shows what exists"
            )
        if sel == "latest":
            version = self.latest_version(stage, name)
        elif sel == "best":
            version = self._best_version(stage, name, versions, text, what)
        else:
            version = int(sel[1:])
            if version not in versions:
                have = ", ".join(f"v{v}" for v in versions)
                raise LlmctlError(f"{what} {text!r}: {stage}/{name} has no version {sel} (it has {have})")
        folder = self.name_dir(stage, name) / version_dirname(version)
        return Resolved(
            path=folder.resolve(), ref=f"{stage}/{name}@{version_dirname(version)}", manifest=read_manifest(folder)
        )

    def _best_version(self, stage: str, name: str, versions: list[int], text: str, what: str) -> int:
        """The version with the best objective. When the newest version came from a sweep, only that sweep's
        versions compete: a sweep's best, never a run made another way (other data, other knobs) that happens to
        share the name."""
        manifests = {v: read_manifest(self.name_dir(stage, name) / version_dirname(v)) or {} for v in versions}
        sweep = (manifests[max(versions)].get("sweep") or {}).get("id")
        if sweep and len(manifests[max(versions)].get("objectives") or []) > 1:
            members = {v: m for v, m in manifests.items() if (m.get("sweep") or {}).get("id") == sweep}
            picked = pareto.front([pareto.ranks(m.get("objectives")) for m in members.values()])
            on_front = ", ".join(f"@v{list(members)[i]}" for i in picked)
            metrics = ", ".join(o["metric"] for o in manifests[max(versions)]["objectives"])
            raise LlmctlError(
                f"{what} {text!r}: {stage}/{name}'s newest versions come from a sweep of several objectives "
                f"({metrics}), which has no single best; "
                f"its Pareto front is {on_front or 'empty'}: pick one (llmctl ckpt sweep {sweep} shows them)"
            )
        scored = []
        for v, manifest in manifests.items():
            if sweep and (manifest.get("sweep") or {}).get("id") != sweep:
                continue
            if (rank := objective_rank(manifest.get("objective"))) is not None:
                scored.append((rank, v))
        if not scored:
            raise LlmctlError(f"{what} {text!r}: no version of {stage}/{name} records an objective metric; use @vN")
        return min(scored)[1]

    # ---- runs in progress ---------------------------------------------------------------------
    def new_run_dir(self, stage: str, name: str) -> Path:
        """A fresh work-in-progress folder; it becomes a version only through `publish`."""
        check_name(name)
        run_id = f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        run_dir = self.name_dir(stage, name) / RUNS / run_id
        run_dir.mkdir(parents=True)
        return run_dir

    def resumable_runs(self, stage: str, name: str) -> list[Path]:
        """Interrupted runs of this name that left a resumable state, newest first (for resume=auto)."""
        runs = self.name_dir(stage, name) / RUNS
        if not runs.is_dir():
            return []
        found = [
            p
            for p in runs.iterdir()
            if p.is_dir()
            and not p.name.startswith(".")
            and not p.name.endswith(STATE_SUFFIX)
            and (state_dir(p) / TRAINER_STATE).is_file()
        ]
        return sorted(found, key=lambda p: (state_dir(p) / TRAINER_STATE).stat().st_mtime, reverse=True)

    @contextlib.contextmanager
    def _locked(self, stage: str, name: str):
        d = self.name_dir(stage, name)
        d.mkdir(parents=True, exist_ok=True)
        with open(d / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield d
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    # ---- writing ------------------------------------------------------------------------------
    def publish(self, folder: Path, stage: str, name: str, manifest: dict) -> Resolved:
        """Turn a fully written folder into the next version of stage/name, atomically.

        The manifest is written last inside `folder`, the folder is renamed to vNNN under the
        name's lock (so concurrent writers get distinct numbers, and a number is never reused),
        then `latest` is flipped. The caller deletes the run's resumable state afterwards.
        """
        check_name(name)
        folder = Path(folder)
        with self._locked(stage, name) as d:
            taken = [int(m.group(1)) for p in d.iterdir() if (m := _VERSION_DIR.match(p.name))]
            version = max(*taken, _read_int(d / HIGHWATER), 0) + 1
            ref = f"{stage}/{name}@{version_dirname(version)}"
            manifest = {
                "stage": stage,
                "name": name,
                "version": version,
                "ref": ref,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                **manifest,
            }
            write_json(folder / MANIFEST, manifest)
            fsync_tree(folder)
            write_text(d / HIGHWATER, f"{version}\n")  # before the rename: a crash in between only skips a number
            target = d / version_dirname(version)
            os.rename(folder, target)
            self._write_latest(d, version)
        return Resolved(path=target.resolve(), ref=ref, manifest=manifest)

    @staticmethod
    def _write_latest(name_dir: Path, version: int) -> None:
        write_text(name_dir / LATEST, version_dirname(version) + "\n")

    def removal(self, ref: str) -> tuple[str, str, list[int]]:
        """What `remove(ref)` would delete: (stage, name, versions). Raises when there is no such thing."""
        m = re.match(r"^(?P<stage>[a-z]+)/(?P<name>[^@]+)@(?P<sel>v\d+|all)$", ref.strip())
        if not m or m.group("stage") not in STORE_STAGES:
            raise LlmctlError(
                f"cannot remove {ref!r}: name one version (<stage>/<name>@vN) or all of them (<stage>/<name>@all)"
            )
        stage, name, sel = m.group("stage", "name", "sel")
        versions = self.versions(stage, name)
        doomed = versions if sel == "all" else [int(sel[1:])]
        if not versions or not set(doomed) <= set(versions):
            raise LlmctlError(f"cannot remove {ref!r}: no such checkpoint; `llmctl ckpt list` shows what exists")
        return stage, name, doomed

    def children(self, stage: str, name: str, versions: list[int]) -> list[tuple[str, str]]:
        """(child ref, parent ref) for every version in the store made from one of these versions."""
        folders = {
            str((self.name_dir(stage, name) / version_dirname(v)).resolve()): f"{stage}/{name}@{version_dirname(v)}"
            for v in versions
        }
        found = []
        for st, nm, v, manifest in self.entries():
            for parent in manifest.get("parents") or []:
                hit = folders.get(str(parent.get("path"))) or (
                    parent.get("ref") if parent.get("ref") in folders.values() else None
                )
                if hit and not (st == stage and nm == name and v in versions):
                    found.append((f"{st}/{nm}@{version_dirname(v)}", hit))
        return found

    def remove(self, ref: str) -> list[str]:
        """Delete one version (stage/name@vN) or every version of a name (stage/name@all)."""
        stage, name, doomed = self.removal(ref)
        removed = []
        with self._locked(stage, name) as d:
            for v in doomed:
                trash = d / f".trash-{version_dirname(v)}-{uuid.uuid4().hex[:6]}"
                os.rename(d / version_dirname(v), trash)  # atomic: the version vanishes whole
                shutil.rmtree(trash)
                removed.append(f"{stage}/{name}@{version_dirname(v)}")
            left = self.versions(stage, name)
            if left:
                self._write_latest(d, left[-1])
            else:
                (d / LATEST).unlink(missing_ok=True)
        return removed

    # ---- runs in progress: listing and cleaning -------------------------------------------------
    def runs(self) -> list[dict]:
        """Every unpublished run in the store: where it is, its step, whether it can be resumed, whether a
        live process holds it, its age (seconds since it last wrote) and size on disk."""
        out = []
        for stage in STORE_STAGES:
            for runs in sorted((self.root / stage).glob(f"*/{RUNS}")) if (self.root / stage).is_dir() else []:
                entries: dict[
                    str, list[Path]
                ] = {}  # run id → its folder, state, lock and any leftover of a cut-off write
                for p in runs.iterdir():
                    entries.setdefault(_run_id(p.name), []).append(p)
                for run_id, parts in sorted(entries.items()):
                    run_dir = runs / run_id
                    state = state_dir(run_dir)
                    lock = RunLock(run_dir)
                    age = time.time() - max(p.stat().st_mtime for p in parts)
                    live = lock.path.exists() and not lock.try_acquire()
                    lock.release()
                    try:
                        step = read_state(state).get("step")
                    except LlmctlError:  # no state (or an unreadable one): not resumable
                        step = None
                    out.append(
                        {
                            "ref": f"{stage}/{runs.parent.name}",
                            "id": run_id,
                            "path": run_dir,
                            "step": step,
                            "resumable": step is not None,
                            "live": live,
                            "age": age,
                            "size": sum(folder_size(p) if p.is_dir() else p.stat().st_size for p in parts),
                            "leftovers": [p.name for p in parts if p.name.endswith((TMP_SUFFIX, ".old"))],
                        }
                    )
        return out

    def remove_run(self, run_dir: Path, lock: RunLock | None = None) -> bool:
        """Delete an unpublished run (its folder, state and lock) unless a live process holds it; pass
        the `lock` this process already holds on it (a run discarding itself)."""
        lock = lock or RunLock(run_dir)
        if not lock.held and not lock.try_acquire():
            return False
        run_id = Path(run_dir).name
        for part in Path(run_dir).parent.glob(f"*{run_id}*"):
            if _run_id(part.name) == run_id and part != lock.path:
                remove(part)
        lock.release(remove=True)
        return True

    def prune_empty(self, stage: str, name: str) -> None:
        """Remove the `.runs` folder, the name's folder and the stage's folder where nothing is left in them."""
        for folder in (self.name_dir(stage, name) / RUNS, self.name_dir(stage, name), self.root / stage):
            try:
                folder.rmdir()
            except OSError:
                return

    def lineage(self, ref: str) -> list[Resolved]:
        """The reference followed by its ancestors (first parent at each step). A parent that is gone
        comes back with the manifest {"kind": ..., "missing": "removed" | "missing"} and ends the chain."""
        chain = [self.resolve(ref)]
        seen = {chain[0].path}
        while chain[-1].manifest and chain[-1].manifest.get("parents"):
            parent = chain[-1].manifest["parents"][0]
            try:
                nxt = self.resolve(parent.get("path") or parent["ref"])
            except LlmctlError:
                gone = "removed" if parse_ref(parent.get("ref", "")) else "missing"
                chain.append(
                    Resolved(
                        path=Path(parent.get("path") or "?"),
                        ref=parent.get("ref", "?"),
                        manifest={"kind": parent.get("kind"), "missing": gone},
                    )
                )
                break
            if nxt.path in seen:
                break
            seen.add(nxt.path)
            chain.append(nxt)
            if nxt.manifest is None:
                break
        return chain


def _run_id(entry: str) -> str:
    """The run an entry of `.runs/` belongs to: `<id>`, `<id>.state`, `<id>.lock`, and the hidden leftovers of a
    write that was cut off (`.<id>.state.<random>.tmp`); run ids hold no dots."""
    return entry.lstrip(".").split(".")[0]


def objective_rank(objective: dict | None) -> float | None:
    """A manifest's objective as a number where lower is better (its value, negated when the mode is max); None
    when it records no value."""
    value = (objective or {}).get("value")
    if not isinstance(value, (int, float)):
        return None
    return value if (objective or {}).get("mode", "min") == "min" else -value


def parent_entry(resolved: Resolved, role: str, sha256: str | None = None) -> dict:
    """How a manifest names an input checkpoint: reference, role, path and the sha256 of its weight
    files as read now (pass the hash `verify_weights` computed to avoid reading them twice)."""
    return {
        "role": role,
        "ref": resolved.ref,
        "path": str(resolved.path),
        "kind": resolved.kind,
        "weights_sha256": sha256 or weights_sha256(resolved.path),
    }


# ---------------------------------------------------------------------------------------------
# Runs in progress: their resumable state and the lock a live process holds on them
# ---------------------------------------------------------------------------------------------
def state_dir(run_dir: Path) -> Path:
    """Where a run keeps its resumable state: beside the run folder, so publishing never carries it."""
    run_dir = Path(run_dir)
    return run_dir.with_name(run_dir.name + STATE_SUFFIX)


def read_state(state_dir: Path) -> dict:
    """An interrupted run's saved state (step, best, identity: what it was training); one clear line
    when it cannot be read."""
    try:
        return json.loads((Path(state_dir) / TRAINER_STATE).read_text())
    except (OSError, ValueError) as e:
        raise LlmctlError(
            f"resume: the state in {state_dir} is unreadable ({type(e).__name__}); remove that run with "
            f"`llmctl ckpt gc` and start a new run"
        ) from None


class RunLock:
    """An exclusive flock(2) on `<run folder>.lock`, held for as long as a process works on the run,
    so `resume=auto` never takes over a run that a live process (a sweep job, say) still owns."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir).with_name(Path(run_dir).name + ".lock")
        self._fh = None

    def try_acquire(self) -> bool:
        fh = open(self.path, "a+")  # noqa: SIM115 - held open for as long as the lock is held
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return False
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return True

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fh is not None

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self, *, remove: bool = False) -> None:
        if self._fh is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)  # still locked while unlinking: nobody can take a half-removed run
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None


def _read_pointer(path: Path) -> str | None:
    """The text of a `latest` file (None when there is none); undecodable bytes come back escaped."""
    try:
        return path.read_bytes().decode("utf-8", errors="backslashreplace").strip()
    except FileNotFoundError:
        return None
    except OSError:
        return ""


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def age(created: str) -> str:
    try:
        secs = time.time() - datetime.fromisoformat(created).timestamp()
    except (TypeError, ValueError):
        return "?"
    return duration(secs) + " ago"


def duration(secs: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= n:
            return f"{int(secs // n)}{unit}"
    return f"{int(max(secs, 0))}s"


def parse_duration(text: str, where: str) -> float:
    """'90s', '30m', '12h', '7d' → seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", str(text))
    if not m:
        raise LlmctlError(f"{where}={text!r} is not a duration; write a number and a unit: 90s, 30m, 12h or 7d")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
