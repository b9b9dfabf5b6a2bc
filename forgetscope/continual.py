"""Metrics of a sequence of new tasks (continual learning), from the accuracy matrix.

``R[i][j]`` is the score on task ``j`` after stage ``i`` (``i = 1..T``), and ``R[0][j]`` the base's
score before any stage; scores are each stage's first eval's primary metric (accuracy for the
embedded tasks). With ``T`` stages (formulas also in docs/METRICS.md):

* average accuracy            ``ACC = (1/T) Σ_j R[T][j]``
* backward transfer           ``BWT = (1/(T-1)) Σ_{j<T} (R[T][j] - R[j][j])``   (negative = forgetting)
* forward transfer            ``FWT = (1/(T-1)) Σ_{j>1} (R[j-1][j] - R[0][j])``  (before training on j)
* forgetting of task j<T       ``f_j = max_{l in 1..T-1} R[l][j] - R[T][j]`` (Chaudhry et al. 2018);
  mean forgetting ``F = (1/(T-1)) Σ_{j<T} f_j``
* learning accuracy            ``LA = (1/T) Σ_j R[j][j]`` (how well each task is learned when it is trained)

For a metric where lower is better the scores are negated first, so every formula reads
"higher is better".
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from forgetscope.curves import primary_metric


def accuracy_matrix(table: pd.DataFrame, stages: list[dict]) -> pd.DataFrame:
    """``R`` as a table: rows ``base`` and ``after <task>`` (one per stage), a column per stage's
    task (its first eval's primary metric), from a run's tidy table and its manifest ``stages``."""
    rows = {}
    evals = [stage["evals"][0] for stage in stages]
    for k, (label, step) in enumerate([("base", 0)] + [(f"after {s['task']}", s["end"]) for s in stages]):
        label = f"{label} (stage {k})" if label in rows else label  # two stages of one task (or file)
        row = {}
        for name in evals:
            part = table[(table["task"] == name) & (table["step"] == step)]
            metric = primary_metric(list(table[table["task"] == name]["metric"].unique()))
            values = part[part["metric"] == metric]["value"]
            row[name] = float(values.iloc[0]) if len(values) else np.nan
        rows[label] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def summary(table: pd.DataFrame, stages: list[dict]) -> tuple[pd.DataFrame, dict]:
    """A finished sequence's :func:`accuracy_matrix` and its :func:`sequence_metrics`, each column
    read in the direction of its primary metric (a task whose eval lists ``perplexity`` before
    ``acc`` is still scored, and read, by ``acc``)."""
    matrix = accuracy_matrix(table, stages)
    higher = []
    for name in matrix.columns:
        rows = table[table["task"] == name]
        metric = primary_metric(list(rows["metric"].unique()))
        higher.append(bool(rows[rows["metric"] == metric]["higher_is_better"].iloc[0]))
    return matrix, sequence_metrics(matrix.to_numpy(float), higher)


def sequence_metrics(matrix: np.ndarray, higher_is_better: bool | list[bool] = True) -> dict:
    """ACC, BWT, FWT, per-task and mean forgetting, and learning accuracy of ``matrix`` (shape
    ``(T + 1, T)``: the base row, then one row per stage; see the module documentation).
    ``higher_is_better``: for all columns, or one per column (a stage of text scored in bits per
    byte beside stages scored in accuracy)."""
    r = np.asarray(matrix, float) * np.where(np.broadcast_to(higher_is_better, np.shape(matrix)[1:]), 1.0, -1.0)
    t = r.shape[1]
    if r.shape[0] != t + 1 or t < 2:
        raise ValueError(f"expected a (T + 1) x T matrix with T >= 2, got {r.shape}")
    final = r[t]
    diagonal = np.array([r[j + 1, j] for j in range(t)])
    forgetting = [float(np.max(r[1:t, j]) - final[j]) for j in range(t - 1)]
    return {
        "average_accuracy": float(final.mean()),
        "backward_transfer": float(np.mean([final[j] - diagonal[j] for j in range(t - 1)])),
        "forward_transfer": float(np.mean([r[j, j] - r[0, j] for j in range(1, t)])),
        "forgetting": forgetting,
        "mean_forgetting": float(np.mean(forgetting)),
        "learning_accuracy": float(diagonal.mean()),
    }
