"""Training a recipe's new tasks one after another: ``stages``, or the single ``task`` of a plain
recipe, which is a sequence of one stage. Also the accuracy matrix of a finished sequence.

Steps count on across stages: stage ``k`` covers steps ``start_k + 1 .. end_k``. Each stage
snapshots on the recipe's schedule applied to its own length, so every stage's end is a snapshot
and the matrix ``R[i][j]`` (score on task ``j`` after stage ``i``) is read at those steps.

Resuming: with ``snapshots.resumable`` the Trainer saves its state at every snapshot of a stage,
and at the end of every stage but the last (``trainer/stage-K/checkpoint-N``); ``trainer/stages.json``
records the stages finished. A killed run continues from its latest snapshot: finished stages
are skipped (the model takes the weights saved at the end of the last one), and the stage under
way resumes from its checkpoint.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from forgetscope import continual, data, distributed, evaluate, figures, io, replay, snapshots, train
from forgetscope.recipe import Recipe


def stage_recipes(recipe: Recipe) -> list[Recipe]:
    """The recipe that trains each stage (see :meth:`Recipe.stage_recipe`); a recipe without
    ``stages`` is its own single stage."""
    return [recipe.stage_recipe(i) for i in range(len(recipe.stages))] or [recipe]


def bounds(recipe: Recipe) -> list[tuple[int, int]]:
    """(start, end) step of every stage: the first stage starts at 0 (the base)."""
    out, start = [], 0
    for stage in stage_recipes(recipe):
        out.append((start, start + stage.train.steps))
        start += stage.train.steps
    return out


def schedule(recipe: Recipe) -> list[int]:
    """Snapshot steps of the whole sequence: each stage's schedule, shifted to where it starts."""
    steps = {0}
    for start, end in bounds(recipe):
        steps |= {start + s for s in snapshots.schedule(recipe.snapshots, end - start)}
    return sorted(steps)


def manifest_entry(recipe: Recipe) -> list[dict]:
    """What the manifest records per stage of a recipe with ``stages`` (the matrix is read from it)."""
    return [
        {
            "task": stage.task.name or stage.task.path,
            "evals": stage.eval_names,
            "start": start,
            "end": end,
            "lr": stage.lr if stage.lr is not None else recipe.train.lr,
            "replay": bool(recipe.stage_recipe(i).replay),
        }
        for i, ((start, end), stage) in enumerate(zip(bounds(recipe), recipe.stages))
    ]


def stage_data(recipe: Recipe, tokenizer) -> list[tuple[list[str], list[dict]]]:
    """Every stage's prompts (for replay in later stages) and tokenized examples, checked before
    anything is written or trained."""
    out = []
    for stage in stage_recipes(recipe):
        records = data.load_records(stage.task, recipe.base_dir)
        prompts = [data.prompt_of(r, stage.task) or "" for r in records]
        out.append((prompts, data.tokenize(records, tokenizer, stage.task, recipe.train.seq_len)))
    return out


