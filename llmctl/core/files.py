"""Files on disk: written whole or not at all, read only when whole, and a full disk said in one line.

    with atomic_path(folder / "model.safetensors", need=nbytes) as tmp:   # a hidden sibling, renamed over the target
        save_file(tensors, tmp)
    write_json(folder / "llmctl.json", manifest)

Every write that a reader may see goes through `atomic_path`: the data lands in a hidden temporary
beside the target (a file or a whole folder), is flushed to disk, then renamed over the target; on
any error the temporary is removed, so nothing half-written or hidden is left behind. A full disk
(ENOSPC / EDQUOT) inside `disk_space` becomes one line naming the folder, the space free and, where
the caller knows it, the space needed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from pathlib import Path

from llmctl.core.errors import LlmctlError, first_line

_FULL = (errno.ENOSPC, errno.EDQUOT)
TMP_SUFFIX = ".tmp"


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def free_bytes(folder: Path) -> int | None:
    """Free space on the file system holding `folder` (its nearest existing ancestor); None when unknown."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, as an OSError or as the message of a library that wraps it (safetensors' Rust writer)."""
    if isinstance(e, OSError) and e.errno in _FULL:
        return True
    text = str(e)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def disk_full_error(folder: Path, need: int | None = None, what: str = "writing") -> LlmctlError:
    """The one line for a full disk: the folder, the space free there and, when known, the space needed."""
    free = free_bytes(folder)
    needed = f"; {what} needs about {human_bytes(need)}" if need else ""
    return LlmctlError(
        f"no space left on the device of {folder} ({human_bytes(free) if free is not None else 'unknown'} "
        f"free{needed}); "
        f"free space there or set output_root=<a folder on another disk>"
    )


@contextlib.contextmanager
def disk_space(folder: Path, need: int | None = None, what: str = "writing"):
    """A full disk inside the block becomes one LlmctlError naming `folder`, the free and the needed bytes."""
    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise disk_full_error(folder, need, what) from None


def tmp_sibling(path: Path) -> Path:
    """A hidden, unique name beside `path` (`.<name>.<random>.tmp`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def remove(path: Path) -> None:
    """Delete a file or a folder if it is there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(path: Path, *, need: int | None = None, what: str = "writing", keep_existing: bool = False):
    """Yield a hidden temporary path beside `path` for the caller to create (a file or a folder); when the
    block ends, flush it and rename it over `path` (a folder replaces the old one whole). On any error the
    temporary is removed and `path` is left as it was. `keep_existing` (caches): when `path` appeared
    meanwhile (another process built the same thing), keep it and drop the temporary."""
    path = Path(path)
    tmp = tmp_sibling(path)
    with disk_space(path.parent, need, what):
        try:
            yield tmp
            if keep_existing and path.exists():
                remove(tmp)
            else:
                commit(tmp, path)
        except BaseException:
            remove(tmp)
            raise


def commit(tmp: Path, path: Path) -> None:
    """Flush `tmp` (a file or a folder) to disk and rename it over `path`; a folder replaces the old one whole."""
    fsync_tree(tmp)
    if Path(tmp).is_dir() and Path(path).is_dir():
        old = tmp_sibling(path)
        os.rename(path, old)
        os.rename(tmp, path)
        remove(old)
    else:
        os.replace(tmp, path)


def write_text(path: Path, text: str, encoding: str = "utf-8") -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def fsync_tree(path: Path) -> None:
    """Flush a file, or every file of a folder and the folder itself, to disk."""
    path = Path(path)
    if not path.exists():
        return
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if path.is_dir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_writable_file(path: Path, key: str) -> Path:
    """A file the run will write at the end: refused now (one line) when its folder is missing or read-only,
    or when the path is an existing folder, so no work is done for nothing."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise LlmctlError(f"{key}={path} is a folder; give a file path, e.g. {key}={path / 'out.jsonl'}")
    if not path.parent.is_dir():
        raise LlmctlError(f"{key}={path}: the folder {path.parent} does not exist; create it or choose another path")
    probe = tmp_sibling(path)
    try:
        probe.write_bytes(b"")
    except OSError as e:
        raise LlmctlError(
            f"{key}={path}: cannot write in {path.parent} ({first_line(e.strerror or str(e))}); choose a folder you "
            "can write to"
        ) from None
    finally:
        remove(probe)
    return path


def check_safetensors(path: Path) -> None:
    """One clear line for a .safetensors file that is truncated, padded or not safetensors at all
    (safetensors checks that the header's tensor extents cover the file exactly)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except SafetensorError as e:
        raise LlmctlError(
            f"{path} is truncated or damaged ({first_line(str(e))}); re-create or re-download it"
        ) from None


def require_safetensors(folder: Path, what: str = "") -> list[Path]:
    """The folder's .safetensors files, each checked whole; one line when there are none (llmctl never unpickles
    a .bin) or one is damaged."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in Path(folder).glob("*.bin"))[:2]
        raise LlmctlError(
            f"{what + ' ' if what else ''}{folder} has no .safetensors weights"
            + (f" (only {', '.join(pickled)}: pickled)" if pickled else "")
            + "; llmctl loads only safetensors, never pickle: re-save the model with save_pretrained (safetensors is "
            "its default) where you trust the file"
        )
    for file in files:
        check_safetensors(file)
    return files
