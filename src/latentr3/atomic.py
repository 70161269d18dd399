"""Crash-safe files: every piece of state latentr3 writes is either complete or absent.

A run can be SIGKILLed anywhere (a pre-empted GPU job, an OOM kill), including in the middle of writing
a checkpoint.  The rules, applied everywhere state is written:

* a file is written to a temporary name in the same directory, flushed and fsynced, then renamed over
  the target (rename is atomic within a file system), and the directory is fsynced so the rename itself
  survives a power cut (``atomic_write_*``, ``atomic_open``);
* a directory (a checkpoint) is built under a temporary sibling name; its ``MANIFEST.json`` (every file's
  relative path, size and sha256) is written last, then the directory is swapped in (old one renamed
  aside, new one renamed in, old one removed: ``atomic_directory``).  A kill between the two renames
  leaves ``<name>.old``, which ``recover_directory`` renames back;
* loading a directory checks its manifest first (``verify_manifest``) and names the file that is
  missing, truncated or corrupt, instead of failing deep inside safetensors or loading garbage.

Why by hand: the standard library has the primitives (os.replace, os.fsync) but no atomic-write helper,
and the small packages that wrap them do not cover directories or manifests.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from glob import escape as glob_escape
from pathlib import Path
from typing import Iterator

__all__ = ["CheckpointError", "OutputWriteError", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_open",
           "atomic_directory", "write_manifest", "verify_manifest", "recover_directory", "MANIFEST_NAME"]

MANIFEST_NAME = "MANIFEST.json"


class CheckpointError(ValueError):
    """A checkpoint directory that is incomplete or damaged: the message names the file, the problem
    and what to do."""

    def __init__(self, path, problem: str, ckpt=None):
        self.path = str(path)
        self.problem = problem
        advice = ""
        if ckpt is not None:
            advice = (f"; the checkpoint {ckpt} is incomplete or damaged (an interrupted copy or write?): copy it "
                      "again, or delete it and re-run the stage that wrote it, or use another checkpoint "
                      "(e.g. last/ instead of best/)")
        super().__init__(f"{self.path}: {problem}{advice}")


class OutputWriteError(OSError):
    """A write that the file system refused (full, read-only, ...): names the path and what to do."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8",
                newline: str | None = None) -> Iterator:
    """A file object whose content replaces `path` only when the block ends without an exception."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):  # left by a writer that was killed
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding, newline=None if binary else newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise OutputWriteError(
            f"cannot write {path}: {e.strerror or e} (errno {e.errno}); the previous version of the file, if "
            f"any, is unchanged. Free space on that file system, make it writable, or choose another output "
            f"directory, then re-run: finished work is kept") from e
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_write_temporary(p: Path) -> bool:
    return p.name.startswith(".") and p.name.endswith(".tmp")


def write_manifest(directory: str | Path) -> dict:
    """MANIFEST.json of every file under `directory` (written atomically, last)."""
    directory = Path(directory)
    files = {}
    for p in sorted(directory.rglob("*")):
        # a temporary of an atomic write (``.<name>.<random>.tmp``) is in flight or was left by a killed
        # writer: never part of the checkpoint (atomic_open deletes a stale one, e.g. of the manifest
        # itself, so listing it would make the manifest name a file that is gone)
        if p.is_file() and p.name != MANIFEST_NAME and not _is_write_temporary(p):
            files[p.relative_to(directory).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    manifest = {"format": 1, "files": files}
    atomic_write_json(directory / MANIFEST_NAME, manifest)
    return manifest


def verify_manifest(directory: str | Path, what: str = "checkpoint") -> None:
    """Raises CheckpointError naming the first missing, truncated or corrupt file of `directory`."""
    directory = Path(directory)
    mpath = directory / MANIFEST_NAME
    if not mpath.is_file():
        raise CheckpointError(mpath, f"missing, so the {what} is incomplete (a killed or failed save)", directory)
    try:
        files = json.loads(mpath.read_text())["files"]
        entries = [(rel, int(info["size"]), str(info["sha256"])) for rel, info in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(mpath, f"unreadable manifest ({type(e).__name__}: {str(e)[:100]})", directory) from None
    for rel, size, sha in entries:
        p = directory / rel
        if not p.is_file():
            raise CheckpointError(p, f"missing from the {what} (listed in {MANIFEST_NAME})", directory)
        actual = p.stat().st_size
        if actual != size:
            raise CheckpointError(p, f"{actual} bytes where {MANIFEST_NAME} records {size} (truncated or "
                                     f"overwritten)", directory)
        if _sha256(p) != sha:
            raise CheckpointError(p, f"content does not match its sha256 in {MANIFEST_NAME} (corrupt)", directory)


def recover_directory(path: str | Path) -> None:
    """After a kill between the two renames of a swap: `<path>.old` is the last complete version."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.is_dir():
        with contextlib.suppress(FileNotFoundError, FileExistsError, OSError):
            old.rename(path)  # another process of the same run may have done it first


def fault_injection_pause() -> None:
    """Fault-injection hook for the kill tests: LATENTR3_TEST_SLOW_SAVE=<seconds> holds a directory save
    between its content and its manifest (checkpoints, training state, the SASRec run directory), and
    `latentr3 prepare` between the files of a dataset, so a test can SIGKILL a process in the middle of a
    save."""
    delay = os.environ.get("LATENTR3_TEST_SLOW_SAVE")
    if delay:
        import time

        time.sleep(float(delay))


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yields a temporary sibling directory to fill; on success writes its manifest and swaps it in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fault_injection_pause()
        write_manifest(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
