"""Forgetting metrics against hand-computed fixtures; loading runs; reports (rendered in headless Chromium)."""

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import forgetscope
from forgetscope import cli, io, metrics, report, results, session, stats
from forgetscope.snapshots import RunLayout

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _table(run="a", new=(0.0, 0.5, 1.0), acc=(0.8, 0.6, 0.4), bpb=(1.0, 1.1, 1.5), steps=(0, 10, 20)) -> pd.DataFrame:
    rows = []
    for i, step in enumerate(steps):
        for task, role, metric, values, higher in (
            ("new", "new", "acc", new, True),
            ("facts", "general", "acc", acc, True),
            ("prose", "general", "bits_per_byte", bpb, False),
        ):
            rows.append(
                {
                    "run": run,
                    "recipe": run,
                    "method": "full",
                    "step": step,
                    "tokens": step * 100,
                    "task": task,
                    "role": role,
                    "metric": metric,
                    "value": values[i],
                    "stderr": None,
                    "n": 10,
                    "higher_is_better": higher,
                }
            )
    return pd.DataFrame(rows)


def test_drops_are_sign_correct_and_relative():
    rows = metrics.primary_rows(_table()).set_index(["task", "step"])
    assert rows.loc[("facts", 20), "drop"] == pytest.approx(0.4)  # accuracy 0.8 -> 0.4: worse by 0.4
    assert rows.loc[("prose", 20), "drop"] == pytest.approx(0.5)  # bits/byte 1.0 -> 1.5: worse by 0.5
    assert rows.loc[("facts", 10), "rel_drop"] == pytest.approx(0.25)
    assert rows.loc[("prose", 10), "rel_delta"] == pytest.approx(0.1)
    assert rows.loc[("new", 20), "drop"] == pytest.approx(-1.0)  # the new task got better


def test_general_forgetting_weights_max_and_area():
    rows = metrics.primary_rows(_table())
    f = metrics.general_forgetting(rows).set_index("step")["forgetting"]
    assert f.tolist() == pytest.approx([0.0, (0.25 + 0.1) / 2, (0.5 + 0.5) / 2])
    weighted = metrics.general_forgetting(rows, {"facts": 3}).set_index("step")["forgetting"]
    assert weighted[10] == pytest.approx((3 * 0.25 + 0.1) / 4)
    huge = metrics.general_forgetting(rows, {"facts": 3e307, "prose": 1e307}).set_index("step")["forgetting"]
    assert huge[10] == pytest.approx(weighted[10])  # only the ratio counts; no overflow to inf or nan
    assert metrics.general_forgetting(rows, {"facts": 0}).set_index("step")["forgetting"][20] == pytest.approx(0.5)
    summary = metrics.run_summary(_table()).iloc[0]
    assert summary["forgetting_max"] == pytest.approx(0.5)
    assert summary["forgetting_auc"] == pytest.approx((10 * 0.175 / 2 + 10 * (0.175 + 0.5) / 2) / 20)  # 0.2125
    assert summary["gain_final"] == pytest.approx(1.0) and summary["gain_best"] == pytest.approx(1.0)


def test_chance_adjusted_drops_and_probes_at_chance():
    scipy_stats = pytest.importorskip("scipy.stats")
    table = _table(acc=(0.8, 0.6, 0.4)).assign(chance=np.nan)
    mc = _table(acc=(0.27, 0.25, 0.1))
    mc = mc[mc.task == "facts"].assign(task="mc", chance=0.25)  # 4 choices, 27 of 100 right at the base
    table.loc[table.task == "facts", "chance"] = 0.25
    table = pd.concat([table, mc.assign(n=100)], ignore_index=True)
    rows = metrics.primary_rows(table).set_index(["task", "step"])
    # accuracy 0.8 -> 0.4 with chance 0.25: 0.4 / 0.55 of the skill above chance is lost
    assert rows.loc[("facts", 20), "adj_drop"] == pytest.approx(0.4 / 0.55)
    assert rows.loc[("prose", 20), "adj_drop"] != rows.loc[("prose", 20), "adj_drop"]  # NaN: no chance for bits/byte
    assert rows.loc[("mc", 0), "p_above_chance"] == pytest.approx(scipy_stats.binom.sf(26, 100, 0.25))  # P[X >= 27]
    assert rows.loc[("mc", 20), "at_chance"] and not rows.loc[("facts", 20), "at_chance"]
    f = metrics.general_forgetting(metrics.primary_rows(table)).set_index("step")["forgetting"]
    assert f[20] == pytest.approx((0.5 + 0.5) / 2)  # mc (0.27 -> 0.1) left out
    kept = metrics.general_forgetting(metrics.primary_rows(table), keep_at_chance=True).set_index("step")["forgetting"]
    assert kept[20] == pytest.approx((0.5 + 0.5 + 0.17 / 0.27) / 3)
    assert metrics.left_out(metrics.primary_rows(table)) == {"a": ["mc (at chance)"]}
    assert metrics.left_out(metrics.primary_rows(table), keep_at_chance=True) == {}
    assert metrics.run_summary(table).iloc[0]["forgetting_final"] == pytest.approx(0.5)


