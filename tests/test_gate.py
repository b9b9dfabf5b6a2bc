"""The release gate: non-inferiority verdicts, Holm/BH across probes, chance, advice on items, exit codes 0/1/2."""

import json
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import yaml

from forgetscope import cli, curves, gate, results, stats
from forgetscope.snapshots import RunLayout

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.fixture
def runs(tmp_path, fake_run):
    """Three runs of one 0/1 probe ("facts", 200 items, 80% right at the base) that forget 0, 8
    and 50 of the items they knew: drops of 0, 0.04 (bound straddling 0.05) and 0.25."""
    rng = np.random.default_rng(0)
    base = {f"i{k}": float(v) for k, v in enumerate(rng.random(200) < 0.8)}
    known = [k for k, v in base.items() if v]
    out = {}
    for name, lose in (("same", 0), ("small", 8), ("large", 50)):
        forgotten = set(known[:lose])
        out[name] = fake_run(
            tmp_path / name, {0: base, 10: {k: 0.0 if k in forgotten else v for k, v in base.items()}}
        ).root
    return out


def _policy(tmp_path, **data) -> str:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_verdicts_and_exit_codes(tmp_path, runs, capsys):
    policy = _policy(tmp_path, general={"facts": {"max_drop": 0.05}}, new={"new": {"min": 0.9}})
    assert cli.main(["gate", str(runs["same"]), "--policy", policy]) == 0
    assert cli.main(["gate", str(runs["large"]), "--policy", policy]) == 1
    out = capsys.readouterr().out
    assert "FAIL  facts" in out and "drop exceeds the limit" in out and "verdict: FAIL" in out
    assert "non-inferiority at 95%, one-sided, Holm-adjusted across 1 probes" in out
    result = json.loads((runs["large"] / "gate.json").read_text())
    assert result["verdict"] == "fail" and result["step"] == 10
    facts = next(c for c in result["checks"] if c["name"] == "facts")
    assert facts["drop"] == pytest.approx(0.25) and facts["p_adj"] == pytest.approx(1.0) and not facts["passed"]
    md = (runs["large"] / "gate.md").read_text()
    assert "**FAIL**" in md and "| FAIL | facts | acc |" in md


def test_a_one_sided_non_inferiority_test_decides(tmp_path, runs, tango):
    """8 of 200 items forgotten, none learned: an accuracy, so the gate runs Tango's score test
    (checked against an independent computation) and shows the bound that inverts it."""
    upper = gate.check(runs["small"], gate.load_policy(_policy(tmp_path, general={"facts": {"max_drop": 0.05}})))
    facts = upper["checks"][0]
    assert facts["drop"] == pytest.approx(0.04) and facts["n"] == 200 and facts["test"] == "score"
    assert facts["p"] == pytest.approx(tango(8, 0, 200).p_noninferior(0.05), rel=1e-6)  # 0.26
    assert facts["bound_level"] == pytest.approx(0.95)
    assert facts["bound"] == pytest.approx(tango(8, 0, 200).drop_bound(0.05), abs=1e-7)  # 0.070
    assert facts["se"] == pytest.approx((0 - 8 + 200 * 0.05) / tango(8, 0, 200).z(-0.05) / 200, rel=1e-5)  # under H0
    assert upper["verdict"] == "fail" and facts["note"].startswith("inconclusive")
    # how many items would decide it: n' = n ((z_.95 + z_.8) se / (margin - drop))^2, se under H0 at the margin
    z = NormalDist().inv_cdf(0.95) + NormalDist().inv_cdf(0.8)
    assert facts["items_needed"] == pytest.approx(200 * (z * facts["se"] / (0.05 - facts["drop"])) ** 2, abs=1)
    assert f"about {facts['items_needed']} items (now 200)" in facts["note"] and "80% power" in facts["note"]
    lenient = gate.load_policy(_policy(tmp_path, decide_on="estimate", general={"facts": {"max_drop": 0.05}}))
    assert gate.check(runs["small"], lenient)["verdict"] == "pass"
    wider = gate.load_policy(_policy(tmp_path, confidence=0.99, general={"facts": {"max_drop": 0.05}}))
    assert gate.check(runs["small"], wider)["checks"][0]["bound"] > facts["bound"]
    loose = gate.load_policy(_policy(tmp_path, general={"facts": {"max_drop": 0.08}}))
    assert tango(8, 0, 200).p_noninferior(0.08) < 0.05
    assert gate.check(runs["small"], loose)["verdict"] == "pass"


def test_a_few_unchanged_items_show_nothing(tmp_path, fake_run, tango):
    # the bootstrap of 5 items that all stayed right has every replicate at 0 and "showed" a drop below
    # 0.05 at p < 0.001; the score test knows 5 items cannot (0 of 5 forgotten is likely at a true drop of 0.05)
    right = {f"i{k}": 1.0 for k in range(5)}
    few = gate.check(
        fake_run(tmp_path / "few", {0: right, 10: right}).root,
        gate.load_policy(_policy(tmp_path, general={"facts": {"max_drop": 0.05}})),
    )
    facts = few["checks"][0]
    assert (
        few["verdict"] == "fail"
        and facts["drop"] == 0
        and facts["p"] == pytest.approx(tango(0, 0, 5).p_noninferior(0.05), rel=1e-6)
    )
    assert facts["p"] > 0.25 and facts["bound"] > 0.05 and facts["note"].startswith("inconclusive")
    assert 100 < facts["items_needed"] < 150  # about 117: the SE under H0 is not 0
    right = {f"i{k}": 1.0 for k in range(400)}  # enough unchanged items do show it, even at 99.9%
    strict = _policy(tmp_path, confidence=0.999, general={"facts": {"max_drop": 0.05}})
    many = gate.check(fake_run(tmp_path / "many", {0: right, 10: right}).root, gate.load_policy(strict))
    assert many["verdict"] == "pass" and many["checks"][0]["bound"] < 0.05


