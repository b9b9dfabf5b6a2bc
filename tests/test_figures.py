"""Figures drawn from hand-made tables: what each line and legend shows, and that labels stay readable."""

import itertools

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from forgetscope import figures


def _rows(run: str, task: str, steps, values, metric="acc") -> list[dict]:
    return [
        {
            "run": run,
            "recipe": run,
            "method": "full",
            "step": s,
            "tokens": s * 10,
            "task": task,
            "role": "new",
            "metric": metric,
            "value": v,
            "stderr": 0.01,
            "n": 20,
            "higher_is_better": True,
        }
        for s, v in zip(steps, values)
    ]


def _drawn(fig):
    """``fig`` laid out and drawn (Agg), so text extents are known."""
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig


def test_learning_draws_one_line_per_run_and_task_and_its_title_names_them():
    """A sequence scores every stage's task at every step; one line per run zigzagged between them."""
    steps = [0, 50, 100, 150]
    rows = pd.DataFrame(
        _rows("seq2", "digits_reverse", steps, [0, 1, 1, 0.5])
        + _rows("seq2", "digits_inc", steps, [0, 0, 0.5, 1])
        + _rows("kint", "digits_reverse", steps, [0, 0.2, 0.9, 1])
    )
    fig = figures.plot_learning(rows, target=0.9)
    [ax] = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("target")}
    assert sorted(lines) == ["kint: digits_reverse", "seq2: digits_inc", "seq2: digits_reverse"]
    for line in lines.values():
        assert list(line.get_xdata()) == steps  # never back in step: each line is one task
    assert ax.get_title() == "New tasks: digits_reverse, digits_inc"
    one = figures.plot_learning(rows[rows["task"] == "digits_reverse"])
    assert one.axes[0].get_title() == "New task: digits_reverse"
    assert sorted(line.get_label() for line in one.axes[0].get_lines()) == ["kint", "seq2"]


def test_forgetting_has_one_legend_naming_every_run():
    """A run without the first panel's probe was missing from the only legend."""
    drops = pd.DataFrame(
        [
            {"run": run, "task": task, "metric": "acc", "step": s, "drop": 0.1 * s, "low": 0.0, "high": 0.2 * s}
            for run, tasks in (("a", ["facts", "prose"]), ("b", ["prose"]), ("c", ["facts"]))
            for task in tasks
            for s in (0, 1, 2)
        ]
    )
    fig = _drawn(figures.plot_forgetting(drops))
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert len(legends) == 1
    assert [t.get_text() for t in legends[0].get_texts()] == ["a", "b", "c"]
    boxes = [ax.get_window_extent() for ax in fig.axes]
    legend = legends[0].get_window_extent()
    assert not any(legend.overlaps(box) for box in boxes)  # beside the panels, covering no curve


def _tick_labels_overlap(ax) -> list[str]:
    """Pairs of neighbouring x tick labels of ``ax`` closer than 2 pixels (drawn figure)."""
    labels = [t for t in ax.get_xticklabels() if t.get_visible() and t.get_text()]
    boxes = sorted((t.get_window_extent().x0, t.get_window_extent().x1, t.get_text()) for t in labels)
    return [f"{a[2]}/{b[2]}" for a, b in itertools.pairwise(boxes) if b[0] < a[1] + 2]


@pytest.mark.parametrize(
    "steps",
    [
        list(range(0, 601, 50)),  # every 50 up to 600
        list(range(0, 401, 5)),  # 80 snapshots
        sorted({0, *np.unique(np.round(np.geomspace(1, 1000, 19)).astype(int)).tolist()}),  # log schedule
        [0, 1, 3],
    ],
    ids=["every50", "80snapshots", "log", "at"],
)
def test_curves_tick_labels_never_overlap(steps):
    rows = _rows("r", "new", steps, np.linspace(0, 1, len(steps)))
    general = [
        dict(r, task="facts", role="general") for r in _rows("r", "facts", steps, np.linspace(1, 0.5, len(steps)))
    ]
    fig = _drawn(figures.plot_curves(pd.DataFrame(rows + general)))
    for ax in fig.axes:
        shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert len(shown) >= 3, shown
        assert _tick_labels_overlap(ax) == [], shown
        lo, hi = ax.get_xlim()
        assert lo <= 0 and hi >= steps[-1]  # every snapshot inside the axes


def test_curves_of_several_runs_draw_one_line_per_run_within_0_and_1():
    """`load_results(["runs"])` holds several runs: one line joined them all, zig-zagging between
    runs at every step; and a Wald band of an accuracy reached below 0."""
    steps = [0, 10, 20]
    table = pd.DataFrame(
        _rows("plain", "facts", steps, [0.0, 1.0, 1.0]) + _rows("replay", "facts", steps, [0.0, 0.5, 1.0])
    )
    table["stderr"] = 0.2
    [ax] = figures.plot_curves(table).axes
    lines = {
        line.get_label(): list(line.get_ydata()) for line in ax.get_lines() if not line.get_label().startswith("_")
    }
    assert lines == {"plain": [0.0, 1.0, 1.0], "replay": [0.0, 0.5, 1.0]}
    for band in ax.collections:
        low, high = band.get_paths()[0].vertices[:, 1].min(), band.get_paths()[0].vertices[:, 1].max()
        assert low >= 0.0 and high <= 1.0