def test_general_forgetting_only_where_every_probe_was_scored():
    table = _table(steps=(0, 10, 20))
    cheap = table[(table.step == 10) & (table.task == "prose")].assign(step=5, value=1.05)  # a cascade step: one probe
    f = metrics.general_forgetting(metrics.primary_rows(pd.concat([table, cheap]))).set_index("step")["forgetting"]
    assert f.index.tolist() == [0, 10, 20]


def test_r_squared_and_drift_against_forgetting():
    x, y = np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.0, 1.0, 2.0, 4.0])
    # S_xy = 6.5, S_xx = 5, S_yy = 8.75: R^2 = 6.5^2 / (5 * 8.75)
    assert metrics.r_squared(x, y) == pytest.approx(6.5**2 / (5 * 8.75))
    scipy_stats = pytest.importorskip("scipy.stats")
    assert metrics.r_squared(x, y) == pytest.approx(scipy_stats.linregress(x, y).rvalue ** 2)
    assert math.isnan(metrics.r_squared(x[:2], y[:2]))
    table = _table()
    kl = table[table.task == "prose"].assign(task="new_task_kl", role="drift", metric="kl", value=[0.0, 0.1, 0.3])
    points = metrics.drift_vs_forgetting(pd.concat([table, kl]), "new_task_kl")
    assert points["drift"].tolist() == [0.0, 0.1, 0.3]
    assert points["forgetting"].tolist() == pytest.approx([0.0, 0.175, 0.5])


def test_matched_learning_is_interpolated_between_snapshots():
    s = metrics.run_summary(_table(), target=0.75).iloc[0]
    assert s["steps_to_target"] == pytest.approx(15.0)  # 0.5 at step 10, 1.0 at 20: 0.75 halfway
    assert s["tokens_to_target"] == pytest.approx(1500.0)
    assert s["forgetting_at_target"] == pytest.approx(0.175 + 0.5 * (0.5 - 0.175))  # F halfway: 0.3375
    assert metrics.run_summary(_table(), target=2.0).iloc[0]["steps_to_target"] is None
    assert metrics.crossing(np.array([0, 10]), np.array([0.9, 1.0]), 0.5) == 0.0  # already there at the start
    # a lower-is-better new task (a loss) reaches a target from above
    table = _table()
    table.loc[table.task == "new", ["metric", "higher_is_better"]] = ["bits_per_byte", False]
    table.loc[table.task == "new", "value"] = [3.0, 2.0, 1.0]
    assert metrics.run_summary(table, target=1.5).iloc[0]["steps_to_target"] == pytest.approx(15.0)


def test_pareto_front_and_ranking():
    assert metrics.pareto_front([1.0, 0.9, 0.8, 1.0], [0.3, 0.1, 0.2, 0.3]).tolist() == [True, True, False, True]
    table = pd.concat(
        [_table("a"), _table("b", acc=(0.8, 0.8, 0.8), bpb=(1.0, 1.0, 1.1)), _table("c", new=(0, 0.1, 0.2))]
    )
    ranked = metrics.rank_runs(metrics.run_summary(table, target=0.75))
    assert ranked["run"].tolist() == ["b", "a", "c"]  # b forgets least at the target; c never reaches it
    assert ranked.set_index("run")["pareto"].to_dict() == {"a": False, "b": True, "c": False}
    # a run that reaches the target without general probes (a sequence) still ranks before one that never does
    reach = pd.DataFrame({"run": ["never", "seq"], "gain_final": [0.2, 1.0], "forgetting_final": [0.1, math.nan]})
    reach["steps_to_target"], reach["forgetting_at_target"] = [math.nan, 690.0], [math.nan, math.nan]
    assert metrics.rank_runs(reach)["run"].tolist() == ["seq", "never"]


