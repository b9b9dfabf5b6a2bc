"""The statistics behind verdicts (docs/METRICS.md), against hand-computed values and scipy's closed forms:
chance levels and chance-adjusted flips, the above-chance test, bootstrap p-values, Holm and
Benjamini-Hochberg, non-inferiority bounds, power and the items an inconclusive test needs."""

import json
import math
from statistics import NormalDist

import numpy as np
import pytest
from lm_eval.api import metrics as lm_metrics
from lm_eval.api import registry as lm_registry

from forgetscope import curves, stats
from forgetscope.snapshots import RunLayout

scipy_stats = pytest.importorskip("scipy.stats")


def test_binomial_tail_is_exact():
    assert stats.binom_sf(3, 5, 0.5) == pytest.approx((10 + 5 + 1) / 32)
    by_hand = 45 * 0.25**8 * 0.75**2 + 10 * 0.25**9 * 0.75 + 0.25**10  # P[X >= 8], X ~ Bin(10, 1/4)
    assert stats.binom_sf(8, 10, 0.25) == pytest.approx(by_hand, rel=1e-12)
    assert stats.binom_sf(0, 10, 0.3) == 1.0 and stats.binom_sf(11, 10, 0.3) == 0.0
    for k, n, p in [(22, 100, 0.25), (700, 2000, 0.33), (5, 40, 0.02)]:
        assert stats.binom_sf(k, n, p) == pytest.approx(scipy_stats.binom.sf(k - 1, n, p), rel=1e-9)


def test_a_base_score_against_chance():
    # mmlu_shipped in the demo: 22 of 100 right with 4 choices is what guessing gives
    assert stats.above_chance_p(0.22, 100, 0.25) == pytest.approx(scipy_stats.binom.sf(21, 100, 0.25))
    assert stats.above_chance_p(0.22, 100, 0.25) > 0.7
    assert stats.above_chance_p(0.81, 100, 0.25) < 1e-25  # world_capitals
    assert stats.above_chance_p(0.0, 50, 0.0) == 1.0  # nothing right and nothing to guess: no evidence of skill
    assert stats.above_chance_p(0.1, 50, 0.0) == 0.0


def test_chance_level_comes_from_the_number_of_choices(tmp_path, fake_run, fake_probe):
    layout = fake_run(tmp_path / "r", {0: {"i0": 1.0, "i1": 0.0}})
    fake_probe(layout, "four", {0: {"a": 1.0, "b": 0.0}}, choices=4)
    fake_probe(layout, "two", {0: {"a": 1.0}}, choices=2)
    assert stats.chance_level(layout, "four", "acc") == pytest.approx(0.25)
    assert stats.chance_level(layout, "two", "acc") == pytest.approx(0.5)
    assert stats.chance_level(layout, "facts", "acc") == 0.0  # one answer per item: guessing gets nothing
    (layout.eval_dir(0) / "samples_mixed.jsonl").write_text(
        "".join(  # items with 4, 4, 2 and 1 choices
            json.dumps({"item_id": i, "acc": 1, "arguments": [["Q", f" {c}"] for c in range(k)]}) + "\n"
            for i, k in enumerate([4, 4, 2, 1])
        )
    )
    assert stats.chance_level(layout, "mixed", "acc") == pytest.approx((0.25 + 0.25 + 0.5 + 0.0) / 4)
    prose = fake_run(tmp_path / "p", {0: {"a": [-10.0, 20.0]}}, task="prose", metric="bits_per_byte")
    assert stats.chance_level(prose, "prose", "bits_per_byte") is None  # not a 0/1 metric


def test_a_paired_delta_of_bits_per_byte_is_taken_on_the_corpus_value(tmp_path, fake_run):
    # items are [log-likelihood, bytes]; bits/byte = -sum(ll) / sum(bytes) / ln 2, not a mean of per-item ratios
    layout = fake_run(
        tmp_path / "r",
        {0: {"a": [-9.0, 10], "b": [-9.0, 10]}, 5: {"a": [-10.0, 10], "b": [-11.0, 30]}},
        task="prose",
        metric="bits_per_byte",
    )
    ci = stats.paired_delta(layout, "prose", "bits_per_byte", 5)
    assert ci["delta"] == pytest.approx(21 / 40 / math.log(2) - 18 / 20 / math.log(2))
    assert ci["n"] == 2


