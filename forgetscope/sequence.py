"""Sequences of new tasks (a recipe's ``stages``): train them one after another, snapshot and
score across all of them, and read off the accuracy matrix.

Steps count on across stages: stage ``k`` covers steps ``start_k + 1 .. end_k``. Each stage
snapshots on the recipe's schedule applied to its own length, so every stage's end is a snapshot
and the matrix ``R[i][j]`` (score on task ``j`` after stage ``i``) is read at those steps.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from forgetscope import continual, data, evaluate, figures, io, replay, snapshots, train
from forgetscope.recipe import Recipe


def bounds(recipe: Recipe) -> list[tuple[int, int]]:
    """(start, end) step of every stage: the first stage starts at 0 (the base)."""
    out, start = [], 0
    for stage in recipe.sequence:
        out.append((start, start + stage.steps))
        start += stage.steps
    return out


def schedule(recipe: Recipe) -> list[int]:
    """Snapshot steps of the whole sequence: each stage's schedule, shifted to where it starts."""
    steps = {0}
    for (start, _), stage in zip(bounds(recipe), recipe.sequence):
        steps |= {start + s for s in snapshots.schedule(recipe.snapshots, stage.steps)}
    return sorted(steps)


def manifest_entry(recipe: Recipe) -> list[dict]:
    """What the manifest records per stage (the matrix is read from it)."""
    return [{"task": stage.task.name or stage.task.path, "evals": stage.evals or [stage.task.name], "start": start,
             "end": end, "lr": stage.lr if stage.lr is not None else recipe.train.lr, "replay": bool(recipe.stage_recipe(i).replay)}
            for i, ((start, end), stage) in enumerate(zip(bounds(recipe), recipe.sequence))]


def stage_data(recipe: Recipe, tokenizer) -> list[tuple[list[str], list[dict]]]:
    """Every stage's prompts (for replay in later stages) and tokenized examples, checked before
    anything is written or trained."""
    out = []
    for i in range(len(recipe.stages)):
        task = recipe.stage_recipe(i).task
        records = data.load_records(task, recipe.base_dir)
        prompts = [str(r.get(task.prompt_field, "")) for r in records]
        out.append((prompts, data.tokenize(records, tokenizer, task, recipe.train.seq_len)))
    return out


def train_stages(recipe: Recipe, model, tokenizer, stages: list[tuple[list[str], list[dict]]], steps: list[int],
                 take: Callable[[object, int, int], None], out_dir: Path) -> list[dict]:
    """Train every stage in turn on the same model; ``take(model, step, tokens)`` at each snapshot
    (global steps). Before a stage with replay, the buffer is sampled from the model as it is then,
    prompted (``replay.prompts: tasks``) with the earlier stages' prompts. Returns the training
    log of all stages, with global steps and a ``stage`` column."""
    log: list[dict] = []
    tokens = 0
    for index, (start, end) in enumerate(bounds(recipe)):
        stage = recipe.stage_recipe(index)
        buffer = None
        if stage.replay is not None:  # the earlier stages' prompts, taken in turn
            earlier = [prompts for prompts, _ in stages[:index]]
            prompts = [p for group in itertools.zip_longest(*earlier) for p in group if p is not None]
            buffer = replay.build_buffer(model, tokenizer, stage, evaluate.fingerprint(model), prompts)
        local = [s - start for s in steps if start < s <= end or (index == 0 and s == 0)]

        def take_global(current, step: int, seen: int, start: int = start, tokens: int = tokens) -> None:
            take(current, start + step, tokens + seen)

        callback = train.SnapshotCallback(local, take_global)
        trainer = train.make_trainer(model, tokenizer, stages[index][1], stage, str(out_dir / f"stage-{index + 1}"),
                                     [callback], buffer)
        print(f"forgetscope: stage {index + 1}/{len(recipe.stages)}: {stage.task.name or stage.task.path}, "
              f"steps {start + 1}..{end}" + (" with replay" if buffer is not None else ""))
        trainer.train()
        tokens += int(trainer.state.num_input_tokens_seen)
        log += [{**entry, "step": start + entry.get("step", 0), "stage": index + 1} for entry in trainer.state.log_history]
    return log


def write_summary(layout: snapshots.RunLayout, table: pd.DataFrame, title: str = "") -> dict:
    """Write ``matrix.csv`` and ``sequence.png`` for a finished sequence, print the matrix and its
    metrics, and return them (for the manifest)."""
    stages = layout.read_manifest()["stages"]
    matrix = continual.accuracy_matrix(table, stages)
    io.write_text(layout.root / "matrix.csv", matrix.to_csv(index_label="after"))
    figures.save(figures.plot_sequence(table, stages, matrix, title), layout.root / "sequence.png")
    higher = [bool(table[table["task"] == column]["higher_is_better"].iloc[0]) for column in matrix.columns]
    result = continual.sequence_metrics(matrix.to_numpy(float), higher)
    print("\nforgetscope: accuracy matrix R[i][j] (rows: after each stage; columns: tasks):\n" + matrix.round(3).to_string())
    print("  " + ", ".join(f"{k} {v:+.3f}" for k, v in result.items() if not isinstance(v, list)))
    return {"matrix": matrix.reset_index(names="after").to_dict("records"), **result}