def test_mcnemar_exact_on_known_tables():
    assert stats.mcnemar(1, 9) == pytest.approx(2 * (1 + 10) / 2**10)  # 0.0215
    assert stats.mcnemar(0, 0) == 1.0
    assert stats.mcnemar(5, 5) == 1.0
    assert stats.mcnemar(0, 6) == pytest.approx(2 / 64)
    scipy_stats = pytest.importorskip("scipy.stats")
    for b, c in [(3, 12), (20, 9), (7, 7)]:
        assert stats.mcnemar(b, c) == pytest.approx(scipy_stats.binomtest(b, b + c, 0.5).pvalue)


def test_flips_and_first_forgotten_step(tmp_path, fake_run):
    base = [1, 1, 1, 0, 0, 1]
    at5 = [0, 1, 1, 1, 0, 1]
    at10 = [0, 0, 1, 1, 0, 1]
    layout = fake_run(
        tmp_path / "r",
        {s: {f"i{k}": float(v) for k, v in enumerate(vals)} for s, vals in ((0, base), (5, at5), (10, at10))},
    )
    flip = stats.flips(layout, "facts", "acc", 10)
    assert flip["forgotten"] == ["i0", "i1"] and flip["learned"] == ["i3"]
    assert flip["p_mcnemar"] == 1.0  # 2 forgotten, 1 learned: min(1, 2 P[X <= 1]) with X ~ Bin(3, 1/2)
    assert stats.first_forgotten(layout, "facts", "acc", [0, 5, 10]) == {"i0": 5, "i1": 10}


def test_paired_bootstrap_matches_the_closed_form(tmp_path, fake_run):
    rng = np.random.default_rng(1)
    n = 400
    base = rng.random(n) < 0.7
    later = np.where(rng.random(n) < 0.15, ~base, base)  # 15% of items flip
    layout = fake_run(
        tmp_path / "r",
        {0: {f"i{k}": float(v) for k, v in enumerate(base)}, 10: {f"i{k}": float(v) for k, v in enumerate(later)}},
    )
    ci = stats.paired_delta(layout, "facts", "acc", 10, iters=4000)
    d = later.astype(float) - base.astype(float)
    se = d.std(ddof=0) / math.sqrt(n)  # the bootstrap's standard error of a mean of paired differences
    assert ci["delta"] == pytest.approx(d.mean())
    assert ci["low"] == pytest.approx(d.mean() - 1.96 * se, abs=0.15 * 1.96 * se)
    assert ci["high"] == pytest.approx(d.mean() + 1.96 * se, abs=0.15 * 1.96 * se)


def _two_runs(tmp_path, fake_run) -> Path:
    rng = np.random.default_rng(0)
    base = {f"i{k}": float(v) for k, v in enumerate(rng.random(60) < 0.8)}
    for name, p_forget in (("gentle", 0.02), ("harsh", 0.4)):
        steps = {0: base}
        for step in (5, 10):
            steps[step] = {k: float(v and rng.random() > p_forget * step / 10) for k, v in base.items()}
        fake_run(tmp_path / "runs" / name, steps)
    return tmp_path / "runs"


