"""``forgetscope run``: fine-tune a base model by a recipe, snapshot it on a schedule and score
every snapshot, then write the forgetting curves.

Step 0 is always the untouched base. Evaluations that already finished in the run folder (an
interrupted earlier attempt of the same recipe) are kept and not recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import shutil
import time
from importlib.metadata import version
from pathlib import Path

import pandas as pd

from forgetscope import cascade, curves, data, evaluate, figures, io, models, replay, sequence, snapshots, stats, train
from forgetscope.errors import UserError
from forgetscope.recipe import Recipe


class RunError(UserError):
    """The run cannot start as asked; the message says what to change."""


def _versions() -> dict[str, str]:
    names = ("forgetscope", "torch", "transformers", "peft", "accelerate", "datasets", "lm_eval")
    return {"python": platform.python_version(), **{n: version(n.replace("_", "-")) for n in names}}


def resource_advice(err: BaseException) -> str | None:
    """What to change when a run dies of memory or disk, else None."""
    import errno

    import torch

    if isinstance(err, torch.OutOfMemoryError) or (isinstance(err, RuntimeError) and "out of memory" in str(err).lower()):
        return ("out of memory; lower train.batch_size (raise train.grad_accum to keep the batch), train.seq_len "
                "or evals.batch_size, or use method: lora")
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return ("the disk is full; free space, set snapshots.keep_weights: false or snapshots.resumable: false, "
                "or point runs_dir / FORGETSCOPE_CACHE at a larger disk")
    return None


def recipe_hash(recipe: Recipe) -> str:
    """Hash of the resolved recipe, minus fields that do not change results (name, runs_dir)."""
    data = recipe.to_dict()
    data.pop("name")
    data.pop("runs_dir")
    return hashlib.sha256(repr(data).encode()).hexdigest()[:16]


def run(recipe: Recipe) -> Path:
    """Run a recipe end to end and return the run folder (``runs/<name>``).

    Everything that can fail on bad input (the model, the data) is checked before the run folder
    is written; a folder that a different recipe wrote is never touched, and one that another
    process is using is refused. A run that fails (a diverging loss, an error) is marked
    ``failed`` in its manifest; its finished snapshots and evaluations stay.
    """
    layout = snapshots.RunLayout(Path(recipe.runs_dir) / recipe.name)
    if int(os.environ.get("RANK", "0")) != 0:
        return _run(recipe, layout, main_process=False)
    # The lock lives in the cache, not the runs folder, so that a run refused for bad input writes nothing.
    key = hashlib.sha256(str(layout.root.resolve()).encode()).hexdigest()[:16]
    with io.exclusive(models.cache_dir() / "locks" / f"{key}.lock", str(layout.root)):
        return _run(recipe, layout, main_process=True)


def _run(recipe: Recipe, layout: snapshots.RunLayout, main_process: bool) -> Path:
    manifest = layout.read_manifest()
    run_hash = recipe_hash(recipe)
    if manifest and manifest.get("recipe_hash") != run_hash:
        raise RunError(f"{layout.root} holds a run of a different recipe; choose another name (--set name=...) or remove that folder")
    if manifest.get("status") == "finished":
        print(f"forgetscope: {layout.root} already finished; curves in {layout.curves}")
        return layout.root
    if main_process and layout.root.is_dir():
        io.sweep(layout.root)  # debris of an interrupted attempt; we hold the run's lock

    started = time.time()
    model_path = models.resolve(recipe.base, recipe.base_dir)
    model, tokenizer = models.load(model_path, recipe.trust_remote_code, recipe.allow_pickle)
    chat = data.uses_chat_template(recipe.sequence[0].task if recipe.stages else recipe.task, tokenizer)
    if recipe.stages:  # every stage's data is checked before anything is written
        stage_data = sequence.stage_data(recipe, tokenizer)
        steps = sequence.schedule(recipe)
    else:
        examples = data.tokenize(data.load_records(recipe.task, recipe.base_dir), tokenizer, recipe.task, recipe.train.seq_len)
        steps = snapshots.schedule(recipe.snapshots, recipe.train.steps)
    base_fp = evaluate.fingerprint(model)  # hashed once: keys the drift probe's samples and the replay buffer
    suite = evaluate.prepare_suite(recipe.evals, recipe.base_dir, chat, model, tokenizer, base_fp) if main_process else None
    if main_process:
        layout.root.mkdir(parents=True, exist_ok=True)
        io.write_text(layout.recipe, recipe.to_yaml())
        layout.update_manifest(
            status="running",
            recipe_hash=run_hash,
            base=recipe.base,
            base_path=model_path,
            method=recipe.method,
            seed=recipe.train.seed,
            snapshot_steps=steps,
            chat_template=chat,
            bf16=train.use_bf16(recipe.train.precision),
            processes=train.world_size(),
            trust_remote_code=recipe.trust_remote_code,
            allow_pickle=recipe.allow_pickle,
            versions=_versions(),
            started=time.strftime("%Y-%m-%dT%H:%M:%S"),
            stages=sequence.manifest_entry(recipe) if recipe.stages else None,
        )
    buffer = replay.build_buffer(model, tokenizer, recipe, base_fp) if recipe.replay and not recipe.stages else None
    model = train.prepare_model(model, recipe)
    done = set(layout.eval_steps())
    timings: dict[str, float] = {}
    # cascade hook (issue 15): cheap probes at extra probe steps, the full battery where the cascade decides
    probes = cascade.probe_steps(recipe.cascade, steps, recipe.train.steps) if recipe.cascade else []
    triage = cascade.start(recipe, suite, steps, layout, model, tokenizer, chat, base_fp) if recipe.cascade and main_process else None

    def take(current, step: int, tokens: int) -> None:
        train.check_finite(current, step)
        weights = recipe.snapshots.keep_weights and step > 0 and step in steps  # probe steps keep no weights
        meta = {"step": step, "tokens": tokens, "method": recipe.method, "recipe_hash": run_hash, "base": model_path}
        snapshots.save_snapshot(layout, step, current, tokenizer, meta, weights)
        if step in done:
            return
        tick = time.time()
        evaluation = (triage.score(current, tokenizer, step) if triage else  # cascade hook (issue 15)
                      evaluate.evaluate_model(current, tokenizer, suite, base_only=step == 0))
        snapshots.save_eval(layout, step, tokens, evaluation)
        timings[snapshots.step_name(step)] = round(time.time() - tick, 2)
        reused = f" (cached: {', '.join(evaluation['cached'])})" if evaluation["cached"] else ""
        print(f"forgetscope: step {step}: " + curves.headline(evaluation["results"]) + reused)

    resume = None
    if not recipe.stages:
        callback = train.SnapshotCallback(steps, take, resumable=recipe.snapshots.resumable)
        probing = [train.SnapshotCallback(probes, take)] if probes else []  # cascade hook (issue 15): no saves there
        trainer = train.make_trainer(model, tokenizer, examples, recipe, str(layout.root / "trainer"), [callback, *probing], buffer)
        resume = train.latest_checkpoint(layout.root / "trainer") if recipe.snapshots.resumable else None
    if resume and main_process:
        print(f"forgetscope: resuming {layout.root} from {Path(resume).name}")
        layout.update_manifest(resumed_from=Path(resume).name)
    tick = time.time()
    try:
        if recipe.stages:
            log_history = sequence.train_stages(recipe, model, tokenizer, stage_data, steps, take, layout.root / "trainer")
        else:
            trainer.train(resume_from_checkpoint=resume)
            log_history = trainer.state.log_history
    except BaseException as err:
        if main_process:
            layout.update_manifest(status="failed", error=f"{type(err).__name__}: {err}",
                                   failed=time.strftime("%Y-%m-%dT%H:%M:%S"))
        advice = resource_advice(err)
        if advice:
            raise RunError(f"{layout.root}: {advice}; finished snapshots and results are kept, run the same command to resume") from err
        raise
    train_seconds = time.time() - tick - sum(timings.values())
    if not main_process:
        return layout.root

    shutil.rmtree(layout.root / "trainer", ignore_errors=True)
    log = pd.DataFrame([e for e in log_history if "loss" in e])
    io.write_text(layout.root / "train_log.csv", log.to_csv(index=False))
    if not log.empty:
        figures.save(figures.plot_train_log(log, title=f"{recipe.name}: training losses"), layout.root / "train_loss.png")
    recipe_name = Path(recipe.source).stem if recipe.source else recipe.name
    table = curves.write_curves(layout, recipe.name, recipe_name, recipe.method)
    method = f"{recipe.method} + {recipe.replay.source} replay ({recipe.replay.loss})" if recipe.replay else recipe.method
    figures.save(figures.plot_curves(table, title=f"{recipe.name}: {method} on {recipe.base}"), layout.figure)
    summary = stats.final_vs_base(layout, table)
    print(f"\nforgetscope: step {summary[0]['step']} vs the base (step 0), paired over items:\n" + stats.format_summary(summary))
    sequence_summary = sequence.write_summary(layout, table, title=f"{recipe.name}: {method}") if recipe.stages else None
    layout.update_manifest(
        sequence=sequence_summary,
        final_vs_base=summary,
        status="finished",
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
        timings={"total_s": round(time.time() - started, 1), "train_s": round(train_seconds, 1), "eval_s": timings},
        train_log=log_history,
        replay={**dataclasses.asdict(recipe.replay), "coeff": replay.coeff(recipe.replay)} if recipe.replay else None,
    )
    return layout.root