def test_a_run_keeps_its_colour_across_the_reports_figures():
    """Colours were assigned per figure over the runs it shows: `ra` orange in one, green in another."""
    colors = figures.run_colors(["ra", "rb", "rc"])
    drops = pd.DataFrame(
        [
            {"run": "rb", "task": "facts", "metric": "acc", "step": s, "drop": 0.0, "low": 0.0, "high": 0.0}
            for s in (0, 1)
        ]
    )
    [ax] = figures.plot_forgetting(drops, colors).axes
    assert ax.get_lines()[0].get_color() == colors["rb"] != figures.run_colors(["rb"])["rb"]
    assert len(set(figures.run_colors([f"r{i:02d}" for i in range(20)]).values())) == 20  # tab20 past 10 runs


def test_no_general_probe_or_no_point_says_so_instead_of_failing():
    empty = pd.DataFrame(columns=["run", "task", "metric", "step", "drop", "low", "high"])
    assert "no general probe" in figures.plot_forgetting(empty).texts[0].get_text()
    summary = pd.DataFrame([{"run": "seq", "gain_final": 1.0, "forgetting_final": np.nan, "pareto": False, "rank": 1}])
    assert "no run has both" in figures.plot_frontier(summary).texts[0].get_text()


def test_a_sequence_of_accuracy_and_bits_per_byte_stages_reads_each_in_its_own_scale():
    """A stage scored in bits per byte beside one in accuracy shared one colour scale (yellow: the
    worst bits per byte, and the best accuracy) and one y axis (the accuracy flat under 0-12)."""
    steps = [0, 10, 20]
    prose = [dict(r, higher_is_better=False) for r in _rows("r", "prose", steps, [8.0, 4.2, 11.7], "bits_per_byte")]
    table = pd.DataFrame(prose + _rows("r", "digits", steps, [0.0, 0.1, 1.0]))
    matrix = pd.DataFrame({"prose": [8.0, 4.2, 11.7], "digits": [0.0, 0.1, 1.0]}, index=["base", "prose", "digits"])
    stages = [{"start": 0, "end": 10}, {"start": 10, "end": 20}]
    fig = figures.plot_sequence(table, stages, matrix)
    heat, curves_ax, _, twin = fig.axes  # heatmap, curves, colour bar, the second metric's axis
    assert "each column its own scale" in heat.get_title()
    colours = heat.get_images()[0].get_array()
    assert colours[1, 0] == 1.0 and colours[2, 0] == 0.0  # bits per byte 4.2 is the best of its column, 11.7 the worst
    assert colours[2, 1] == 1.0  # accuracy 1.0 the best of its own
    assert curves_ax.get_ylabel().startswith("acc") or twin.get_ylabel().startswith("acc")
    assert {curves_ax.get_ylabel().split()[0], twin.get_ylabel().split()[0]} == {"bits_per_byte", "acc"}


def test_a_sweep_marks_the_runs_that_never_reached_the_target():
    """A value whose run never reached the target vanished from the target panels in silence."""
    table = pd.DataFrame(
        {
            "recipe": "lr",
            "key": "train.lr",
            "value": [1e-3, 3e-3],
            "params": 1000,
            "metric": "acc",
            "forgetting": [0.9, 0.5],
            "new_final": [1.0, 0.4],
            "forgetting_at_target": [0.8, np.nan],
            "steps_to_target": [120.0, np.nan],
        }
    )
    fig = figures.plot_sweep(table, target=0.9)
    for ax in fig.axes[2:]:
        marks = [line for line in ax.get_lines() if line.get_marker() == "x" and len(line.get_xdata())]
        assert [list(m.get_xdata()) for m in marks] == [[3e-3]]
        assert "never reached (top edge)" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_a_training_loss_falling_by_orders_of_magnitude_is_drawn_on_a_log_scale():
    log = pd.DataFrame({"step": [1, 50, 100], "loss": [3.0, 0.01, 0.0003]})
    assert figures.plot_train_log(log).axes[0].get_yscale() == "log"
    assert figures.plot_train_log(log.assign(loss=[3.0, 2.5, 2.2])).axes[0].get_yscale() == "linear"


def test_a_sweep_of_model_references_of_one_size_keeps_them_apart():
    """Three seeds of one width share a parameter count: all three points fell on one x."""
    seeds = [f"scratch:layers=2,hidden=32,heads=2,seed={s}" for s in range(3)]
    table = pd.DataFrame(
        {
            "recipe": "cap",
            "key": "base",
            "value": seeds,
            "params": 41000,
            "metric": "acc",
            "forgetting": [0.1, 0.2, 0.3],
        }
        | {"new_final": 1.0}
    )
    [ax, _] = figures.plot_sweep(table).axes
    assert list(ax.get_lines()[0].get_xdata()) == [0.0, 1.0, 2.0] and ax.get_xlabel() == "base"
    widths = table.assign(value=[s.replace("hidden=32", f"hidden={h}") for s, h in zip(seeds, (8, 16, 32))])
    widths["params"] = [5000, 12000, 41000]
    [ax, _] = figures.plot_sweep(widths).axes
    assert list(ax.get_lines()[0].get_xdata()) == [5000.0, 12000.0, 41000.0] and ax.get_xlabel().startswith(
        "parameters"
    )
