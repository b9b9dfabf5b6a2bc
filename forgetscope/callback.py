"""``ForgettingCallback``: forgetting curves from your own training script.

Add it to a transformers ``Trainer`` or TRL's ``SFTTrainer`` in one line::

    from forgetscope import ForgettingCallback

    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.add_callback(ForgettingCallback(trainer, evals={"general": ["hellaswag", "arc_easy"]}, name="my-sft"))
    trainer.train()

It scores the model in memory at step 0 (the base, before the first update) and at every
scheduled step, through the same run session as ``forgetscope run`` (:mod:`forgetscope.session`:
lock, manifest, result cache, per-item samples, scoring precision), and writes the same run
folder, so ``forgetscope report``, ``gate`` and ``load_results`` read it unchanged. Every
snapshot's scores also go through the Trainer's own ``log`` (``eval_forgetscope/<eval>/<metric>``, which
dashboards show as ``eval/forgetscope/...``),
so whatever ``report_to`` the script set (TensorBoard, W&B, MLflow) shows the forgetting curves.
Under ``accelerate launch`` every process scores its share of each snapshot; the main one writes.

A callback writes one training into its run folder: it starts that folder at the training's step 0
(the base), or goes on with a training resumed from a checkpoint (``resume_from_checkpoint``)
whose earlier steps, step 0 included, are there. It holds the folder's lock from when it is built
until its training ends; built again in the same process for the same folder (a notebook cell run
again, after a crash too), the new callback takes the folder over. During training, a SIGTERM
marks the run ``failed`` (unless the script handles SIGTERM itself), as the exit of a script whose
training did not end does.
"""

from __future__ import annotations

import atexit
import functools
import os
import signal
import sys
import threading
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import Any

from forgetscope import data, distributed, evaluate, io, snapshots, validate
from forgetscope.errors import UserError
from forgetscope.recipe import EvalConfig, SnapshotConfig, TaskConfig
from forgetscope.schema import build
from forgetscope.session import RunSession
from forgetscope.train import SnapshotCallback


class CallbackError(UserError):
    """The callback's settings cannot be used; one line per problem."""


_holders: weakref.WeakValueDictionary[Path, ForgettingCallback] = weakref.WeakValueDictionary()
"""The callbacks of this process that hold their run folder, by folder: one built again for the
same folder takes it over from the earlier one (which no longer trains)."""


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM during a callback's training, in a script that left SIGTERM at its default: mark the
    runs being trained ``failed``, then die of the signal as the default would have (exit status
    143). A forked child inherits this handler (lm-eval's bootstrap workers, ended with SIGTERM):
    there it only dies."""
    signal.signal(signum, signal.SIG_DFL)
    try:
        for callback in list(_holders.values()):
            if callback.training and callback.pid == os.getpid():
                callback.session.fail(f"stopped by {signal.Signals(signum).name}")
    finally:
        os.kill(os.getpid(), signum)  # delivered at once: the process ends here


def _restore_sigterm() -> None:
    """Give SIGTERM back its default once no callback of this process trains (unless the script
    has set its own handler since)."""
    on_main_thread = threading.current_thread() is threading.main_thread()  # where handlers can be set
    if (
        on_main_thread
        and signal.getsignal(signal.SIGTERM) is _terminated
        and not any(c.training for c in _holders.values())
    ):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _log_scores(trainer_ref: weakref.ref, scores: dict[str, float]) -> None:
    """Log a snapshot's scores through the Trainer's own ``log`` with its model in eval mode, as
    ``Trainer.evaluate`` logs. TRL's trainers add the metrics they accumulate (SFTTrainer: entropy,
    mean_token_accuracy, num_tokens) to whatever is logged next and clear them, choosing train or
    eval ones by ``model.training``: in training mode the scores would take the train ones away
    from that step's loss record. The Trainer puts the model back in training mode each step."""
    trainer = trainer_ref()
    training = trainer.model.training
    trainer.model.eval()
    try:
        trainer.log(scores)
    finally:
        trainer.model.train(training)