def load_weights(model, checkpoint: str) -> None:
    """Put the weights of a Trainer checkpoint into ``model``: its adapter (peft) or every weight."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        set_peft_model_state_dict(model, load_peft_weights(checkpoint))
        return
    from safetensors.torch import load_file

    state = {}
    for file in sorted(Path(checkpoint).glob("*.safetensors")):
        state.update(load_file(str(file)))
    model.load_state_dict(state, strict=False)  # tied weights are saved once


def train_stages(
    recipe: Recipe,
    model,
    tokenizer,
    stages: list[tuple[list[str], list[dict]]],
    steps: list[int],
    take: Callable[[object, int, int], dict[str, float] | None],
    out_dir: Path,
    base_fingerprint: str,
    on_resume: Callable[[str], None],
    probes: list[int] = (),
) -> list[dict]:
    """Train every stage in turn on the same model; ``take(model, step, tokens)`` at each snapshot
    (global steps), whose scores go to the Trainer's log when the recipe sets ``train.report_to``. Before a stage with replay, the buffer is sampled from the model as it is then
    (the base for the first stage, ``base_fingerprint``), prompted (``replay.prompts: tasks``) with
    the earlier stages' prompts. ``on_resume(checkpoint)`` when a stage resumes from a checkpoint.
    ``probes``: more steps to ``take`` (the cascade's probe steps), where no training state is saved.
    Returns the training log of all stages, with global steps (and a ``stage`` column for sequences)."""
    recipes, resumable = stage_recipes(recipe), recipe.snapshots.resumable
    record = out_dir / "stages.json"
    done = json.loads(record.read_text()) if resumable and record.is_file() else []  # finished stages: log, tokens
    log = [entry for stage in done for entry in stage["log"]]
    tokens = sum(stage["tokens"] for stage in done)
    if done:
        load_weights(model, train.latest_checkpoint(out_dir / f"stage-{len(done)}"))
    for index, ((start, end), stage) in enumerate(zip(bounds(recipe), recipes)):
        if index < len(done):
            continue
        buffer = None
        if stage.replay is not None:  # the earlier stages' prompts, taken in turn
            earlier = [prompts for prompts, _ in stages[:index]]
            prompts = [p for group in itertools.zip_longest(*earlier) for p in group if p is not None]
            fingerprint = base_fingerprint if index == 0 else evaluate.fingerprint(model)
            with distributed.main_first():  # rank 0 samples the buffer (cached), the others read it
                buffer = replay.build_buffer(model, tokenizer, stage, fingerprint, prompts or None)
        local = [s - start for s in steps if start < s <= end or (index == 0 and s == 0)]

        def take_global(
            current, step: int, seen: int, start: int = start, tokens: int = tokens
        ) -> dict[str, float] | None:
            return take(current, start + step, tokens + seen)

        last = index == len(recipes) - 1
        snapshot = train.SnapshotCallback(
            local,
            take_global,
            resumable=resumable,
            save_at_end=not last,
            probes=[s - start for s in probes if start < s <= end],
        )
        folder = out_dir / f"stage-{index + 1}"
        trainer = train.make_trainer(model, tokenizer, stages[index][1], stage, str(folder), [snapshot], buffer)
        if stage.train.report_to:
            snapshot.report = trainer.log
        checkpoint = train.latest_checkpoint(folder) if resumable else None
        if checkpoint:
            on_resume(str(Path(checkpoint).relative_to(out_dir)))
        if len(recipes) > 1:
            print(
                f"forgetscope: stage {index + 1}/{len(recipes)}: {stage.task.name or stage.task.path}, "
                f"steps {start + 1}..{end}" + (" with replay" if buffer is not None else "")
            )
        trainer.train(resume_from_checkpoint=checkpoint)
        seen = int(trainer.state.num_input_tokens_seen)
        stage_log = [
            {**entry, "step": start + entry.get("step", 0), **({"stage": index + 1} if len(recipes) > 1 else {})}
            for entry in trainer.state.log_history
        ]
        log += stage_log
        tokens += seen
        if resumable and not last and trainer.is_world_process_zero():
            done.append({"log": stage_log, "tokens": seen})
            io.write_json(record, done)
            if index:  # the weights at the end of this stage supersede the previous stage's
                shutil.rmtree(out_dir / f"stage-{index}", ignore_errors=True)
    return log


def write_summary(layout: snapshots.RunLayout, table: pd.DataFrame, title: str = "") -> dict:
    """Write ``matrix.csv`` and ``sequence.png`` for a finished sequence, print the matrix and its
    metrics, and return them (for the manifest)."""
    stages = layout.read_manifest()["stages"]
    matrix, result = continual.summary(table, stages)
    io.write_text(layout.root / "matrix.csv", matrix.to_csv(index_label="after"))
    figures.save(figures.plot_sequence(table, stages, matrix, title), layout.root / "sequence.png")
    print(
        "\nforgetscope: accuracy matrix R[i][j] (rows: after each stage; columns: tasks):\n"
        + matrix.round(3).to_string()
    )
    print("  " + ", ".join(f"{k} {v:+.3f}" for k, v in result.items() if not isinstance(v, list)))
    return {"matrix": matrix.reset_index(names="after").to_dict("records"), **result}
