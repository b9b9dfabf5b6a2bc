"""``python at_exit.py REPORTS SCRIPT ARGS...`` or ``python at_exit.py REPORTS -m MODULE ARGS...``:
run it as ``__main__``; at exit, write the process group threads (gloo's) still running to a file
in the folder ``REPORTS``, one file a process.

They run as long as something references the group. One still releasing a tensor while the
interpreter finalizes aborts the process ("terminate called without an active exception"), at
random; a group that is gone before exit cannot. Linux (``/proc``)."""

import atexit
import contextlib
import json
import os
import runpy
import sys
from pathlib import Path


def _report(folder: Path) -> None:
    names = []
    for thread in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # it ended since the listing
            names.append((thread / "comm").read_text().strip())
    (folder / f"{os.getpid()}.json").write_text(json.dumps(sorted(n for n in names if "gloo" in n)))


def threads_left(folder: Path) -> list[list[str]]:
    """Every process's report: the names of its gloo threads left at exit (``[]``: none)."""
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


if __name__ == "__main__":
    reports = Path(sys.argv[1])
    reports.mkdir(parents=True, exist_ok=True)
    atexit.register(_report, reports)
    if sys.argv[2] == "-m":
        sys.argv = sys.argv[3:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[2:]
        runpy.run_path(sys.argv[0], run_name="__main__")