@pytest.mark.parametrize("by_size", [False, True])
def test_a_group_of_unchanged_accuracies_is_tested_as_lm_eval_weighs_it(tmp_path, probe_run, tango, by_size):
    """A group of 5 + 200 unchanged items reads 1.0 either way lm-eval weighs its subtasks, yet
    its 5-item subtask is half of an equal-weight group: the run records the weighting, and the
    gate tests the group as weighed (equal: the subtasks' score bounds, combined, cannot show the
    drop below the limit)."""
    from test_stats import group_value

    items = {**{f"small/{k}": 1.0 for k in range(5)}, **{f"large/{k}": 1.0 for k in range(200)}}
    layout = probe_run(
        tmp_path / "r", {0: items, 10: items}, group_value(by_size), subtasks=["small", "large"], weight_by_size=by_size
    )
    result = gate.check(layout.root, gate.load_policy(_policy(tmp_path, general={"probe": {"max_drop": 0.05}})))
    probe = result["checks"][0]
    score = tango(0, 0, 205) if by_size else tango.stratified([(0, 0, 5), (0, 0, 200)], [1, 1])
    assert probe["test"] == "score" and probe["p"] == pytest.approx(score.p_noninferior(0.05), rel=1e-6)
    assert result["verdict"] == ("pass" if by_size else "fail")  # p 0.0005 pooled; 0.2 weighed equally
    if not by_size:  # the items advised count both subtasks' (evals.limit caps each)
        assert "items (now 205, in all across its 2 subtasks)" in probe["note"]


def test_an_equal_weight_group_whose_subtasks_change_apart_keeps_its_level(tango):
    """The score test of one common change, used at first for such groups, passed a group truly
    at its limit 17% (sizes 100 and 10) to 44% (300 and 5) of the time when its subtasks changed by
    different amounts, and its bound and p-value disagreed; each subtask's own bounds, combined
    (MOVER), keep the level and agree."""
    rng = np.random.default_rng(3)
    n, change, weights = np.array([100.0, 10.0]), np.array([0.05, -0.15]), np.full(2, 0.5)  # mean drop 0.05
    rates = np.abs(change) + np.array([0.05, 0.0])
    lost, gained = (rates - change) / 2, (rates + change) / 2
    passed = 0
    for _ in range(300):
        counts = np.array([rng.multinomial(int(k), [a, b, 1 - a - b]) for k, a, b in zip(n, lost, gained)], float)
        flips = stats.Flips(counts[:, 0], counts[:, 1], n, weights)
        paired = stats.Paired(float(weights @ flips.changes), None, 110, flips=flips)
        p = stats.drop_p(paired, -1.0, 1.0, 0.05)
        passed += p <= 0.05
        assert (stats.drop_bound(paired, -1.0, 1.0, 0.05) < 0.05) == (p < 0.05)  # a bound within the limit = a pass
    assert passed / 300 <= 0.05  # 0.165 with the common-change statistic
    flips = stats.Flips(np.array([0.0, 0.0]), np.array([7.0, 0.0]), np.array([100.0, 5.0]), weights)
    paired = stats.Paired(float(weights @ flips.changes), None, 105, flips=flips)
    ps = [stats.drop_p(paired, -1.0, 1.0, margin) for margin in (0.0, 0.01, 0.02, 0.05)]
    assert ps == sorted(ps, reverse=True)  # a looser limit never turns a pass into a fail
    assert ps[-1] == pytest.approx(tango.stratified([(0, 7, 100), (0, 0, 5)], [1, 1]).p_noninferior(0.05), rel=1e-5)


def test_a_policy_may_name_a_metric_as_lm_eval_keys_it(tmp_path, runs):
    policy = gate.load_policy(_policy(tmp_path, general={"facts": {"max_drop": 0.3, "metric": "acc,none"}}))
    assert gate.check(runs["small"], policy)["checks"][0]["metric"] == "acc"  # lm-eval's "acc,none" is "acc"


def test_inconclusive_probes_exit_1_with_the_items_that_would_decide(tmp_path, runs, capsys):
    assert (
        cli.main(["gate", str(runs["small"]), "--policy", _policy(tmp_path, general={"facts": {"max_drop": 0.05}})])
        == 1
    )
    out = capsys.readouterr().out
    assert "inconclusive" in out and "items (now 200) would decide it at 80% power" in out


@pytest.fixture
def several(tmp_path, fake_run, fake_probe):
    """A run with three general probes: ``facts`` unchanged, and ``a`` and ``b`` (200 items, all right
    at the base) each forgetting 5: with a limit of 0.055 their raw p-values are about 0.03; plus
    ``mc``, 4 choices, at chance (50 of 200) at the base."""
    rng = np.random.default_rng(0)
    base = {f"i{k}": float(v) for k, v in enumerate(rng.random(200) < 0.8)}
    layout = fake_run(tmp_path / "several", {0: base, 10: base})
    right = {f"j{k}": 1.0 for k in range(200)}
    for task in ("a", "b"):
        fake_probe(layout, task, {0: right, 10: {k: float(int(k[1:]) >= 5) for k in right}})
    guess = {f"m{k}": float(k < 50) for k in range(200)}
    fake_probe(layout, "mc", {0: guess, 10: {k: float(int(k[1:]) < 40) for k in guess}}, choices=4)
    return layout.root


