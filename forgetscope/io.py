"""Atomic writes: a reader never sees a half-written file or folder.

Files are written to a temporary name beside the target and renamed into place; folders are
built under a temporary name and renamed when complete. A crash leaves only ``*.tmp-*`` debris
(see :func:`sweep`), never a half-written result.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from forgetscope.errors import UserError


class BusyError(UserError):
    """Another process holds the lock."""


def damaged(path: Path, reason: str) -> UserError:
    """The one-line error for a file of a run folder that cannot be used (``reason``: what is wrong with it)."""
    return UserError(
        f"{path}: {reason}; the run folder is damaged (cut short or edited): run it again into a new folder"
    )


def _parsed(path: Path, parse: Callable[[str], Any]) -> Any:
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "missing" if isinstance(err, FileNotFoundError) else f"unreadable ({type(err).__name__}: {err})"
        raise damaged(path, reason) from None


def read_json(path: Path) -> Any:
    """A JSON file of a run folder; one that is missing, cut short or not UTF-8 is a one-line
    :class:`UserError` naming it (:func:`damaged`), not a traceback."""
    return _parsed(path, json.loads)


def read_jsonl(path: Path) -> list[Any]:
    """The records of a JSON-lines file of a run folder (per-item samples), checked as :func:`read_json`."""
    return _parsed(path, lambda text: [json.loads(line) for line in text.splitlines()])


def out_dir_problems(path: Path, what: str) -> list[str]:
    """The problem, if any, with an output folder (``what`` names the flag or field): it is a
    file, or lies under one, or it is or lies inside a run folder, whose own files it would
    overwrite or mix with (and where reports no longer find the runs inside it)."""
    for node in (path, *path.parents):
        if node.exists() and not node.is_dir():
            return [f"{what} {path}: {node} is a file, not a folder; choose another {what}"]
    owner = run_folder_of(path)
    if owner is not None:
        where = "is a run folder" if owner == path.absolute() else f"lies inside the run folder {owner}"
        return [
            f"{what} {path}: {where}, whose files it would overwrite or mix with; choose a folder outside every run"
        ]
    return []


def run_folder_of(path: Path) -> Path | None:
    """The run folder (one holding ``manifest.json``) that ``path`` is or lies inside, if any: an
    output folder there would overwrite that run's own files or mix with them."""
    for node in (path.absolute(), *path.absolute().parents):
        if (node / "manifest.json").is_file():
            return node
    return None


def check_out_dir(path: Path, what: str) -> None:
    """Refuse an unusable output folder (:func:`out_dir_problems`) before any work."""
    for problem in out_dir_problems(path, what):
        raise UserError(problem)


def write_bytes(path: Path, content: bytes) -> None:
    """Write ``content`` to ``path`` atomically (a temporary name, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(content)
        os.replace(tmp, path)
    except BaseException:  # a full disk, a kill: no half-written temporary stays behind
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    write_bytes(path, text.encode())


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_torch(path: Path, data: Any) -> None:
    """Write ``data`` (tensors in plain containers) with ``torch.save``, atomically; read it back with
    ``torch.load(path, weights_only=True)``."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(data, buffer)
    write_bytes(path, buffer.getvalue())


def sweep(folder: Path) -> None:
    """Remove the ``*.tmp-*`` debris that killed writers left in ``folder`` (call it while holding
    the folder's lock, so that no live writer's temporary is touched)."""
    for path in sorted(folder.rglob("*.tmp-*"), reverse=True):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextmanager
def exclusive(lock_file: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` for the block, or raise ``BusyError`` (within a
    tenth of a second: a report glancing at the lock, :func:`forgetscope.session.being_written`,
    holds it for microseconds; a writer holds it for the whole run).

    The lock is the kernel's (``flock``): it dies with its process, so a killed run never leaves a
    stale lock behind. An ``OSError`` when the file cannot be created is the caller's to explain.
    """
    import fcntl
    import time

    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as fh:
        for attempt in range(5):
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 4:
                    fh.seek(0)
                    holder = fh.read().strip() or "another process"
                    raise BusyError(
                        f"{what} is in use by {holder}; wait for it to finish or choose another name"
                    ) from None
                time.sleep(0.02)
        fh.seek(0)
        fh.truncate()
        fh.write(f"forgetscope process {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def atomic_dir(target: Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes ``target`` in one rename.

    With ``replace=False`` an existing ``target`` wins (another process built it first) and the
    temporary folder is dropped: for caches that several processes may fill at once.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(target)
    try:
        os.replace(tmp, target)
    except OSError:
        if replace or not target.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
