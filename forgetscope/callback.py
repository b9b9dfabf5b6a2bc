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
"""

from __future__ import annotations

import atexit
import functools
import sys
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import Any

from forgetscope import data, distributed, evaluate, snapshots, validate
from forgetscope.errors import UserError
from forgetscope.recipe import EvalConfig, SnapshotConfig, TaskConfig
from forgetscope.schema import build
from forgetscope.session import RunSession
from forgetscope.train import SnapshotCallback


class CallbackError(UserError):
    """The callback's settings cannot be used; one line per problem."""


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

    def _score(self, model, step: int, tokens: int) -> dict[str, float]:
        evaluation = self.session.score(model, step, tokens, {"method": self.method, "base": self.base})
        return self.session.scalars(evaluation)

    def _interrupted(self) -> None:
        """At the exit of a script whose training did not end: mark the run failed."""
        error = getattr(sys, "last_value", None)
        self.session.fail(
            error if isinstance(error, BaseException) else "the training script ended before training did"
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        problems = validate.check_snapshots(self.schedule, state.max_steps, "the Trainer's max_steps")
        if problems:
            self.session.release()  # nothing written: the script may build the callback again
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
        if self.session.main:
            atexit.register(self._interrupted)
        super().on_train_begin(args, state, control, model=model, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if self.session.main:
            atexit.unregister(self._interrupted)
        self.session.write_train_log(state.log_history, title=f"{self.session.root.name}: training losses")
        self.session.finish(
            self.session.root.name,
            "callback",
            self.method,
            title=f"{self.session.root.name}: {self.method} fine-tune of {self.base}",
            train_log=state.log_history,
        )
        self.session.release()