def test_load_results_and_items(tmp_path, fake_run):
    runs = _two_runs(tmp_path, fake_run)
    table = forgetscope.load_results([runs])
    assert sorted(table["run"].unique()) == ["gentle", "harsh"] and sorted(table["step"].unique()) == [0, 5, 10]
    items = forgetscope.load_items([runs / "harsh"], tasks=["facts"])
    assert len(items) == 60 * 3 and set(items.columns) >= {"run", "step", "task", "item_id", "value", "text"}
    assert items["text"].iloc[0] == "Question i0? → answer i0"
    with pytest.raises(results.ResultsError, match="nothing: no such folder; pass a folder made by"):
        forgetscope.load_results([tmp_path / "nothing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(results.ResultsError, match="not a forgetscope run"):
        forgetscope.load_results([tmp_path / "empty"])


def test_report_ranks_and_renders_offline(tmp_path, fake_run):
    runs = _two_runs(tmp_path, fake_run)
    assert cli.main(["report", str(runs), "-o", str(tmp_path / "rep"), "--target", "0.5"]) == 0
    page = (tmp_path / "rep" / "report.html").read_text()
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "http" not in page.replace("http-equiv", "") and page.count("data:image/png;base64,") == 3
    assert md.index("| 1 | gentle |") < md.index("| 2 | harsh |")
    assert "Most-forgotten items" in md and "Question i" in md
    analysis = report.analyse([runs], target=0.5)
    harsh = analysis.finals.set_index(["run", "task"]).loc[("harsh", "facts")]
    assert harsh["drop"] > 0 and harsh["p_mcnemar"] < 0.05 and harsh["p_adj"] < 0.05
    assert "| harsh | facts (general) | acc ↑ |" in md and "p (Holm across general probes; a new task's own)" in md
    assert cli.main(["report", str(tmp_path / "missing"), "-o", str(tmp_path / "rep2")]) == 2
    assert not (tmp_path / "rep2").exists()  # nothing half-written


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make browser)")
def test_report_renders_in_headless_chromium_without_console_errors(tmp_path, fake_run):
    sync_api = pytest.importorskip("playwright.sync_api")
    html, _ = report.write([_two_runs(tmp_path, fake_run)], tmp_path / "rep", target=0.5)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors, requests = [], []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
        page.goto(html.as_uri())
        widths = page.evaluate("Array.from(document.images).map(i => i.naturalWidth)")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert errors == [] and requests == []
    assert len(widths) == 3 and all(w > 300 for w in widths)  # every figure decoded
    assert (tmp_path / "report.png").stat().st_size > 20_000


def test_notebook_runs_on_a_finished_run(tmp_path, fake_run):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(ROOT / "examples" / "forgetting_curves.ipynb", as_version=4)
    env = {"FORGETSCOPE_RUNS": str(_two_runs(tmp_path, fake_run))}
    os.environ.update(env)
    try:
        nbclient.NotebookClient(
            notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        os.environ.pop("FORGETSCOPE_RUNS")
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # the curves and the frontier were drawn


def test_report_adjusts_across_probes_and_flags_chance(tmp_path, fake_run, fake_probe):
    rng = np.random.default_rng(2)
    base = {f"i{k}": float(v) for k, v in enumerate(rng.random(300) < 0.8)}
    layout = fake_run(
        tmp_path / "runs" / "r", {0: base, 10: {k: float(v and rng.random() > 0.03) for k, v in base.items()}}
    )
    guess = {f"m{k}": float(k < 25) for k in range(100)}
    fake_probe(layout, "mc", {0: guess, 10: {k: float(int(k[1:]) < 20) for k in guess}}, choices=4)
    finals = {m: report.analyse([tmp_path / "runs"], correction=m).finals.set_index("task") for m in ("none", "holm")}
    low, high = sorted(finals["none"].loc[["facts", "mc"], "p"])
    holm = [min(1.0, 2 * low), max(min(1.0, 2 * low), high)]  # two tests: 2 p_(1), then at least p_(2)
    assert sorted(finals["holm"].loc[["facts", "mc"], "p_adj"]) == pytest.approx(holm)
    mc = finals["holm"].loc["mc"]
    assert mc["at_chance"] and mc["chance"] == pytest.approx(0.25) and mc["forgotten"] == 5
    assert mc["forgotten_adj"] == pytest.approx(max(0.0, 5 - 100 * 0.75 * 0.8 / 3))  # 20 flips each way by chance alone
    report.write([tmp_path / "runs"], tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "base at chance" in md and "Left out of general forgetting" in md and "r: mc" in md


def test_a_probe_at_chance_shows_no_share_of_skill_lost(tmp_path, fake_run, fake_probe):
    """30 of 100 right on 4 choices is not clearly above guessing (0.25): "above-chance skill lost
    -50%" was printed for such a probe, a ratio of noise."""
    layout = fake_run(tmp_path / "runs" / "r", {0: {"i0": 1.0}, 10: {"i0": 1.0}})
    guess = {f"m{k}": float(k < 30) for k in range(100)}
    fake_probe(layout, "mc", {0: guess, 10: {k: float(int(k[1:]) < 25) for k in guess}}, choices=4)
    analysis = report.analyse([tmp_path / "runs"])
    mc = analysis.finals.set_index("task").loc["mc"]
    assert mc["at_chance"] and mc["adj_drop"] == pytest.approx(1.0)  # 0.05 of 0.05 above chance
    [row] = [line for line in report.render_markdown(analysis, "t", None).splitlines() if "| mc (general) |" in line]
    assert row.split(" | ")[6] == "–"
    notes = report._left_out_by_probe(analysis)  # its forgetting curve says it is left out, and why
    assert notes == {"mc": "left out of general forgetting: at chance"}
    titles = [ax.get_title() for ax in forgetscope.plot_forgetting(analysis.drops, notes=notes).axes]
    assert "mc: drop in acc\n(left out of general forgetting: at chance)" in titles


def test_percentages_are_signed_and_never_negative_zero():
    assert [report._pct(v) for v in (-0.0004, 0.0004, -0.0123, None)] == ["+0.0%", "+0.0%", "-1.2%", "–"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--weight", "facts=-1"], "a probe's weight is a number, 0 or more"),
        (["--weight", "facts=nan"], "a probe's weight is a number, 0 or more"),
        (["--weight", "fcts=2"], "a weight for 'fcts' names no general probe of these runs; theirs: "),
        (["--target", "nan"], "argument --target: expected a finite number"),
        (["--target", "90"], "--target 90: outside the range of acc (0 to 1); scores are fractions"),
    ],
)
def test_report_flags_out_of_range_exit_2(tmp_path, fake_run, capsys, flags, message):
    root = fake_run(tmp_path / "r", {0: {"i0": 1.0, "i1": 0.0}, 5: {"i0": 1.0, "i1": 1.0}}).root
    try:
        code = cli.main(["report", str(root), "-o", str(tmp_path / "out"), *flags])
    except SystemExit as exit:  # argparse's own refusal of a flag's value
        code = exit.code
    assert code == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_runs_without_evaluations_are_left_out_and_unfinished_ones_named(tmp_path, fake_run, capsys):
    """A run that failed before its first evaluation used to crash the report of every run beside it."""
    fake_run(tmp_path / "runs" / "done", {0: {"i0": 1.0, "i1": 1.0}, 5: {"i0": 1.0, "i1": 0.0}})
    stopped = fake_run(tmp_path / "runs" / "stopped", {0: {"i0": 1.0, "i1": 1.0}, 5: {"i0": 0.0, "i1": 0.0}}).root
    (stopped / "manifest.json").write_text(json.dumps({"status": "failed", "method": "full"}))
    empty = tmp_path / "runs" / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps({"status": "failed", "method": "full"}))
    assert (
        cli.main(["report", str(tmp_path / "runs"), str(tmp_path / "runs" / "done"), "-o", str(tmp_path / "rep")]) == 0
    )
    err = capsys.readouterr().err
    assert f"{empty} is failed with no evaluation yet; left out" in err
    assert f"{stopped} is failed, not finished; its curves stop at step 5" in err
    assert "| done " in (tmp_path / "rep" / "report.md").read_text()  # named twice, reported once
    assert cli.main(["report", str(empty), "-o", str(tmp_path / "rep2")]) == 2
    assert "no run with an evaluation yet" in capsys.readouterr().err and not (tmp_path / "rep2").exists()


def test_report_and_runs_dir_inside_a_run_folder_are_refused(tmp_path, fake_run, tiny_recipe_data, capsys):
    import yaml

    root = fake_run(tmp_path / "runs" / "a", {0: {"i0": 1.0}, 5: {"i0": 0.0}}).root
    for out in (root, root / "evals"):
        assert cli.main(["report", str(root), "-o", str(out)]) == 2
        assert (
            "whose files it would overwrite or mix with; choose a folder outside every run" in capsys.readouterr().err
        )
    assert not (root / "report.md").exists() and not (root / "evals" / "report.md").exists()
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**tiny_recipe_data, "runs_dir": str(root)}))
    assert cli.main(["run", str(tmp_path / "r.yaml")]) == 2  # its runs would hide inside run `a`
    assert f"runs_dir {root}: is a run folder" in capsys.readouterr().err and not (root / "t").exists()