def test_chance_adjusted_flips_follow_harmon_et_al():
    # 100 items, accuracy 0.4 -> 0.3, 4 choices: guessed shares 0.8 and 0.933; flips by chance 0.8 * 0.933 * 1/4 * 3/4 * 100
    assert stats.chance_flips(100, 0.4, 0.3, 0.25) == pytest.approx(100 * 0.6 * 0.7 / 3)
    g0, g1 = 0.6 / 0.75, 0.7 / 0.75
    assert stats.chance_flips(100, 0.4, 0.3, 0.25) == pytest.approx(100 * g0 * g1 * 0.25 * 0.75)
    assert stats.chance_flips(100, 0.4, 0.3, 0.0) == 0.0  # no choices: no flips by luck


def test_flips_report_chance_adjusted_counts(tmp_path, fake_run, fake_probe):
    base = {f"i{k}": float(k < 4) for k in range(10)}  # 4 right
    later = {f"i{k}": float(k in (0, 5, 6)) for k in range(10)}  # 3 forgotten (i1-i3), 2 learned (i5, i6)
    layout = fake_run(tmp_path / "r", {0: base, 5: base})
    fake_probe(layout, "mc", {0: base, 5: later}, choices=4)
    flip = stats.flips(layout, "mc", "acc", 5)
    expected = 10 * 0.6 * 0.7 * 0.25 / 0.75  # = 1.4 flips each way by chance alone
    assert flip["by_chance"] == pytest.approx(expected)
    assert flip["forgotten_adj"] == pytest.approx(3 - expected) and flip["learned_adj"] == pytest.approx(2 - expected)