def test_holm_and_bh_adjust_across_the_general_probes(tmp_path, several, tango):
    limits = {"facts": {"max_drop": 0.05}, "a": {"max_drop": 0.055}, "b": {"max_drop": 0.055}}
    results = {
        method: gate.check(several, gate.load_policy(_policy(tmp_path, correction=method, general=limits)))
        for method in ("none", "holm", "bh")
    }
    raw = {c["name"]: c["p"] for c in results["none"]["checks"]}
    assert raw["a"] == raw["b"] == pytest.approx(tango(5, 0, 200).p_noninferior(0.055), rel=1e-6)  # 0.031
    p, facts = raw["a"], raw["facts"]
    assert facts < p
    # by hand, m = 3 with p_(1) = facts, p_(2) = p_(3) = p. Holm: 3 facts, then max(3 facts, 2 p) for both a and b.
    # BH: ranks give 3 facts, 3p/2, p; the running minimum from the top leaves p for a and b, min(3 facts, p) for facts
    expected = {
        "none": [facts, p, p],
        "holm": [min(1.0, 3 * facts)] + [min(1.0, max(3 * facts, 2 * p))] * 2,
        "bh": [min(3 * facts, p), p, p],
    }
    assert expected["bh"] == pytest.approx(list(scipy_stats.false_discovery_control([facts, p, p])))
    for method, result in results.items():
        checks = {c["name"]: c for c in result["checks"]}
        assert [checks[t]["p_adj"] for t in ("facts", "a", "b")] == pytest.approx(expected[method])
        for c in checks.values():  # a bound within the limit exactly when the probe passes
            assert (c["bound"] < c["allowed"]) == c["passed"]
    assert results["none"]["verdict"] == "pass" and results["bh"]["verdict"] == "pass"  # BH: 3/2 x 0.03 <= 0.05
    holm = {c["name"]: c for c in results["holm"]["checks"]}  # Holm: 2 x 0.03 > 0.05
    assert results["holm"]["verdict"] == "fail" and holm["facts"]["passed"] and not holm["a"]["passed"]
    assert holm["a"]["bound_level"] == pytest.approx(1 - 0.05 / 2) and "inconclusive" in holm["a"]["note"]


def test_a_probe_at_chance_is_flagged_and_left_out_of_general_forgetting(tmp_path, several):
    policy = {"general": {"mc": {"max_drop": 0.2}, "facts": {"max_drop": 0.05}}, "max_general_forgetting": 0.05}
    result = gate.check(several, gate.load_policy(_policy(tmp_path, **policy)))
    checks = {c["name"]: c for c in result["checks"]}
    assert checks["mc"]["at_chance"] and checks["mc"]["chance"] == pytest.approx(0.25)
    assert "base at chance (0.25; guessing 0.25): this probe cannot show forgetting" in checks["mc"]["note"]
    assert not checks["facts"]["at_chance"]
    forgetting = checks["general forgetting"]  # facts (0), a and b (0.025 each); mc's 0.2 left out
    assert forgetting["value"] == pytest.approx(0.05 / 3) and forgetting["passed"]
    assert "leaves out mc (at chance)" in forgetting["note"]
    kept = gate.check(several, gate.load_policy(_policy(tmp_path, at_chance="keep", **policy)))
    assert kept["checks"][-1]["value"] == pytest.approx((0.05 + 0.2) / 4) and kept["verdict"] == "fail"


def test_general_forgetting_fails_when_no_probe_is_above_chance(tmp_path, fake_run, capsys):
    nothing = {f"i{k}": 0.0 for k in range(50)}  # no item right at the base: nothing to forget
    root = fake_run(tmp_path / "blank", {0: nothing, 10: nothing}).root
    assert cli.main(["gate", str(root), "--policy", _policy(tmp_path, max_general_forgetting=0.05)]) == 1
    result = json.loads((root / "gate.json").read_text())["checks"][-1]
    assert result["value"] is None and result["note"].startswith("no general probe is above chance")
    assert "general forgetting  mean relative drop  –" in capsys.readouterr().out
    kept = gate.check(root, gate.load_policy(_policy(tmp_path, at_chance="keep", max_general_forgetting=0.05)))
    assert kept["checks"][-1]["value"] is None and "leaves out facts (base 0)" in kept["checks"][-1]["note"]


def test_relative_limits_defaults_new_task_minimum_and_mean_forgetting(tmp_path, runs, fake_run):
    result = gate.check(
        runs["large"], gate.load_policy(_policy(tmp_path, general={"default": {"max_relative_drop": 0.5}}))
    )
    facts = result["checks"][0]
    assert facts["relative"] and facts["drop"] == pytest.approx(facts["value"] / facts["base"] * -1 + 1)
    assert result["verdict"] == "pass"
    for page in (gate.render_text(result), gate.render_markdown(result)):  # a share of the base, not in acc's units
        assert f"{stats.format_signed(facts['drop'])} relative (≤ " in page
    half = fake_run(tmp_path / "half", {0: {"i0": 1.0}, 10: {"i0": 1.0}}, learned=0.5).root
    result = gate.check(half, gate.load_policy(_policy(tmp_path, new={"new": {"min": 0.9}})))
    assert result["verdict"] == "fail" and result["checks"][0]["note"] == "below the minimum score"
    with pytest.raises(gate.GateError, match=r"policy new.new.min: 90 is above the highest acc \(1\); scores are"):
        gate.check(runs["same"], gate.load_policy(_policy(tmp_path, new={"new": {"min": 90}})))
    result = gate.check(runs["large"], gate.load_policy(_policy(tmp_path, max_general_forgetting=0.1)))
    assert result["verdict"] == "fail" and result["checks"][-1]["name"] == "general forgetting"


