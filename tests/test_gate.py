"""The release gate: verdicts, how the CI decides, exit codes 0/1/2, JSON and Markdown."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from forgetscope import cli, gate


@pytest.fixture
def runs(tmp_path, fake_run):
    """Three runs of one 0/1 probe ("facts", 200 items, 80% right at the base) that forget 0, 8
    and 50 of the items they knew: drops of 0, 0.04 (CI straddling 0.05) and 0.25."""
    rng = np.random.default_rng(0)
    base = {f"i{k}": float(v) for k, v in enumerate(rng.random(200) < 0.8)}
    known = [k for k, v in base.items() if v]
    out = {}
    for name, lose in (("same", 0), ("small", 8), ("large", 50)):
        forgotten = set(known[:lose])
        out[name] = fake_run(tmp_path / name, {0: base, 10: {k: 0.0 if k in forgotten else v for k, v in base.items()}}).root
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
    result = json.loads((runs["large"] / "gate.json").read_text())
    assert result["verdict"] == "fail" and result["step"] == 10
    facts = next(c for c in result["checks"] if c["name"] == "facts")
    assert facts["low"] > 0.05 and not facts["passed"]
    md = (runs["large"] / "gate.md").read_text()
    assert "**FAIL**" in md and "| FAIL | facts | acc |" in md


def test_the_upper_end_of_the_ci_decides_unless_told_otherwise(tmp_path, runs):
    upper = gate.check(runs["small"], gate.load_policy(_policy(tmp_path, general={"facts": {"max_drop": 0.05}})))
    facts = upper["checks"][0]
    assert facts["drop"] <= 0.05 < facts["high"]  # the estimate is within the limit, the CI is not
    assert upper["verdict"] == "fail" and facts["note"].startswith("inconclusive")
    lenient = gate.load_policy(_policy(tmp_path, decide_on="estimate", general={"facts": {"max_drop": 0.05}}))
    assert gate.check(runs["small"], lenient)["verdict"] == "pass"
    wider = gate.load_policy(_policy(tmp_path, confidence=0.99, general={"facts": {"max_drop": 0.05}}))
    assert gate.check(runs["small"], wider)["checks"][0]["high"] > facts["high"]


def test_relative_limits_defaults_new_task_minimum_and_mean_forgetting(tmp_path, runs):
    result = gate.check(runs["large"], gate.load_policy(_policy(tmp_path, general={"default": {"max_relative_drop": 0.5}})))
    facts = result["checks"][0]
    assert facts["relative"] and facts["drop"] == pytest.approx(facts["value"] / facts["base"] * -1 + 1)
    assert result["verdict"] == "pass"
    result = gate.check(runs["same"], gate.load_policy(_policy(tmp_path, new={"new": {"min": 1.5}})))
    assert result["verdict"] == "fail" and result["checks"][0]["note"] == "below the minimum score"
    result = gate.check(runs["large"], gate.load_policy(_policy(tmp_path, max_general_forgetting=0.1)))
    assert result["verdict"] == "fail" and result["checks"][-1]["name"] == "general forgetting"


@pytest.mark.parametrize("policy, message", [
    ({"general": {"facts": {"max_drop": 0.1, "max_relative_drop": 0.1}}}, "give exactly one of max_drop / max_relative_drop"),
    ({"general": {"facts": {"max_drp": 0.1}}}, "unknown key; did you mean 'max_drop'?"),
    ({"general": {"facts": {"max_drop": "a lot"}}}, "expected number"),
    ({"general": {"nonexistent": {"max_drop": 0.1}}}, "the run has no general eval 'nonexistent'"),
    ({"new": {"facts": {"min": 0.5}}}, "the run has no new eval 'facts'"),
    ({"new": {"new": {"max_drop": 0.5}}}, "give exactly one of min"),
    ({"confidence": 1.5, "general": {"facts": {"max_drop": 0.1}}}, "confidence: 1.5 must be in [0.5, 1)"),
    ({"decide_on": "vibes", "general": {"facts": {"max_drop": 0.1}}}, "decide_on: expected"),
    ({}, "the policy sets no limit"),
    ({"general": ["facts"]}, "general: expected"),
])
def test_unusable_policies_exit_2_with_one_line_each(tmp_path, runs, capsys, policy, message):
    assert cli.main(["gate", str(runs["same"]), "--policy", _policy(tmp_path, **policy)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (runs["same"] / "gate.json").exists()


def test_missing_inputs_exit_2(tmp_path, runs, capsys):
    policy = _policy(tmp_path, general={"facts": {"max_drop": 0.1}})
    assert cli.main(["gate", str(tmp_path / "nope"), "--policy", policy]) == 2
    assert cli.main(["gate", str(runs["same"]), "--policy", str(tmp_path / "missing.yaml")]) == 2
    (tmp_path / "bad.yaml").write_text("general: {facts: [")
    assert cli.main(["gate", str(runs["same"]), "--policy", str(tmp_path / "bad.yaml")]) == 2
    assert cli.main(["gate", str(runs["same"]), "--policy", policy, "--step", "7"]) == 2
    err = capsys.readouterr().err
    assert "not a forgetscope run" in err and "no such policy file" in err and "not valid YAML" in err
    assert "no evaluation at step 7; evaluated steps: [0, 10]" in err


def test_the_example_policy_is_valid():
    policy = gate.load_policy(Path(__file__).resolve().parent.parent / "examples" / "release_policy.yaml")
    assert policy.decide_on == "upper" and ("new", "numerals") in policy.limits