class ForgettingCallback(SnapshotCallback):
    """Score a Trainer's model on a schedule and write a forgetscope run folder.

    ``trainer``: the Trainer (or SFTTrainer) it is added to; its model before training is the
    base, and its tokenizer (``processing_class``) renders the evals.
    ``evals``: the fields of a recipe's ``evals`` section (``general``, ``new``, ``limit``,
    ``include``, ``precision``, ...; ``forgetscope fields``); ``new`` defaults to none.
    ``snapshots``: the fields of a recipe's ``snapshots`` section (``schedule: log``, ``count: 6``
    by default; ``{"schedule": "every", "every": 100}``; ``{"schedule": "at", "at": [...]}``).
    ``name``: the run folder is ``<runs_dir>/<name>``. ``chat_template``: render new-task evals
    with the tokenizer's chat template (``auto``: when it has one), as the training data was.
    """

    def __init__(
        self,
        trainer,
        evals: dict[str, Any] | None = None,
        snapshots: dict[str, Any] | None = None,
        name: str = "forgetting",
        runs_dir: str = "runs",
        chat_template: str = "auto",
    ):
        evals = {} if evals is None else evals
        evals = {"new": [], **evals} if isinstance(evals, dict) else evals  # not a mapping: build says so
        evals_problems: list[str] = []
        self.evals = build(EvalConfig, evals, "evals.", evals_problems)
        if not evals_problems:  # the names and values of evals that built
            evals_problems = validate.check_evals(self.evals, Path.cwd())
        snapshot_problems: list[str] = []
        self.schedule = build(SnapshotConfig, snapshots or {}, "snapshots.", snapshot_problems)
        if not snapshot_problems:
            snapshot_problems = validate.check_snapshots(self.schedule, None)
        problems = evals_problems + snapshot_problems + validate.check_name(name, "name")
        if chat_template not in ("auto", "on", "off"):
            problems.append(f"chat_template: expected 'auto' | 'on' | 'off', got {chat_template!r}")
        tokenizer = trainer.processing_class
        if tokenizer is None:
            problems.append("the Trainer has no tokenizer; hand it over: Trainer(..., processing_class=tokenizer)")
        if problems:
            raise CallbackError("\n".join(f"ForgettingCallback: {p}" for p in problems))
        super().__init__([], self._score)
        # The scores reach report_to's integrations through the Trainer's own log. A weak reference:
        # the Trainer holds this callback, and the cycle would keep the model (and a process group)
        # alive until the garbage collector runs, or until exit.
        self.report = functools.partial(_log_scores, weakref.ref(trainer))
        model = trainer.model
        self.method = "lora" if hasattr(model, "peft_config") else "full"
        self.base = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        self.chat = data.uses_chat_template(TaskConfig(chat_template=chat_template), tokenizer)
        settings = {
            "base": self.base,
            "evals": asdict(self.evals),
            "snapshots": asdict(self.schedule),
            "chat_template": chat_template,
        }
        self.root = (Path(runs_dir) / name).resolve()
        earlier = _holders.get(self.root)
        if earlier is not None:
            earlier._hand_over()  # before the lock is taken: the earlier callback holds it
        self.session = RunSession(
            Path(runs_dir) / name,
            {"callback": settings},
            "a different run; give ForgettingCallback another name= or remove that folder",
            main_process=trainer.is_world_process_zero(),
        )
        self.session.acquire()  # before training: a folder in use, or holding another run, is refused now
        try:
            if self.session.main and self.session.layout.read_manifest().get("status") == "finished":
                raise CallbackError(
                    f"ForgettingCallback: {self.session.root} holds a finished run; give another name= or remove it"
                )
            # the evals' data and the base's fingerprint (and drift samples), before the first update
            with distributed.main_first():  # rank 0 samples the drift probe's text (cached), the others read it
                self.suite = evaluate.prepare_suite(self.evals, Path.cwd(), self.chat, model, tokenizer)
        except BaseException:
            self.session.release()  # a notebook goes on: leave the folder free
            raise
        self.tokenizer = tokenizer
        self.holds = True
        """Whether this callback holds its run folder: until its training ends or a callback built
        later for the same folder takes it over."""
        self.training = False
        """Whether its training began and has not ended (it may have died of an error)."""
        self.thread = threading.current_thread()
        """The thread that trains (set when training begins)."""
        self.pid = os.getpid()
        """The process that trains (a forked child is not it)."""
        self.counts_tokens = trainer.args.include_num_input_tokens_seen not in ("no", False)
        """Whether the Trainer counts the tokens it trains on (``include_num_input_tokens_seen``);
        if not, the tokens of every step past 0 are recorded as unknown (empty), not 0."""
        _holders[self.root] = self

    def _score(self, model, step: int, tokens: int) -> dict[str, float]:
        known = self.counts_tokens or step == 0
        evaluation = self.session.score(
            model, step, tokens if known else None, {"method": self.method, "base": self.base}
        )
        return self.session.scalars(evaluation)

    def _release(self) -> None:
        """Let go of the run folder: its lock, the exit hook and (the last training) the SIGTERM handler."""
        self.holds = self.training = False
        atexit.unregister(self._interrupted)
        if _holders.get(self.root) is self:
            del _holders[self.root]
        self.session.release()
        _restore_sigterm()

    def _hand_over(self) -> None:
        """Let a callback built later in this process for the same folder take it over: a training
        that began and did not end died of an error (or the callback would not be built now), so its
        run is marked ``failed``. One still training in another thread keeps the folder."""
        if self.training and self.thread is not threading.current_thread() and self.thread.is_alive():
            raise io.BusyError(
                f"{self.session.root} is in use by a training in this process (thread {self.thread.name}); "
                "wait for it to finish or choose another name"
            )
        if self.training:
            self._interrupted(
                "the training stopped before it ended (an error?); a callback built later took the folder over"
            )
        self._release()

    def _history_problem(self, step: int) -> str | None:
        """Why a training that begins at ``step`` cannot write the run folder, if it cannot: one
        starting at step 0 would mix with the snapshots of an earlier training there; one resumed
        from a checkpoint into a folder without step 0 has no base to measure forgetting from."""
        scored = self.session.layout.eval_steps()
        earlier = [s for s in scored if s > 0]
        if step == 0 and earlier:
            return (
                f"{self.session.root} holds snapshots of an earlier training (steps {earlier}) and this training "
                "starts at step 0; give another name= (or remove that folder), or continue that training "
                "with trainer.train(resume_from_checkpoint=...)"
            )
        if step > 0 and 0 not in scored:
            return (
                f"{self.session.root} has no step 0 (the base) and this training resumes at step {step}: there is "
                "no base to measure forgetting from; add the callback from the training's first step, "
                "or score the base and the checkpoints with `forgetscope audit --base ... --checkpoints ...`"
            )
        return None

    def _interrupted(self, why: str = "the training script ended before training did") -> None:
        """Mark the run failed: at the exit of a script whose training did not end (with the error
        that ended it, when Python kept one), or when a callback built later takes its folder over."""
        error = getattr(sys, "last_value", None)
        self.session.fail(error if isinstance(error, BaseException) else why)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.holds:
            raise CallbackError(
                f"ForgettingCallback: this callback no longer holds {self.session.root} (its training ended, or a "
                "callback built later for that folder took it over); add a new ForgettingCallback for this training"
            )
        problems = validate.check_snapshots(self.schedule, state.max_steps, "the Trainer's max_steps")
        history = self._history_problem(state.global_step) if self.session.main else None
        problems += [p for p in [distributed.broadcast(history)] if p]  # every process stops alike
        if problems:
            self._release()  # nothing written: the script may build the callback again
            raise CallbackError("\n".join(f"ForgettingCallback: {p}" for p in problems))
        steps = snapshots.schedule(self.schedule, state.max_steps)
        self.steps = {s for s in steps if s > 0 or state.global_step == 0}  # resumed: the base is no longer in memory
        self.session.start(
            self.suite,
            self.tokenizer,
            kind="callback",
            base=self.base,
            method=self.method,
            snapshot_steps=steps,
            chat_template=self.chat,
            processes=args.world_size,
        )
        self.training, self.thread, self.pid = True, threading.current_thread(), os.getpid()
        if self.session.main:
            atexit.register(self._interrupted)
            # the script's own SIGTERM handling stays its own; a handler can only be set on the main thread
            if self.thread is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _terminated)
        super().on_train_begin(args, state, control, model=model, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        try:
            self.session.write_train_log(state.log_history, title=f"{self.session.root.name}: training losses")
            self.session.finish(
                self.session.root.name,
                "callback",
                self.method,
                title=f"{self.session.root.name}: {self.method} fine-tune of {self.base}",
                train_log=state.log_history,
            )
        except BaseException as err:
            self.session.fail(err)
            raise
        finally:
            self._release()