@pytest.mark.parametrize(
    "policy, message",
    [
        (
            {"general": {"facts": {"max_drop": 0.1, "max_relative_drop": 0.1}}},
            "general.facts: give exactly one of max_drop / max_relative_drop, got ['max_drop', 'max_relative_drop']",
        ),
        ({"general": {"facts": {}}}, "general.facts: give exactly one of max_drop / max_relative_drop, got none"),
        ({"general": {"facts": {"max_drp": 0.1}}}, "unknown key; did you mean 'max_drop'?"),
        ({"general": {"facts": {"max_drop": "a lot"}}}, "general.facts.max_drop: 'a lot' must be a number, 0 or more"),
        ({"general": {"facts": {"max_drop": float("nan")}}}, "general.facts.max_drop: nan must be a number, 0 or more"),
        ("new: {new: {min: 1e400}}", "new.new.min: '1e400' must be a number, 0 or more"),
        ({"general": {"facts": 0.05}}, "general.facts: expected a mapping like {max_drop: 0.05}, got 0.05"),
        ({"new": ["new"]}, "new: expected mapping, got ['new']"),
        ({"general": {"facts": {"max_drop": -0.1}}}, "general.facts.max_drop: -0.1 must be a number, 0 or more"),
        ({"general": {"default": {"max_relative_drop": -0.05}}}, "max_relative_drop: -0.05 must be a number, 0 or"),
        ({"new": {"new": {"min": -0.1}}}, "new.new.min: -0.1 must be a number, 0 or more"),  # it would always pass
        ({"max_general_forgetting": -0.05}, "max_general_forgetting: -0.05 must be a number, 0 or more"),
        ({"max_general_forgetting": float("nan")}, "max_general_forgetting: expected number | null, got nan"),
        (
            {"general": {"nonexistent": {"max_drop": 0.1}}},
            "policy general.nonexistent: the run has no eval 'nonexistent'; it has new evals: new; general evals: facts",
        ),
        (
            {"new": {"facts": {"min": 0.5}}},
            "policy new.facts: 'facts' is a general eval of this run, not a new one; list it under general: with "
            "max_drop or max_relative_drop",
        ),
        (
            {"general": {"new": {"max_drop": 0.1}}},
            "policy general.new: 'new' is a new eval of this run, not a general one; list it under new: with min or max",
        ),
        ({"new": {"new": {"max_drop": 0.5}}}, "new.new.max_drop: unknown key (allowed under new: min, max, metric)"),
        (
            {"new": {"new": {"max": 0.5}}},
            "policy new.new.max: acc is higher-is-better, so a maximum would fail a model that learned; give the "
            "smallest score allowed with min: 0.5",
        ),
        ({"general": {"facts": {"metric": "acc"}}}, "general.facts: give exactly one of max_drop / max_relative_drop"),
        ({"general": {"facts": {"max_drop": 0.1, "metric": 3}}}, "general.facts.metric: 3 must be a metric name"),
        (
            {"general": {"default": {"max_drop": 0.1, "metric": "acc"}}},
            "general.default.metric: name the metric under each probe, not under default",
        ),
        (
            {"general": {"facts": {"max_drop": 0.1, "metric": "acc_norm"}}},
            "policy general.facts.metric: facts has no metric 'acc_norm' (it has acc)",
        ),
        ({"confidence": 1.5, "general": {"facts": {"max_drop": 0.1}}}, "confidence: 1.5 must be in [0.5, 1)"),
        ({"decide_on": "vibes", "general": {"facts": {"max_drop": 0.1}}}, "decide_on: expected"),
        ({"correction": "bonferroni", "general": {"facts": {"max_drop": 0.1}}}, "correction: expected"),
        ({"power": 0.3, "general": {"facts": {"max_drop": 0.1}}}, "power: 0.3 must be in [0.5, 1)"),
        ({}, "the policy sets no limit"),
        ({"general": ["facts"]}, "general: expected"),
        (
            "task,acc\nfacts,0.9\n" + "other,0.5\n" * 20,
            "policy.yaml: expected a mapping of keys (confidence:, decide_on:, correction:, power:, at_chance:, new:, "
            "general:, max_general_forgetting:), got a str",
        ),
    ],
)
def test_unusable_policies_exit_2_with_one_line_each(tmp_path, runs, capsys, policy, message):
    """One line, the problem itself: a limit that cannot be read is not also "missing" ("give
    exactly one of ..., got none", "the policy sets no limit")."""
    if isinstance(policy, str):  # as written by hand: YAML 1.1 reads 1e400 as a string
        (tmp_path / "policy.yaml").write_text(policy)
    path = _policy(tmp_path, **policy) if isinstance(policy, dict) else str(tmp_path / "policy.yaml")
    assert cli.main(["gate", str(runs["same"]), "--policy", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "recipe" not in err[0], err
    assert not (runs["same"] / "gate.json").exists()


def test_every_problem_of_a_policy_is_reported_at_once(tmp_path, runs, capsys):
    policy = {"confidence": 1.5, "new": {"new": {"min": -1}}, "general": {"facts": 0.05, "x": {"max_drp": 1}}}
    assert cli.main(["gate", str(runs["same"]), "--policy", _policy(tmp_path, **policy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split("policy.yaml: ")[1].split(" ")[0] for line in err] == [
        "confidence:",
        "new.new.min:",
        "general.facts:",
        "general.x.max_drp:",
    ]


def test_a_relative_drop_above_1_is_a_valid_limit():
    """A loss (bits per byte) can more than double, so a relative drop above 100% means something."""
    assert gate._limit("general.prose_ppl", {"max_relative_drop": 1.5}, []) == gate.Limit(max_relative_drop=1.5)


def test_a_policy_that_checks_nothing_in_the_run_exits_2(tmp_path, fake_run, capsys):
    """`default` covers general probes only: on a run without any, nothing is checked, and a
    "PASS across 0 probes" would wave anything through."""
    root = fake_run(tmp_path / "nogeneral", {0: {"i0": 1.0}, 10: {"i0": 1.0}}).root
    for results_json in root.glob("evals/step-*/results.json"):  # keep the new task only
        result = json.loads(results_json.read_text())
        del result["tasks"]["facts"]
        results_json.write_text(json.dumps(result))
    for policy, message in [
        (
            {"general": {"default": {"max_drop": 0.1}}},
            "the policy checks nothing in this run at step 10 (it has new evals: new; general evals: none); "
            "name those evals under new: or general: in the policy",
        ),
        (
            {"new": {"new": {"min": 0.5}}, "max_general_forgetting": 0.05},
            "policy max_general_forgetting: the run has no general eval to average at step 10; it has new evals: new",
        ),
    ]:
        assert cli.main(["gate", str(root), "--policy", _policy(tmp_path, **policy)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (root / "gate.json").exists()
    assert cli.main(["gate", str(root), "--policy", _policy(tmp_path, new={"new": {"min": 0.5}})]) == 0


def test_a_value_at_the_limit_up_to_float_rounding_is_within_it(tmp_path, fake_run):
    """0.8 -> 0.75 is a drop of 0.050000000000000044: at a limit of 0.05, not over it, for the point
    estimate as for the bootstrap replicates; the same for relative drops, minimums and the mean."""
    base = {f"i{k}": float(k < 16) for k in range(20)}
    root = fake_run(tmp_path / "at", {0: base, 10: {**base, "i0": 0.0}}, learned=0.3 * 3).root  # 0.8999999999999999
    result = gate.check(root, gate.load_policy(_policy(tmp_path, general={"facts": {"max_drop": 0.05}})))
    facts = result["checks"][0]
    assert facts["drop"] == 0.8 - 0.75 > 0.05 and gate._compare(facts["drop"], 0.05) == 0
    assert stats.p_noninferior(np.array([facts["drop"]]), 0.05) == 1.0  # a replicate there is at the limit too
    assert facts["p"] > 0.4 and not facts["passed"]  # the test decides: it cannot show a drop below the limit
    assert facts["note"] == "inconclusive: the drop is at the limit, so no number of items would show it below"
    lenient = _policy(tmp_path, decide_on="estimate", general={"facts": {"max_drop": 0.05}}, new={"new": {"min": 0.9}})
    assert gate.check(root, gate.load_policy(lenient))["verdict"] == "pass"
    base = {f"i{k}": float(k < 20) for k in range(25)}
    root = fake_run(tmp_path / "relative", {0: base, 10: {**base, "i0": 0.0}}).root  # 0.8 -> 0.76
    relative = _policy(
        tmp_path, decide_on="estimate", general={"facts": {"max_relative_drop": 0.05}}, max_general_forgetting=0.05
    )
    result = gate.check(root, gate.load_policy(relative))
    facts, forgetting = result["checks"]
    assert facts["drop"] == (0.8 - 0.76) / 0.8 > 0.05 and facts["passed"] and facts["note"] == ""
    assert forgetting["value"] == pytest.approx(0.05) and forgetting["value"] > 0.05 and forgetting["passed"]


def test_missing_inputs_exit_2(tmp_path, runs, capsys):
    policy = _policy(tmp_path, general={"facts": {"max_drop": 0.1}})
    assert cli.main(["gate", str(tmp_path / "nope"), "--policy", policy]) == 2
    assert cli.main(["gate", str(tmp_path), "--policy", policy]) == 2
    assert cli.main(["gate", str(runs["same"]), "--policy", str(tmp_path / "missing.yaml")]) == 2
    assert cli.main(["gate", str(runs["same"]), "--policy", str(tmp_path)]) == 2
    (tmp_path / "bad.yaml").write_text("general: {facts: [")
    assert cli.main(["gate", str(runs["same"]), "--policy", str(tmp_path / "bad.yaml")]) == 2
    (tmp_path / "twice.yaml").write_text("general:\n  facts: {max_drop: 0.1}\n  facts: {max_drop: 0.5}\n")
    assert cli.main(["gate", str(runs["same"]), "--policy", str(tmp_path / "twice.yaml")]) == 2
    assert cli.main(["gate", str(runs["same"]), "--policy", policy, "--step", "7"]) == 2
    assert cli.main(["gate", str(runs["same"]), "--policy", policy, "--step", "0"]) == 2
    err = capsys.readouterr().err
    assert (
        "nope: no such folder" in err
        and "not a forgetscope run" in err
        and "no such policy file" in err
        and f"{tmp_path}: is a folder, not a policy file; give a policy YAML" in err
        and "not valid YAML" in err
    )
    assert "line 3: not valid YAML (the key 'facts' is given twice in one mapping)" in err
    assert "no evaluation at step 7; evaluated steps: [0, 10]" in err and "step 0 is the base itself" in err


def test_the_example_policy_is_valid():
    policy = gate.load_policy(Path(__file__).resolve().parent.parent / "examples" / "release_policy.yaml")
    assert policy.decide_on == "upper" and ("new", "numerals") in policy.limits


def test_a_zero_drop_reads_plus_zero():
    row = gate._row(
        {
            "name": "p",
            "metric": "acc",
            "base": 0.23,
            "value": 0.23,
            "drop": -0.0,
            "bound": 0.05,
            "p_adj": 0.02,
            "passed": True,
            "limit": "<= 0.08",
            "note": "",
        }
    )
    assert row[4] == "+0.0000 (≤ +0.0500)"


def _cut(path: Path) -> None:
    path.write_text(path.read_text()[: len(path.read_text()) // 2])


DAMAGED = [
    ("manifest cut short", lambda r: _cut(r / "manifest.json"), "manifest.json: unreadable"),
    ("manifest not UTF-8", lambda r: (r / "manifest.json").write_bytes(b"\xff\xfe{"), "manifest.json: unreadable"),
    ("manifest a list", lambda r: (r / "manifest.json").write_text("[1, 2]"), "manifest.json: not a mapping"),
    (
        "results cut short, no curves yet",
        lambda r: [_cut(r / "evals" / "step-000010" / "results.json"), (r / "curves.csv").unlink()],
        "results.json: unreadable",
    ),
    (
        "samples missing",
        lambda r: (r / "evals" / "step-000010" / "samples_facts.jsonl").unlink(),
        "samples_facts.jsonl: missing",
    ),
    (
        "samples cut short",
        lambda r: _cut(r / "evals" / "step-000010" / "samples_facts.jsonl"),
        "samples_facts.jsonl: unreadable",
    ),
    ("curves empty", lambda r: (r / "curves.csv").write_text(""), "curves.csv: unreadable"),
    ("curves foreign", lambda r: (r / "curves.csv").write_text("a,b\n1,2\n"), "curves.csv: lacks columns"),
    (
        "still running",
        lambda r: (r / "manifest.json").write_text('{"status": "running"}'),
        "the run is running, not finished",
    ),
    ("failed", lambda r: (r / "manifest.json").write_text('{"status": "failed"}'), "the run is failed, not finished"),
]


@pytest.mark.parametrize("damage,message", [d[1:] for d in DAMAGED], ids=[d[0] for d in DAMAGED])
def test_a_damaged_or_unfinished_run_is_one_line_and_exit_2(tmp_path, runs, capsys, damage, message):
    from forgetscope import results

    root = runs["small"]
    results.load_results([root]).drop(columns="chance").to_csv(root / "curves.csv", index=False)
    damage(root)
    policy = _policy(tmp_path, general={"facts": {"max_drop": 0.1}})
    assert cli.main(["gate", str(root), "--policy", policy]) == 2  # not 1: a crash must not read as a failed release
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("forgetscope: error: ") and message in err[0], err
    assert not (root / "gate.json").exists()  # nothing written into the run
    if "not finished" not in message:  # a report shows a run still going; a damaged one it refuses too
        assert cli.main(["report", str(root), "-o", str(tmp_path / "report")]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "report").exists()


def test_unusable_output_folders_and_set_values_are_refused_before_any_work(tmp_path, runs, capsys):
    policy = _policy(tmp_path, general={"facts": {"max_drop": 0.1}})
    (tmp_path / "afile").write_text("")
    assert cli.main(["gate", str(runs["same"]), "--policy", policy, "--out", str(tmp_path / "afile" / "sub")]) == 2
    assert cli.main(["report", str(runs["same"]), "-o", str(tmp_path / "afile")]) == 2
    assert cli.main(["show", str(Path(__file__).parent.parent / "recipes" / "tiny.yaml"), "--set", "train={lr: 1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "is a file, not a folder" in err[0] and "is a file, not a folder" in err[1]
    assert "--set 'train={lr: 1': the value is not YAML" in err[2]


def test_out_into_another_run_or_inside_a_run_folder_is_refused(tmp_path, runs, capsys):
    """gate.json and gate.md would overwrite another run's own verdict, or land among a run's snapshots."""
    policy = _policy(tmp_path, general={"facts": {"max_drop": 0.1}})
    (runs["small"] / "gate.json").write_text("{}")  # that run's own verdict
    for out, where in [
        (runs["small"], "is a run folder,"),
        (runs["small"] / "snapshots" / "step-000002", f"lies inside the run folder {runs['small']}"),
        (runs["same"] / "evals" / "step-000010", f"lies inside the run folder {runs['same']}"),
    ]:
        assert cli.main(["gate", str(runs["same"]), "--policy", policy, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--out {out}: {where}" in err[0] and "choose a folder outside every run" in err[0]
    assert (runs["small"] / "gate.json").read_text() == "{}" and not (runs["same"] / "gate.json").exists()
    assert not (runs["small"] / "snapshots").exists()
    assert cli.main(["gate", str(runs["same"]), "--policy", policy, "--out", str(runs["same"])]) == 0
    assert cli.main(["gate", str(runs["same"]), "--policy", policy, "--out", str(tmp_path / "ci")]) == 0
    assert (runs["same"] / "gate.json").exists() and (tmp_path / "ci" / "gate.md").exists()


def _over(fn):
    """An lm-eval aggregation over a step's {item_id: value}."""
    return lambda items: fn(list(items.values()))


def test_a_perplexity_collapse_fails_on_lm_evals_perplexity(tmp_path, probe_run):
    # lm-eval's `perplexity` is exp(-mean log-likelihood): 65 -> 1e13 is a drop of 1e13, not of the log-likelihoods
    from lm_eval.api.metrics import perplexity

    rng = np.random.default_rng(0)
    base = {f"i{k}": float(v) for k, v in enumerate(rng.normal(-4.2, 0.5, 40))}
    collapsed = {k: v * 7 for k, v in base.items()}
    run = probe_run(tmp_path / "r", {0: base, 1: collapsed}, _over(perplexity), "perplexity", higher=False)
    result = gate.check(run.root, gate.load_policy(_policy(tmp_path, general={"probe": {"max_drop": 1.0}})))
    probe = result["checks"][0]
    assert result["verdict"] == "fail" and probe["drop"] > 1e12 and probe["note"] == "drop exceeds the limit"
    assert "68.73 → 7.247e+12  +7.247e+12 (≤ +" in gate.render_text(result)


def test_a_probe_without_a_confidence_bound_is_inconclusive_or_decided_on_its_estimate(tmp_path, probe_run):
    # a task's own aggregation (a median): the drop is lm-eval's, no bootstrap reproduces it
    from lm_eval.api.metrics import median

    steps = {0: {f"i{k}": float(k * k) for k in range(9)}, 1: {f"i{k}": float(k * k) - 1 for k in range(9)}}
    run = probe_run(tmp_path / "r", steps, _over(median), "ll_score").root
    limits = {"probe": {"max_drop": 2.0}}
    upper = gate.check(run, gate.load_policy(_policy(tmp_path, general=limits)))
    probe = upper["checks"][0]
    assert probe["drop"] == pytest.approx(1.0) and probe["bound"] is None and probe["p_adj"] is None
    assert upper["verdict"] == "fail" and probe["note"].startswith("inconclusive: no confidence bound (the items do")
    assert upper["probes_tested"] == 0 and "+1.0000 (no bound)" in gate.render_text(upper)
    estimate = gate.check(run, gate.load_policy(_policy(tmp_path, decide_on="estimate", general=limits)))
    assert estimate["verdict"] == "pass" and estimate["checks"][0]["note"].startswith("decided on the estimate")
    json.dumps(estimate)  # gate.json: no NaN


def test_a_lower_is_better_new_task_takes_a_maximum(tmp_path, fake_run, capsys):
    # the new task learned text: bits per byte fell 8.01 -> 4.86; `min: 7` would fail it, so it is refused
    layout = fake_run(tmp_path / "r", {0: {"a": 1.0}, 5: {"a": 1.0}})
    for step, value in ((0, 8.01), (5, 4.86)):
        path = layout.eval_dir(step) / "results.json"
        result = json.loads(path.read_text())
        result["tasks"]["new"]["metrics"] = {
            "bits_per_byte": {"value": value, "stderr": None, "higher_is_better": False}
        }
        path.write_text(json.dumps(result))
    assert cli.main(["gate", str(layout.root), "--policy", _policy(tmp_path, new={"new": {"min": 7.0}})]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "new.new.min: bits_per_byte is lower-is-better" in err[0] and "max: 7" in err[0]
    assert cli.main(["gate", str(layout.root), "--policy", _policy(tmp_path, new={"new": {"max": 7.0}})]) == 0
    assert "PASS  new    bits_per_byte  4.86" in capsys.readouterr().out
    worse = gate.check(layout.root, gate.load_policy(_policy(tmp_path, new={"new": {"max": 4.0}})))
    assert worse["verdict"] == "fail" and worse["checks"][0]["note"] == "above the maximum"
    assert worse["checks"][0]["limit"] == "<= 4"


def test_the_primary_metric_follows_the_tasks_order_and_a_policy_can_name_one(tmp_path, probe_run):
    # gsm8k-style filters: lm-eval reports `strict` first, then `loose`; the gate decides on strict (unchanged),
    # not on loose (alphabetically first, and falling), unless the policy names loose
    keep = {f"i{k}": float(k % 2) for k in range(40)}
    run = probe_run(tmp_path / "r", {0: keep, 1: keep}, _over(np.mean), "exact_match,strict").root
    for step, loose in ((0, 1.0), (1, 0.0)):
        folder = RunLayout(run).eval_dir(step)
        result = json.loads((folder / "results.json").read_text())
        result["tasks"]["probe"]["metrics"]["exact_match,loose"] = {
            "value": loose,
            "stderr": None,
            "higher_is_better": True,
        }
        (folder / "results.json").write_text(json.dumps(result))
        rows = [json.loads(line) for line in (folder / "samples_probe.jsonl").read_text().splitlines()]
        (folder / "samples_probe.jsonl").write_text(
            "".join(json.dumps({**r, "exact_match,loose": loose}) + "\n" for r in rows)
        )
    table = curves.build_table(RunLayout(run), "r", "r", "full")
    assert list(table["metric"].unique()) == ["exact_match,strict", "exact_match,loose"]  # lm-eval's order kept
    # a curves.csv written before the table kept that order (metrics sorted by name) is read back in it
    old = table.sort_values(["role", "task", "metric", "step"])
    RunLayout(run).curves.write_text(old.to_csv(index=False))
    assert list(results.load_results([run])["metric"].unique()) == ["exact_match,strict", "exact_match,loose"]
    plain = gate.check(run, gate.load_policy(_policy(tmp_path, general={"probe": {"max_drop": 0.05}})))
    assert plain["checks"][0]["metric"] == "exact_match,strict" and plain["checks"][0]["drop"] == 0.0
    named = {"probe": {"max_drop": 0.05, "metric": "exact_match,loose"}}
    loose = gate.check(run, gate.load_policy(_policy(tmp_path, general=named)))
    assert loose["checks"][0]["metric"] == "exact_match,loose" and loose["checks"][0]["drop"] == 1.0
    assert loose["verdict"] == "fail"
    # the mean relative drop takes each probe's metric as the policy names it (loose: 1.0 -> 0.0), else the primary
    both = gate.check(run, gate.load_policy(_policy(tmp_path, general=named, max_general_forgetting=0.5)))
    [mean] = [c for c in both["checks"] if c["name"] == "general forgetting"]
    assert mean["value"] == 1.0 and not mean["passed"]
    primary = gate.check(run, gate.load_policy(_policy(tmp_path, max_general_forgetting=0.5)))
    assert primary["checks"][-1]["value"] == 0.0 and primary["verdict"] == "pass"


def _bits(rng, n: int, shift: float = 0.0) -> dict:
    """``n`` items of bits per byte as stored: [log-likelihood, bytes]."""
    return {f"t{k}": [float(-30 * (1 + shift) + rng.normal(0, 3)), 20] for k in range(n)}


def test_a_bootstrap_bound_agrees_with_its_p_value_and_high_confidence_is_reachable(tmp_path, fake_run):
    # bits per byte has no score test: the bound shown is the replicate that the p-value counts against,
    # so "a bound within the limit is a pass" holds exactly; and with 3 probes at 99.9% (Holm: 0.00033 for the
    # first) the bootstrap draws enough replicates for an unchanged model to pass
    rng = np.random.default_rng(1)
    base = _bits(rng, 200)
    later = {k: [v[0] - rng.normal(0.5, 2), v[1]] for k, v in base.items()}
    run = fake_run(tmp_path / "r", {0: base, 10: later}, metric="bits_per_byte").root
    for limit in np.linspace(0.02, 0.08, 13):
        [probe] = gate.check(run, gate.load_policy(_policy(tmp_path, general={"facts": {"max_drop": float(limit)}})))[
            "checks"
        ]
        assert probe["test"] == "bootstrap" and (probe["bound"] < limit) == probe["passed"], limit
    same = fake_run(tmp_path / "same", {0: base, 10: base}, metric="bits_per_byte")
    for step in (0, 10):
        folder = same.eval_dir(step)
        (folder / "samples_b.jsonl").write_text((folder / "samples_facts.jsonl").read_text())
        (folder / "samples_c.jsonl").write_text((folder / "samples_facts.jsonl").read_text())
        result = json.loads((folder / "results.json").read_text())
        result["tasks"]["b"] = result["tasks"]["c"] = result["tasks"]["facts"]
        (folder / "results.json").write_text(json.dumps(result))
    strict = _policy(tmp_path, confidence=0.999, general={"default": {"max_drop": 0.05}})
    result = gate.check(same.root, gate.load_policy(strict))
    assert result["verdict"] == "pass" and result["probes_tested"] == 3
    assert "non-inferiority at 99.9%" in gate.render_text(result)


def test_scores_that_are_not_numbers_fail(tmp_path, fake_run, capsys):
    # a model with NaN weights scores NaN: no limit can be shown met, and general forgetting is undefined
    rng = np.random.default_rng(0)
    base = _bits(rng, 20)
    broken = {k: [math.nan, v[1]] for k, v in base.items()}
    layout = fake_run(tmp_path / "r", {0: base, 10: broken}, metric="bits_per_byte")
    result = json.loads((layout.eval_dir(10) / "results.json").read_text())
    result["tasks"]["new"]["metrics"]["acc"]["value"] = math.nan
    (layout.eval_dir(10) / "results.json").write_text(json.dumps(result))
    (layout.root / "curves.csv").unlink(missing_ok=True)
    for decide_on in ("upper", "estimate"):
        policy = {
            "decide_on": decide_on,
            "general": {"facts": {"max_drop": 0.5}},
            "new": {"new": {"min": 0.5}},
            "max_general_forgetting": 0.5,
        }
        assert cli.main(["gate", str(layout.root), "--policy", _policy(tmp_path, **policy)]) == 1
        checks = {c["name"]: c for c in json.loads((layout.root / "gate.json").read_text())["checks"]}
        assert not any(c["passed"] for c in checks.values()), decide_on
        assert all("not a number" in c["note"] for c in checks.values()), checks
    capsys.readouterr()


def test_a_probe_whose_base_is_zero_has_no_relative_drop(tmp_path, fake_run, fake_probe, capsys):
    # `errors` (lower is better, 0/1 per item) is 0 at the base: it cannot weigh in the mean relative drop, a
    # relative limit on it is a policy error, and guessing (a floor of rising scores) does not apply to it
    right = {f"i{k}": 1.0 for k in range(100)}
    layout = fake_run(tmp_path / "r", {0: right, 10: {**right, **{f"i{k}": 0.0 for k in range(20)}}})
    for step, value in ((0, 0.0), (10, 1.0)):
        folder = layout.eval_dir(step)
        (folder / "samples_errors.jsonl").write_text(
            "".join(json.dumps({"item_id": f"e{k}", "errors": value, "metrics": ["errors"]}) + "\n" for k in range(4))
        )
        result = json.loads((folder / "results.json").read_text())
        result["tasks"]["errors"] = {
            "role": "general",
            "n": 4,
            "metrics": {"errors": {"value": value, "stderr": None, "higher_is_better": False}},
        }
        (folder / "results.json").write_text(json.dumps(result))
    mean = gate.check(layout.root, gate.load_policy(_policy(tmp_path, max_general_forgetting=0.15)))
    [forgetting] = mean["checks"]
    assert forgetting["value"] == pytest.approx(0.2) and not forgetting["passed"]  # facts alone: 0.8 -> 0.64
    relative = _policy(tmp_path, general={"errors": {"max_relative_drop": 0.1}})
    assert cli.main(["gate", str(layout.root), "--policy", relative]) == 2
    err = capsys.readouterr().err.strip()
    assert "errors's base errors is 0, so a relative drop is undefined" in err and "max_drop" in err
    absolute = gate.check(layout.root, gate.load_policy(_policy(tmp_path, general={"errors": {"max_drop": 0.1}})))
    assert not absolute["checks"][0]["at_chance"] and absolute["verdict"] == "fail"


def test_an_empty_per_item_file_is_a_damaged_run(tmp_path, runs, capsys):
    (RunLayout(runs["small"]).eval_dir(10) / "samples_facts.jsonl").write_text("")
    assert (
        cli.main(["gate", str(runs["small"]), "--policy", _policy(tmp_path, general={"facts": {"max_drop": 0.1}})]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "samples_facts.jsonl" in err and "holds no item's acc" in err
