"""The run session: the one flow that every way into a run folder shares.

``forgetscope run`` (a recipe, one new task or several in ``stages``), ``forgetscope audit``
(checkpoints made elsewhere) and :class:`forgetscope.ForgettingCallback` (the user's own Trainer)
differ only in where the models come from. Everything else is here: the run's lock, its manifest,
"score this model at this step and record it", marking a failure, and finishing (curves, figures,
the paired summary, the accuracy matrix of a sequence)::

    session = RunSession(root, {"recipe_hash": ...}, "a run of another recipe; ...", main_process=rank == 0)
    with session.locked():                       # refuses a folder another process is using
        if session.finished(): ...               # a different run under this name is refused here
        session.start(suite, tokenizer, method="lora", ...)   # manifest: running
        with session.failing():                  # any error marks the run failed
            session.score(model, 0)              # evals/step-000000 (skipped when already there)
            ...
        session.finish("lora", "lora", "lora", title="...")   # curves.csv, curves.png, summary: finished

Under ``accelerate launch`` every process builds a session and scores its share of each
snapshot; only the main one holds the lock and writes. Scoring is one call to
:func:`forgetscope.evaluate.evaluate_model` per snapshot, in every process.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pandas as pd

from forgetscope import curves, distributed, evaluate, figures, io, models, snapshots, stats
from forgetscope.errors import UserError


class RunError(UserError):
    """The run cannot go on as asked; the message says what to change."""


def versions() -> dict[str, str]:
    """Versions of Python and of the libraries that determine a run's results."""
    names = ("forgetscope", "torch", "transformers", "peft", "accelerate", "datasets", "lm_eval")
    return {"python": platform.python_version(), **{n: version(n.replace("_", "-")) for n in names}}


RECIPE_FIXES = {
    "memory": "lower train.batch_size (raise train.grad_accum to keep the batch), train.seq_len or "
    "evals.batch_size, or use method: lora",
    "disk": "set snapshots.keep_weights: false or snapshots.resumable: false, or point runs_dir / "
    "FORGETSCOPE_CACHE at a larger disk",
}
"""What to change when a recipe's run runs out of memory or disk (:func:`resource_advice`)."""


def resource_advice(err: BaseException, fixes: dict[str, str] = RECIPE_FIXES) -> str | None:
    """What to change when a run dies of memory or disk (``fixes``: the settings to change, by
    ``memory`` and ``disk``, in the words of the command that made the run), else None."""
    import torch

    if isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower()
    ):
        return f"out of memory; {fixes['memory']}"
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return f"the disk is full; free space, {fixes['disk']}"
    return None


def lock_file(root: Path) -> Path:
    """The lock of a run folder, taken before its inputs are checked. It lives in the cache, not in
    the runs folder, so that a run refused for bad input writes nothing; two processes with
    different caches (``FORGETSCOPE_CACHE``, or machines sharing a disk) meet at :data:`FOLDER_LOCK`."""
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return models.cache_dir() / "locks" / f"{key}.lock"


FOLDER_LOCK = ".lock"
"""The lock file inside a run folder, taken when writing starts, before anything is written."""