def test_holm_and_benjamini_hochberg_by_hand():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005=0.02, max(0.02, 3*0.01)=0.03, 2*0.03=0.06, max(0.06, 0.04)=0.06
    assert stats.adjust(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: m p / rank = 0.02, 0.02, 0.04, 0.04, then running minima from the top
    assert stats.adjust(p, "bh") == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert stats.adjust(p, "bh") == pytest.approx(list(scipy_stats.false_discovery_control(p, method="bh")))
    assert stats.adjust(p, "none") == p
    assert stats.adjust([0.6, 0.9], "holm") == [1.0, 1.0]
    assert stats.adjust([0.01, None, math.nan], "holm") == [0.03, 1.0, 1.0]  # no CI: no evidence


def test_the_bound_level_matches_each_procedure():
    assert stats.adjusted_alpha(0.05, 4, 2, "holm") == pytest.approx(0.025)  # alpha / (m - R)
    assert stats.adjusted_alpha(0.05, 4, 4, "holm") == pytest.approx(0.05)
    assert stats.adjusted_alpha(0.05, 4, 0, "bh") == pytest.approx(0.0125)  # alpha * max(R, 1) / m
    assert stats.adjusted_alpha(0.05, 4, 3, "bh") == pytest.approx(0.0375)
    assert stats.adjusted_alpha(0.05, 4, 1, "none") == 0.05
    # a raw p-value is within that level exactly when the procedure rejects its test
    rng = np.random.default_rng(0)
    for method in ("holm", "bh"):
        for _ in range(500):
            p = list(rng.uniform(0, 0.08, size=5))
            rejected = [a <= 0.05 for a in stats.adjust(p, method)]
            level = stats.adjusted_alpha(0.05, 5, sum(rejected), method)
            assert [q <= level for q in p] == rejected


def test_bootstrap_p_values_by_hand():
    boot = np.array([0.0, 0.01, 0.02, 0.03, 0.06])
    assert stats.p_noninferior(boot, 0.03) == pytest.approx((1 + 2) / 6)  # two replicates at or above the margin
    assert stats.p_noninferior(boot, 0.10) == pytest.approx(1 / 6)
    assert stats.p_two_sided(np.array([-1.0, 1.0, 2.0, 3.0])) == pytest.approx(2 * (1 + 1) / 5)
    assert stats.p_two_sided(np.zeros(10)) == 1.0


def test_power_and_items_to_decide_by_hand():
    z = NormalDist().inv_cdf(0.95) + NormalDist().inv_cdf(0.8)  # 1.6449 + 0.8416
    assert stats.detectable(0.04, 0.05, 0.8) == pytest.approx(z * 0.04) == pytest.approx(0.09946, abs=1e-5)
    # drop 0.02, margin 0.05, se 0.04 on 100 items: n' = 100 * (0.09946 / 0.03)^2 = 1099.2 -> 1100
    assert stats.items_to_decide(0.02, 0.04, 100, 0.05, 0.05, 0.8) == math.ceil(100 * (z * 0.04 / 0.03) ** 2) == 1100
    assert stats.items_to_decide(0.06, 0.04, 100, 0.05, 0.05, 0.8) is None  # beyond the margin: more items won't help
    # at n' items the test passes with the asked power, under the normal approximation
    n_new = stats.items_to_decide(0.02, 0.04, 100, 0.05, 0.05, 0.8)
    se_new = 0.04 * math.sqrt(100 / n_new)
    power = 1 - NormalDist().cdf(NormalDist().inv_cdf(0.95) - (0.05 - 0.02) / se_new)
    assert power == pytest.approx(0.8, abs=0.002)


def test_bootstrap_tests_match_the_normal_closed_form(tmp_path, fake_run):
    rng = np.random.default_rng(3)
    n = 600
    base = rng.random(n) < 0.7
    later = np.where(rng.random(n) < 0.1, False, base)  # ~7% of items forgotten, none learned
    layout = fake_run(
        tmp_path / "r",
        {0: {f"i{k}": float(v) for k, v in enumerate(base)}, 10: {f"i{k}": float(v) for k, v in enumerate(later)}},
    )
    paired = stats.paired_bootstrap(layout, "facts", "acc", 10, iters=8000)
    delta, boot, items = paired.delta, paired.boot, paired.n
    d = base.astype(float) - later.astype(float)  # the drop per item
    se = d.std(ddof=0) / math.sqrt(n)
    assert items == n and -delta == pytest.approx(d.mean()) and (-boot).std() == pytest.approx(se, rel=0.05)
    margin = d.mean() + 1.2 * se
    assert stats.p_noninferior(-boot, margin) == pytest.approx(1 - NormalDist().cdf(1.2), abs=0.02)
    assert stats.p_two_sided(boot) == pytest.approx(2 * (1 - NormalDist().cdf(d.mean() / se)), abs=0.002)
    ci = stats.paired_delta(layout, "facts", "acc", 10)
    assert ci["se"] == pytest.approx(se, rel=0.08) and ci["p"] < 0.001


def over(fn, revive=False):
    """``fn`` (an lm-eval aggregation) over a step's items; ``revive``: as lm-eval computed them
    (numbers, not the strings forgetscope stored)."""
    return lambda items: fn([stats.revived(v) if revive else v for v in items.values()])


def test_a_perplexity_metric_is_lm_evals_exp_of_minus_the_mean_loglikelihood(tmp_path, probe_run):
    # lm-eval's `perplexity` (loglikelihood tasks): items are log-likelihoods, exp(-mean) is the corpus value
    rng = np.random.default_rng(0)
    base = {f"i{k}": float(v) for k, v in enumerate(rng.normal(-4.2, 0.5, 40))}  # perplexity ~ 65
    collapsed = {k: v * 7 for k, v in base.items()}  # perplexity ~ 1e13: the model collapsed
    layout = probe_run(tmp_path / "r", {0: base, 1: collapsed}, over(lm_metrics.perplexity), "perplexity", higher=False)
    ci = stats.paired_delta(layout, "probe", "perplexity", 1, iters=500)
    expected = lm_metrics.perplexity(list(collapsed.values())) - lm_metrics.perplexity(list(base.values()))
    assert ci["delta"] == pytest.approx(expected, rel=1e-9) and ci["delta"] > 1e12
    assert 0 < ci["low"] <= ci["delta"] <= ci["high"]  # worse beyond noise: perplexity went up
    better = probe_run(tmp_path / "b", {0: collapsed, 1: base}, over(lm_metrics.perplexity), "perplexity", higher=False)
    ci = stats.paired_delta(better, "probe", "perplexity", 1, iters=500)
    assert ci["delta"] == pytest.approx(-expected, rel=1e-9) and ci["high"] < 0


def test_the_bootstrap_uses_lm_evals_own_aggregations(tmp_path, probe_run):
    # every numeric aggregation lm-eval registers for a metric gives lm-eval's value on the items
    rng = np.random.default_rng(1)
    lls = [float(v) for v in rng.normal(-3, 1, 25)]
    pairs = [[ll * 4, int(w)] for ll, w in zip(lls, rng.integers(2, 9, 25))]
    accs = [float(v) for v in rng.random(25) < 0.5]
    for metric, items in [
        ("perplexity", lls),
        ("word_perplexity", pairs),
        ("byte_perplexity", pairs),
        ("bits_per_byte", pairs),
        ("acc", accs),
    ]:
        fn = lm_registry.METRIC_AGGREGATION_REGISTRY.get(metric)
        agg = stats.find_aggregation(metric, [str(i) for i in range(25)], [(items, fn(items))])
        assert float(agg.value(agg.prepare(items))) == pytest.approx(fn(items), rel=1e-12)


def _mc_items(rng, n, skill):
    """Per-item (gold, prediction) pairs and (gold, probabilities) pairs as forgetscope stores lm-eval's
    multiple-choice items: numpy values written with str()."""
    gold = rng.integers(0, 4, n)
    pred = np.where(rng.random(n) < skill, gold, rng.integers(0, 4, n))
    probs = rng.dirichlet(np.ones(4), n) * (1 - skill)
    probs[np.arange(n), gold] += skill
    mcc = {f"q{k}": [int(g), str(np.int64(p))] for k, (g, p) in enumerate(zip(gold, pred))}
    brier = {f"q{k}": [int(g), str(p)] for k, (g, p) in enumerate(zip(gold, probs))}
    return mcc, brier


def test_corpus_metrics_get_lm_evals_delta_and_a_bootstrap_of_its_own_aggregation(tmp_path, probe_run):
    rng = np.random.default_rng(2)
    (mcc0, brier0), (mcc1, brier1) = _mc_items(rng, 60, 0.0), _mc_items(rng, 60, 0.6)
    for metric, steps, fn, higher in [
        ("mcc", {0: mcc0, 1: mcc1}, lm_metrics.matthews_corrcoef, True),
        ("brier_score", {0: brier0, 1: brier1}, lm_metrics.brier_score, False),
    ]:
        layout = probe_run(tmp_path / metric, steps, over(fn, revive=True), metric, higher=higher)
        ci = stats.paired_delta(layout, "probe", metric, 1, iters=200)
        values = [over(fn, revive=True)(steps[s]) for s in (0, 1)]
        assert ci["delta"] == pytest.approx(values[1] - values[0], rel=1e-9), metric
        assert math.isfinite(ci["low"]) and ci["low"] <= ci["delta"] <= ci["high"], metric
        assert stats.item_values(layout, 1, "probe", metric) == {}  # no per-item score to list


def test_without_a_reproducible_aggregation_the_delta_has_no_ci_and_says_why(tmp_path, probe_run):
    # a task's own aggregation (lm-eval's `median` here, under a custom metric name): the delta is lm-eval's,
    # the bootstrap cannot be drawn, and the summary says so instead of printing inf or nan
    steps = {0: {f"i{k}": float(k * k) for k in range(9)}, 1: {f"i{k}": float(k * k) * 2 for k in range(9)}}
    layout = probe_run(tmp_path / "r", steps, over(lm_metrics.median), "ll_score")
    ci = stats.paired_delta(layout, "probe", "ll_score", 1)
    assert ci["delta"] == 16.0 and ci["low"] is None and ci["high"] is None and ci["p"] is None
    assert "reproduce" in ci["why"]
    rows = stats.final_vs_base(layout, curves.build_table(layout, "r", "r", "full"))
    assert rows[0]["delta"] == 16.0 and not rows[0]["worse"]
    text = stats.format_summary(rows)
    assert "no CI" in text and "nan" not in text and "inf" not in text


def test_the_run_summary_keeps_its_columns_under_long_metric_names():
    row = {"role": "general", "higher_is_better": True, "base": 0.2, "final": 0.1, "delta": -0.1, "low": -0.2}
    rows = [
        {**row, "task": "gsm8k", "metric": "exact_match,strict-match", "high": -0.01, "p_adj": 0.02, "worse": True},
        {**row, "task": "arc_easy", "metric": "acc", "high": 0.0, "p_adj": 0.06, "worse": False},
    ]
    head, *lines, _ = stats.format_summary(rows).splitlines()
    ends = {line.index(" [") for line in lines}  # where each CI opens
    assert len(ends) == 1 and head.index("final") + len("final") < ends.pop()


def group_value(weight_by_size: bool):
    """lm-eval's value of a group whose items forgetscope stores as ``subtask/id``: each subtask's
    mean, combined equally or by size."""

    def value_of(items: dict) -> float:
        subtasks: dict[str, list] = {}
        for item, value in items.items():
            subtasks.setdefault(item.split("/")[0], []).append(value)
        sizes = [len(v) if weight_by_size else 1 for v in subtasks.values()]
        return float(np.dot([np.mean(v) for v in subtasks.values()], sizes) / sum(sizes))

    return value_of


@pytest.mark.parametrize("weight_by_size,expected", [(False, -0.5), (True, -0.2)])
def test_a_group_is_aggregated_per_subtask_then_weighted_as_lm_eval_weights(
    tmp_path, probe_run, tango, weight_by_size, expected
):
    # 10 items of `small` all forgotten, 40 of `large` kept: equal weights lose half, weights by size a fifth
    large = {f"large/{k}": float(k % 2) for k in range(40)}
    base = {**{f"small/{k}": 1.0 for k in range(10)}, **large}
    final = {**{f"small/{k}": 0.0 for k in range(10)}, **large}
    layout = probe_run(tmp_path / "r", {0: base, 1: final}, group_value(weight_by_size), subtasks=["small", "large"])
    ci = stats.paired_delta(layout, "probe", "acc", 1, iters=300)
    assert ci["delta"] == pytest.approx(expected)
    if not weight_by_size:
        # subtasks weighing equally: the subtasks' score intervals combined (MOVER); a bootstrap within each
        # subtask had zero width here (every resample of `small` loses all of it, `large` never changes)
        score = tango.stratified([(10, 0, 10), (0, 0, 40)], [1, 1])
        assert (ci["low"], ci["high"]) == pytest.approx(score.interval(), abs=1e-7)
        assert ci["low"] < expected - 0.04 and ci["high"] > expected + 0.2  # `small` cannot lose more than all
        assert ci["p"] == pytest.approx(2 * NormalDist().cdf(-abs(score.z(0.0))), rel=1e-6)
    else:  # weighted by size, the group is one pool of 0/1 items: the score interval of 10 lost of 50
        assert (ci["low"], ci["high"]) == pytest.approx(tango(10, 0, 50).interval(), abs=1e-7)
        assert ci["low"] < expected < ci["high"]
        plain = probe_run(tmp_path / "plain", {0: base, 1: final}, group_value(True))  # a task whose ids hold "/"
        assert stats.paired_delta(plain, "probe", "acc", 1, iters=300) == ci


def test_the_run_summary_and_the_report_call_the_same_probes_worse(tmp_path, probe_run):
    # four general probes of 100 items; `slip` loses 7 items and gains 1: a single test calls that real
    # (p < 0.05), Holm across the four does not, so neither the summary nor the report says "worse";
    # `fall` loses 25 items: worse in both
    from forgetscope import report

    right = {f"i{k}": 1.0 for k in range(100)}
    changed = {
        "slip": {**right, **{f"i{k}": 0.0 for k in range(7)}, "i99": 1.0},
        "fall": {**right, **{f"i{k}": 0.0 for k in range(25)}},
        "same": right,
        "also": right,
    }
    start = {**right, "i99": 0.0}  # slip's one wrong->right item
    root = tmp_path / "run"
    for task, end in changed.items():
        layout = probe_run(tmp_path / task, {0: start if task == "slip" else right, 1: end}, over(np.mean), task=task)
        for step in (0, 1):
            folder = RunLayout(root).eval_dir(step)
            folder.mkdir(parents=True, exist_ok=True)
            source = layout.eval_dir(step)
            (folder / f"samples_{task}.jsonl").write_text((source / f"samples_{task}.jsonl").read_text())
            merged = folder / "results.json"
            result = json.loads(merged.read_text()) if merged.is_file() else {"step": step, "tokens": step, "tasks": {}}
            result["tasks"].update(json.loads((source / "results.json").read_text())["tasks"])
            merged.write_text(json.dumps(result))
    (root / "manifest.json").write_text(json.dumps({"status": "finished", "method": "full"}))
    rows = {
        r["task"]: r
        for r in stats.final_vs_base(RunLayout(root), curves.build_table(RunLayout(root), "r", "r", "full"))
    }
    assert rows["slip"]["p"] < stats.ALPHA < rows["slip"]["p_adj"] and rows["slip"]["high"] < 0  # its own CI excludes 0
    assert not rows["slip"]["worse"] and rows["fall"]["worse"]
    assert not rows["same"]["worse"] and rows["same"]["p_adj"] == 1.0
    finals = report.analyse([root]).finals.set_index("task")
    for task, row in rows.items():
        assert finals.loc[task, "p_adj"] == pytest.approx(row["p_adj"]), task
    assert "worse: beyond noise" in stats.format_summary(list(rows.values()))