def test_a_report_where_nothing_was_forgotten_says_so(tmp_path, fake_run):
    root = fake_run(tmp_path / "kept", {0: {"i0": 1.0, "i1": 0.0}, 5: {"i0": 1.0, "i1": 1.0}}).root
    report.write([root], tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"## Most-forgotten items\n\n{report.NO_ITEMS}" in md and "| probe | item |" not in md


def test_a_run_is_named_by_its_folder_everywhere(tmp_path, fake_run, capsys):
    """Renaming a folder renames the run: load_results, load_items and the report agree, and two
    runs made by one recipe no longer clash once one folder is renamed."""
    runs = _two_runs(tmp_path, fake_run)
    for name in ("gentle", "harsh"):  # as a finished run writes them: the recipe's name in curves.csv
        forgetscope.load_results([runs / name]).drop(columns="chance").assign(recipe="same", run="same").to_csv(
            runs / name / "curves.csv", index=False
        )
    table = forgetscope.load_results([runs])
    assert sorted(table["run"].unique()) == ["gentle", "harsh"] and set(table["recipe"]) == {"same"}
    assert set(forgetscope.load_items([runs])["run"]) == {"gentle", "harsh"}
    assert cli.main(["report", str(runs), "-o", str(tmp_path / "rep")]) == 0
    shutil.copytree(runs / "harsh", tmp_path / "elsewhere" / "harsh")
    for load in (forgetscope.load_results, forgetscope.load_items):
        with pytest.raises(
            results.ResultsError,
            match=r"two runs are both named 'harsh' .*; a run is named by its folder: rename one of the folders",
        ):
            load([runs, tmp_path / "elsewhere" / "harsh"])
    (tmp_path / "elsewhere" / "harsh").rename(tmp_path / "elsewhere" / "harsh2")
    assert set(forgetscope.load_results([runs, tmp_path / "elsewhere"])["run"]) == {"gentle", "harsh", "harsh2"}


def test_load_items_reads_a_run_named_twice_once(tmp_path, fake_run):
    runs = _two_runs(tmp_path, fake_run)
    once = forgetscope.load_items([runs / "harsh"])
    assert len(forgetscope.load_items([runs, runs / "harsh"])) == 2 * len(once)


def _without_new_task(layout) -> None:
    """A fake run turned into an audit scored without --new: no new-task eval at any step."""
    for step in layout.eval_steps():
        folder = layout.eval_dir(step)
        (folder / "samples_new.jsonl").unlink()
        result = json.loads((folder / "results.json").read_text())
        del result["tasks"]["new"]
        (folder / "results.json").write_text(json.dumps(result))


def test_a_run_without_new_task_shows_none_and_gets_no_learning_tick(tmp_path, fake_run):
    runs = _two_runs(tmp_path, fake_run)
    _without_new_task(RunLayout(runs / "harsh"))
    report.write([runs / "harsh"], tmp_path / "alone")
    md = (tmp_path / "alone" / "report.md").read_text()
    assert "| harsh | full | 10 | no new task |" in md and "None" not in md
    assert not (tmp_path / "alone" / "learning.png").exists()
    report.write([runs], tmp_path / "mixed", target=0.5)
    md = (tmp_path / "mixed" / "report.md").read_text()
    harsh = next(line for line in md.splitlines() if "| harsh |" in line)
    assert "| no new task |" in harsh and "nan" not in harsh and not harsh.endswith("✓ |")
    assert "not reached" not in harsh  # with a target: nothing to reach
    assert next(line for line in md.splitlines() if "| gentle |" in line).endswith("✓ |")


def test_the_learning_figure_shows_each_runs_summary_task(tmp_path, fake_run, fake_probe):
    """A sequence scores every stage's task; the report's learning figure shows the task each run is
    summarised on, one line per run, and names it."""
    runs = _two_runs(tmp_path, fake_run)
    seq = RunLayout(runs / "gentle")
    fake_probe(seq, "second", {s: {"n0": float(s == 10)} for s in (0, 5, 10)}, role="new")
    seq.update_manifest(stages=[{"evals": ["new"]}, {"evals": ["second"]}])
    analysis = report.analyse([runs])
    assert analysis.summary.set_index("run")["new_task"].to_dict() == {"gentle": "second", "harsh": "new"}
    fig = report.learning_figure(analysis, None)
    assert sorted(line.get_label() for line in fig.axes[0].get_lines()) == ["gentle: second", "harsh: new"]
    assert fig.axes[0].get_title() == "New tasks: second, new"


def test_the_method_note_says_which_options_made_the_report(tmp_path, fake_run):
    runs = _two_runs(tmp_path, fake_run)
    report.write([runs], tmp_path / "plain")
    plain = (tmp_path / "plain" / "report.md").read_text()
    assert "probes at chance left out" in plain and "Holm" in plain and "equal weights" in plain
    flags = ["--keep-at-chance", "--weight", "facts=2", "--correction", "bh"]
    assert cli.main(["report", str(runs), "-o", str(tmp_path / "opts"), *flags]) == 0
    note = (tmp_path / "opts" / "report.md").read_text()
    assert "probes at chance kept" in note and "Benjamini-Hochberg" in note and "weights facts=2" in note
    assert "Holm" not in note and "left out" not in note
    none = report.analyse([runs], correction="none")
    assert "unadjusted" in report.method_note(none)


def test_the_python_api_takes_one_path_and_refuses_an_unknown_correction(tmp_path, fake_run):
    runs = _two_runs(tmp_path, fake_run)
    assert set(forgetscope.load_results(str(runs / "harsh"))["run"]) == {"harsh"}
    assert set(forgetscope.load_results(runs)["run"]) == {"gentle", "harsh"}
    with pytest.raises(forgetscope.UserError, match="correction 'bonferroni': use one of holm, bh, none"):
        report.analyse(runs, correction="bonferroni")
    with pytest.raises(ValueError, match="unknown correction 'BH'"):
        stats.adjust([0.01, 0.02], "BH")


def test_unfinished_runs_are_marked_in_the_summary(tmp_path, fake_run):
    runs = _two_runs(tmp_path, fake_run)
    manifest = runs / "harsh" / "manifest.json"
    manifest.write_text(json.dumps({"status": "failed", "method": "full", "snapshot_steps": [0, 5, 10, 15, 20]}))
    (runs / "gentle" / "manifest.json").write_text(json.dumps({"status": "running", "method": "full"}))
    report.write([runs], tmp_path / "rep")
    for page in ("report.md", "report.html"):
        text = (tmp_path / "rep" / page).read_text()
        assert "failed at step 10 of 20" in text and "running at step 10" in text
    # "running" with its folder's lock free: killed without a word (SIGKILL); held: still being written
    lock = runs / "gentle" / session.FOLDER_LOCK
    lock.write_text("")
    assert report.analyse(runs).summary.set_index("run")["status"].to_dict() == {
        "gentle": "interrupted",
        "harsh": "failed",
    }
    with io.exclusive(lock, "gentle"):
        assert report.analyse(runs).summary.set_index("run").loc["gentle", "status"] == "running"
    (runs / "gentle" / "manifest.json").write_text(json.dumps({"status": "finished", "method": "full"}))
    ranked = report.analyse(runs).summary  # harsh forgets more than gentle, yet a failed run ranks after
    assert list(ranked["run"]) == ["gentle", "harsh"]
    manifest.write_text(json.dumps({"status": "finished", "method": "full", "snapshot_steps": [0, 5, 10]}))
    (runs / "gentle" / "manifest.json").write_text(json.dumps({"status": "running", "method": "full"}))
    assert list(report.analyse(runs).summary["run"]) == ["harsh", "gentle"]  # ranked after, whatever it forgot
    manifest.write_text(json.dumps({"status": "finished", "method": "full", "snapshot_steps": [0, 5, 10]}))
    (runs / "gentle" / "manifest.json").write_text(json.dumps({"status": "finished", "method": "full"}))
    report.write([runs], tmp_path / "rep")
    assert "failed" not in (tmp_path / "rep" / "report.md").read_text()


def test_a_report_written_again_removes_only_its_own_stale_figures(tmp_path, fake_run):
    runs = _two_runs(tmp_path, fake_run)
    seq = runs / "gentle"
    stages = [
        {"task": "facts", "evals": ["facts"], "start": 0, "end": 5},
        {"task": "n", "evals": ["new"], "start": 5, "end": 10},
    ]
    RunLayout(seq).update_manifest(stages=stages, sequence={k: 0.0 for k in report.SEQUENCE_KEYS})
    (seq / "sequence.png").write_bytes(b"\x89PNG made by the run")
    out = tmp_path / "rep"
    report.write([runs], out)
    assert (out / "sequence-gentle.png").is_file() and (out / "learning.png").is_file()
    mine = ["notes.png", "sequence-mine.png", "plan.md"]
    for name in mine:
        (out / name).write_text("the user's")
    _without_new_task(RunLayout(runs / "harsh"))
    report.write([runs / "harsh"], out)
    written = {"report.html", "report.md", "forgetting.png"}
    assert {p.name for p in out.iterdir()} == written | set(mine)


def test_a_change_without_a_ci_reads_no_ci_and_perplexity_items_fall_the_right_way(tmp_path, probe_run):
    """A probe whose aggregation lm-eval's items cannot reproduce (a task's own median) has a delta
    and no CI: the report says "no CI" with the reason, never nan; a probe scored in perplexity
    (items: log-likelihoods) lists the items whose likelihood fell as forgotten (positive change)."""
    steps = {0: {f"i{k}": float(k * k) for k in range(9)}, 1: {f"i{k}": float(k * k) * 2 for k in range(9)}}
    probe_run(
        tmp_path / "median", steps, lambda items: float(np.median(list(items.values()))), "ll_score", higher=False
    )
    analysis = report.analyse([tmp_path / "median"])
    text = report.render_markdown(analysis, "t", None)
    assert "no CI:" in text and "[+nan" not in text
    assert analysis.finals["p_adj"].isna().all()  # untested: out of the adjusted family, shown as "–"
    lls = {0: {"a": -1.0, "b": -2.0, "c": -1.5}, 1: {"a": -3.0, "b": -2.0, "c": -1.4}}  # a falls, c rises a little
    probe_run(tmp_path / "ppl", lls, lambda items: math.exp(-np.mean(list(items.values()))), "perplexity", higher=False)
    items = report.analyse([tmp_path / "ppl"]).items.set_index("item_id")
    assert items.loc["a", "change"] == pytest.approx(2.0)  # its log-likelihood fell by 2: worse
    assert "c" not in items.index  # it got better: not forgotten
    better = {0: {"a": -1.0, "b": -2.0, "c": -1.5}, 1: {"a": -0.5, "b": -2.5, "c": -1.5}}  # a rises here
    probe_run(
        tmp_path / "ppl2", better, lambda items: math.exp(-np.mean(list(items.values()))), "perplexity", higher=False
    )
    both = report.analyse([tmp_path / "ppl", tmp_path / "ppl2"]).items.set_index("item_id")
    assert both.loc["a", "runs"] == "ppl" and both.loc["a", "change"] == pytest.approx(2.0)  # ppl2 did not forget it
    assert both.loc["b", "runs"] == "ppl2"
    assert metrics.pareto_front([1.0, math.nan], [0.1, 0.0]).tolist() == [True, False]  # no gain: not placed


def test_load_items_leaves_out_items_that_are_not_scores(tmp_path, probe_run):
    """mcc's items are (gold, prediction): no per-item score, so no rows (they read as value and weight)."""
    pairs = {0: {"a": [1, 1], "b": [0, 1]}, 1: {"a": [1, 0], "b": [0, 0]}}
    probe_run(tmp_path / "mcc", pairs, lambda items: 0.0, "mcc")
    assert results.load_items([tmp_path / "mcc"]).empty
    probe_run(tmp_path / "acc", {0: {"a": 1.0}, 1: {"a": 0.0}}, lambda items: 0.0)
    assert results.load_items([tmp_path / "acc"])["value"].tolist() == [1.0, 0.0]
    # numpy scores a task's own process_results returned, stored as text: still scores
    probe_run(tmp_path / "text", {0: {"a": "1", "b": "True"}, 1: {"a": "0", "b": "1"}}, lambda items: 0.0)
    assert results.load_items([tmp_path / "text"])["value"].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert stats.flips(RunLayout(tmp_path / "text"), "probe", "acc", 1)["forgotten"] == ["a"]