def being_written(root: Path) -> bool:
    """Whether a process holds the run folder's own lock (:data:`FOLDER_LOCK`) now: a run that reads
    ``running`` but is not being written was killed before it could say so. True when the folder
    has no lock file (written before forgetscope kept one: unknown, so taken at its word)."""
    import fcntl

    try:
        fd = os.open(root / FOLDER_LOCK, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a reader's lock: it never blocks a writer for long
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing lets go of the lock taken, if any
    return False


TRAIN_LOG_FIRST = ("step", "loss", "new_loss", "replay_loss", "learning_rate", "grad_norm", "epoch")
"""The leading columns of ``train_log.csv``; the Trainer's other logged values follow by name (a
resumed run's log, read back from ``trainer_state.json``, has its keys sorted)."""


class RunSession:
    """One run folder while a process writes it.

    ``identity``: the manifest fields that make this run this run (a recipe's hash, an audit's
    settings); a folder whose manifest differs is refused: "<root> holds ``conflict``" (what is
    there and what to do).
    ``main_process``: False on the other processes under accelerate, which neither lock nor write.
    ``fixes``: what to change when the run runs out of memory or disk (:func:`resource_advice`).
    """

    def __init__(
        self,
        root: Path,
        identity: dict[str, Any],
        conflict: str,
        main_process: bool = True,
        fixes: dict[str, str] = RECIPE_FIXES,
    ):
        self.layout = snapshots.RunLayout(Path(root))
        self.identity = identity
        self.conflict = conflict
        self.main = main_process
        self.fixes = fixes
        self.suite: evaluate.EvalSuite | None = None
        self.cascade = None  # a forgetscope.cascade.Cascade: scores in its place when the recipe has one
        self.tokenizer = None
        self.eval_s: dict[str, float] = {}
        self.started = time.time()
        self._stack = contextlib.ExitStack()
        self._writing = False  # whether this process holds the folder's own lock (FOLDER_LOCK)

    @property
    def root(self) -> Path:
        return self.layout.root

    # ------------------------------------------------------------ lock and identity

    def acquire(self) -> None:
        """Take the run's lock (main process), or raise :class:`forgetscope.io.BusyError` at once;
        then refuse a folder that holds a different run."""
        if self.main:
            lock = lock_file(self.root)
            try:
                self._stack.enter_context(io.exclusive(lock, str(self.root)))
            except OSError as err:
                raise UserError(
                    f"cannot write forgetscope's cache at {lock.parent.parent} ({err.strerror}); "
                    "point FORGETSCOPE_CACHE at a folder you can write"
                ) from None
        try:
            self.check_identity()
        except RunError:
            self.release()
            raise

    def check_identity(self) -> None:
        """Refuse (:class:`RunError`) a folder that holds a different run; nothing is locked or written."""
        manifest = self.layout.read_manifest()
        if manifest and any(manifest.get(key) != value for key, value in self.identity.items()):
            raise RunError(f"{self.root} holds {self.conflict}")

    def release(self) -> None:
        """Let go of the locks (the kernel also does when the process ends)."""
        self._stack.close()
        self._writing = False

    @contextlib.contextmanager
    def locked(self) -> Iterator[RunSession]:
        """The lock for the block (see :meth:`acquire`)."""
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def finished(self) -> bool:
        """Whether the run already finished (then its results are printed, not recomputed)."""
        if self.layout.read_manifest().get("status") != "finished":
            return False
        print(f"forgetscope: {self.root} already finished; curves in {self.layout.curves}")
        return True

    # ------------------------------------------------------------ writing the run

    def start(
        self, suite: evaluate.EvalSuite | None, tokenizer, files: dict[str, str] | None = None, **manifest: Any
    ) -> None:
        """Begin (or resume) writing: remove the debris of a killed attempt, write ``files`` (name ->
        text: the resolved recipe, the audit's settings), mark the manifest ``running`` with the
        run's identity and ``manifest`` fields. ``suite``: the evals every snapshot is scored on
        (prepared in every process)."""
        self.suite, self.tokenizer = suite, tokenizer
        if not self.main:
            return
        hashes = dict(suite.hashes) if suite else {}
        scored = self.layout.read_manifest().get("eval_hashes") or {}
        changed = sorted(n for n in set(scored) & set(hashes) if scored[n] != hashes[n] and self.layout.eval_steps())
        if changed:
            raise RunError(
                f"{self.root}: the items or config of {', '.join(changed)} changed since steps "
                f"{self.layout.eval_steps()} were scored (a data file edited?), so its curve would mix two test sets; "
                "restore them, or start a new run (--set name=...)"
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not self._writing:
                self._stack.enter_context(io.exclusive(self.root / FOLDER_LOCK, str(self.root)))
                self._writing = True
        except OSError as err:
            raise RunError(
                f"{self.root}: cannot create the run folder ({err.strerror}); choose a folder you can write "
                "(runs_dir in the recipe, --runs-dir for an audit)"
            ) from None
        io.sweep(self.root)  # we hold the folder's lock: no live writer's temporary files are there
        with self._advised():
            for name, text in (files or {}).items():
                io.write_text(self.root / name, text)
            self.layout.update_manifest(
                status="running",
                **self.identity,
                **manifest,
                **({"eval_hashes": hashes} if hashes else {}),
                versions=versions(),
                started=time.strftime("%Y-%m-%dT%H:%M:%S"),
            )

    def update(self, **fields: Any) -> None:
        """Add ``fields`` to the manifest (main process)."""
        if self.main:
            self.layout.update_manifest(**fields)

    def score(
        self,
        model,
        step: int,
        tokens: int | None = 0,
        meta: dict[str, Any] | None = None,
        weights: bool = False,
        tokenizer=None,
        label: str = "",
    ) -> dict[str, Any] | None:
        """Record ``model`` as the snapshot at ``step`` and score it, unless that step's evaluation
        is already on disk (a resumed run). ``weights``: also save the weights (adapter files or
        safetensors). ``tokenizer``: this snapshot's own, when it differs from the run's.
        Every process calls this (each scores its share of the requests); the main one writes.
        Returns the evaluation on the main process, or None when it was already there."""
        tokenizer = tokenizer or self.tokenizer
        if self.main:
            snapshots.save_snapshot(
                self.layout, step, model, tokenizer, {"step": step, "tokens": tokens, **(meta or {})}, weights
            )
        if distributed.broadcast(step in self.layout.eval_steps()):
            return None
        tick = time.time()
        if self.cascade is not None:
            evaluation = self.cascade.score(model, tokenizer, step)
        else:
            evaluation = evaluate.evaluate_model(model, tokenizer, self.suite)
        if not self.main:
            return None
        snapshots.save_eval(self.layout, step, tokens, evaluation)
        self.eval_s[snapshots.step_name(step)] = round(time.time() - tick, 2)
        reused = f" (cached: {', '.join(evaluation['cached'])})" if evaluation["cached"] else ""
        print(f"forgetscope: step {step}{label}: " + curves.headline(evaluation["results"]) + reused)
        return evaluation

    @staticmethod
    def scalars(evaluation: dict[str, Any] | None) -> dict[str, float]:
        """An evaluation as flat scalars for a Trainer's log: ``eval_forgetscope/<eval>/<metric>`` (the
        ``eval_`` prefix files them under evaluation in TensorBoard, W&B and MLflow)."""
        results = (evaluation or {}).get("results", {})
        return {
            f"eval_forgetscope/{task}/{metric}": entry["value"]
            for task, result in results.items()
            for metric, entry in result["metrics"].items()
        }

    @contextlib.contextmanager
    def failing(self) -> Iterator[None]:
        """Any error in the block marks the run ``failed`` (finished snapshots and results stay);
        running out of memory or disk becomes a :class:`RunError` that says what to change."""
        with self._advised():
            try:
                yield
            except BaseException as err:
                self.fail(err)
                raise

    @contextlib.contextmanager
    def _advised(self) -> Iterator[None]:
        """Running out of memory or disk in the block becomes a :class:`RunError` that says what to
        change (``self.fixes``)."""
        try:
            yield
        except BaseException as err:
            advice = resource_advice(err, self.fixes)
            if advice:
                raise RunError(
                    f"{self.root}: {advice}; finished snapshots and results are kept, run the same command to resume"
                ) from err
            raise

    def fail(self, err: BaseException | str) -> None:
        """Mark the run ``failed`` with the error (main process, once the manifest exists)."""
        if self.main and self.layout.manifest.is_file():
            error = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
            try:
                self.layout.update_manifest(status="failed", error=error, failed=time.strftime("%Y-%m-%dT%H:%M:%S"))
            except OSError as again:  # the disk that stopped the run is still full: say so, keep the first error
                print(
                    f"forgetscope: warning: could not mark {self.root} failed ({again.strerror}); "
                    "it still reads `running`",
                    file=sys.stderr,
                )

    def write_train_log(self, log_history: list[dict[str, Any]], title: str) -> None:
        """The Trainer's log as ``train_log.csv`` (its training steps, and the replay buffer's draws:
        ``replay_refresh``) and ``train_loss.png`` (main process)."""
        if not self.main:
            return
        log = pd.DataFrame([entry for entry in log_history if "loss" in entry or "replay_refresh" in entry])
        first = [c for c in TRAIN_LOG_FIRST if c in log.columns]  # one order, resumed or not
        log = log[first + sorted(set(log.columns) - set(first))]
        io.write_text(self.root / "train_log.csv", log.to_csv(index=False))
        if "loss" in log:
            figures.save(figures.plot_train_log(log.dropna(subset=["loss"]), title=title), self.root / "train_loss.png")

    def finish(self, run: str, recipe: str, method: str, title: str, **manifest: Any) -> pd.DataFrame | None:
        """Write ``curves.csv`` and ``curves.png``, print and record each eval's paired change
        from the base, the accuracy matrix of a sequence (``stages`` in the manifest), and mark
        the run ``finished`` with ``manifest`` fields and timings. Returns the curves table."""
        if not self.main:
            return None
        from forgetscope import sequence

        for events in sorted(
            (self.root / "trainer").glob("stage-*/runs")
        ):  # TensorBoard's, when train.report_to has it
            (self.root / "tensorboard").mkdir(exist_ok=True)
            events.rename(self.root / "tensorboard" / events.parent.name)
        shutil.rmtree(self.root / "trainer", ignore_errors=True)  # the training state kept for resuming
        table = curves.write_curves(self.layout, run, recipe, method)
        figures.save(figures.plot_curves(table, title=title), self.layout.figure)
        summary = stats.final_vs_base(self.layout, table)
        print(
            f"\nforgetscope: step {summary[0]['step']} vs the base (step 0), paired over items:\n"
            + stats.format_summary(summary)
        )
        if self.layout.read_manifest().get("stages"):
            manifest["sequence"] = sequence.write_summary(self.layout, table, title=title)
        timings = {
            "total_s": round(time.time() - self.started, 1),
            "eval_s": self.eval_s,
            **manifest.pop("timings", {}),
        }
        self.layout.update_manifest(
            **manifest,
            final_vs_base=summary,
            status="finished",
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
            timings=timings,
        )
        return table
