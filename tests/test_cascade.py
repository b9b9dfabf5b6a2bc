"""The evaluation cascade: the decision rule, the KL probe against the exact KL, a run with cheap
steps, the report's KL-vs-forgetting section, and simulating a cascade on a dense run."""

import copy
import json

import pandas as pd
import pytest
import torch
import yaml

from forgetscope import cascade, cli, gate, models, report, snapshots, stats
from forgetscope.errors import UserError
from forgetscope.load import RecipeError, load_recipe, recipe_from_dict
from forgetscope.replay import collate, kl_full
from forgetscope.runner import run
from forgetscope.snapshots import RunLayout


def test_probe_steps_and_the_decision_rule():
    config = recipe_from_dict({"base": "tiny-random", "cascade": {"every": 5}}).cascade
    assert snapshots.probe_steps(config.every, [0, 8, 20], 20) == [5, 10, 15]
    config.every = None
    assert snapshots.probe_steps(config.every, [0, 8, 20], 20) == []
    limits = {"kl": 0.05, "ppl": 0.02}
    assert cascade.decide(8, {"kl": 0.0}, {"kl": 0.0}, limits, {0, 8}) == (True, "scheduled")
    assert cascade.decide(5, {"kl": 0.04, "ppl": 1.01}, {"kl": 0.0, "ppl": 1.0}, limits, {0, 8}) == (False, "")
    full, reason = cascade.decide(5, {"kl": 0.06, "ppl": 1.0}, {"kl": 0.0, "ppl": 1.0}, limits, {0, 8})
    assert full and reason == "kl moved +0.06 (threshold 0.05)"
    assert cascade.decide(5, {"kl": 0.0, "ppl": 0.97}, {"kl": 0.0, "ppl": 1.0}, limits, {0, 8})[0]  # a move either way
    assert cascade.thresholds(recipe_from_dict({"base": "tiny-random", "cascade": {"kl_threshold": 0.3}}).cascade) == {
        "base_samples_ppl": 0.05,
        "new_task_kl": 0.3,
    }


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"cascade": {"cheap": ["world_capitals"]}, "evals": {"general": ["prose_ppl"]}},
            "cascade.cheap: 'world_capitals' is not in evals.general",
        ),
        ({"cascade": {"every": 0}}, "cascade.every: must be positive"),
        ({"cascade": {"kl_threshold": -1}}, "must be 0 or more"),
        ({"cascade": {"evry": 3}}, "did you mean 'every'"),
    ],
)
def test_bad_cascade_settings_are_named(data, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        recipe_from_dict({"base": "tiny-random", **data})


def _exact_kl(base, model, probe, tokenizer) -> float:
    """KL(base || model) per token over the whole vocabulary, by hand."""
    batch = {k: v.to(base.device) for k, v in collate(probe.examples, tokenizer.pad_token_id).items()}
    with torch.no_grad():
        p = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        q = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(kl_full(p, q, batch["labels"]))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_kl_probe_is_zero_at_the_base_and_exact_otherwise(tiny_recipe_data, method):
    from forgetscope import train

    data = {
        **tiny_recipe_data,
        "method": method,
        "cascade": {"cheap": [], "kl_prompts": 6, "kl_tokens": 8, "kl_topk": 4096},
    }
    if method == "full":
        data["lora"] = None
    recipe = recipe_from_dict(data)
    model, tokenizer = models.load(models.resolve("tiny-random"))
    base = copy.deepcopy(model).eval()
    model = train.prepare_model(model, recipe)
    probe = cascade.build_kl_probe(model, tokenizer, recipe, chat=False, base_fingerprint=f"fp-{method}")
    assert len(probe.examples) == 6 and all(-100 in e["labels"] for e in probe.examples)  # prompts are masked
    again = cascade.build_kl_probe(
        model, tokenizer, recipe, chat=False, base_fingerprint=f"fp-{method}"
    )  # from the cache
    assert again.texts == probe.texts and again.examples == probe.examples
    if method == "full":
        assert torch.equal(again.topk_values, probe.topk_values) and torch.equal(again.topk_indices, probe.topk_indices)
    at_base = cascade.measure_kl(probe, model, tokenizer)
    assert at_base["results"]["new_task_kl"]["metrics"]["kl"]["value"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():  # move the model away from the base
        for _name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    moved = cascade.measure_kl(probe, model, tokenizer)
    value = moved["results"]["new_task_kl"]["metrics"]["kl"]["value"]
    samples = moved["samples"]["new_task_kl"]
    assert value > 1e-4 and [s["item_id"] for s in samples] == [f"kl-{i:03d}" for i in range(6)]
    assert value == pytest.approx(sum(s["kl"][0] for s in samples) / sum(s["kl"][1] for s in samples))
    # top-k with k >= the vocabulary (full) and the adapter-disabled model (LoRA) are both exact
    assert value == pytest.approx(_exact_kl(base, model.eval(), probe, tokenizer), rel=1e-4)


def test_the_kl_probe_reads_zero_at_the_base_in_bf16_too(tiny_recipe_data):
    data = {
        **tiny_recipe_data,
        "method": "full",
        "lora": None,
        "evals": {**tiny_recipe_data["evals"], "precision": "bf16"},
        "cascade": {"cheap": [], "kl_prompts": 4, "kl_tokens": 8},
    }
    model, tokenizer = models.load(models.resolve("tiny-random"))
    probe = cascade.build_kl_probe(model, tokenizer, recipe_from_dict(data), chat=False, base_fingerprint="fp-bf16")
    assert probe.precision == "bf16"
    assert cascade.measure_kl(probe, model, tokenizer)["results"]["new_task_kl"]["metrics"]["kl"][
        "value"
    ] == pytest.approx(0.0, abs=1e-6)


@pytest.fixture
def cascade_runs(tmp_path, tiny_recipe_data):
    """Two 4-step LoRA runs probed at every step, scheduled snapshots at 0 and 4: one whose
    thresholds never trigger, one with thresholds 0 (the full battery everywhere)."""
    roots = {}
    for name, limit in (("cheap", 100.0), ("dense", 0.0)):
        data = {
            **tiny_recipe_data,
            "name": name,
            "runs_dir": str(tmp_path / "runs"),
            "train": {**tiny_recipe_data["train"], "steps": 4},
            "snapshots": {"schedule": "at", "at": [4]},
            "evals": {"new": ["numerals"], "general": ["prose_ppl", "base_samples_ppl"], "limit": 4},
            "cascade": {"every": 1, "kl_prompts": 4, "kl_tokens": 8, "cheap_threshold": limit, "kl_threshold": limit},
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        roots[name] = run(load_recipe(path))
    return roots


def test_a_run_scores_cheap_probes_everywhere_and_the_battery_where_decided(cascade_runs, tmp_path, capsys):
    root = cascade_runs["cheap"]
    record = json.loads((root / "manifest.json").read_text())["cascade"]
    assert record["scheduled"] == [0, 4] and record["probe_steps"] == [1, 2, 3]
    assert [record["steps"][s]["full"] for s in ("0", "1", "2", "3", "4")] == [True, False, False, False, True]
    for step, tasks in (
        (2, {"base_samples_ppl", "new_task_kl"}),
        (4, {"base_samples_ppl", "new_task_kl", "numerals", "prose_ppl"}),
    ):
        evaluated = json.loads((root / "evals" / f"step-{step:06d}" / "results.json").read_text())["tasks"]
        assert set(evaluated) == tasks
    assert not any(p.name.endswith("safetensors") for p in (root / "snapshots" / "step-000002").iterdir())
    table = pd.read_csv(root / "curves.csv")
    kl = table[table.task == "new_task_kl"].sort_values("step")
    assert (
        kl["role"].eq("drift").all()
        and kl["step"].tolist() == [0, 1, 2, 3, 4]
        and kl["value"].iloc[0] == pytest.approx(0, abs=1e-6)
    )
    # the KL's change has a paired CI like any probe's: its items are (summed KL, tokens), a ratio of sums
    ci = stats.paired_delta(RunLayout(root), "new_task_kl", "kl", 4)
    assert ci["low"] is not None and ci["delta"] == pytest.approx(kl["value"].iloc[-1]), ci["why"]
    dense = json.loads((cascade_runs["dense"] / "manifest.json").read_text())["cascade"]
    assert all(entry["full"] for entry in dense["steps"].values())
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"general": {"prose_ppl": {"max_drop": 1.0}}}))
    with pytest.raises(gate.GateError, match="step 2 was scored on the cheap probes only"):
        gate.check(root, gate.load_policy(policy), step=2)
    assert cli.main(["report", str(tmp_path / "runs"), "-o", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Cheap probes: KL from the base against forgetting" in md and "## Evaluation cascade" in md
    assert "| cheap | 5 | 0, 4 | – |" in md and "| dense | 5 | 0, 1, 2, 3, 4 |" in md
    analysis = report.analyse([tmp_path / "runs"])
    assert sorted(analysis.drift.groupby("run")["step"].apply(list).to_dict().items()) == [
        ("cheap", [0, 4]),
        ("dense", [0, 1, 2, 3, 4]),
    ]


def test_simulate_replays_the_rule_on_a_dense_run(tmp_path, fake_run, capsys):
    """Steps 0, 5, 10, 20 (scheduled: 0 and 20); the KL reads 0, 0.01, 0.08, 0.1 and the probe's
    accuracy 0.8, 0.6, 0.7, 0.75: a cascade at KL threshold 0.05 scores 0, 10 and 20 fully and
    misses the peak at step 5."""
    items = {0: 16, 5: 12, 10: 14, 20: 15}  # right of 20
    layout = fake_run(
        tmp_path / "dense", {s: {f"i{k}": float(k < right) for k in range(20)} for s, right in items.items()}
    )
    kl = {0: 0.0, 5: 0.01, 10: 0.08, 20: 0.1}
    rest = {0: 10.0, 5: 9.0, 10: 11.0, 20: 90.0}  # a busy machine at step 20: the median (10.5) holds
    layout.update_manifest(
        cascade={
            "scheduled": [0, 20],
            "steps": {
                str(s): {
                    "values": {"new_task_kl": kl[s], "probe_acc": items[s] / 20},
                    "full": True,
                    "reason": "",
                    "cheap_s": 1.0,
                    "kl_s": 0.5,
                    "full_s": rest[s],
                }
                for s in items
            },
        }
    )
    out = cascade.simulate(layout.root, {"new_task_kl": 0.05})
    assert out["full_steps"] == [0, 10, 20] and out["probe_steps"] == [0, 5, 10, 20]
    # the KL alone at every probe step; the cheap probe (1 s) with the battery (10.5 s) at its 3 steps
    assert out["eval_s_everywhere"] == 4 * (1 + 10.5) and out["eval_s_cascade"] == 4 * 0.5 + 3 * 11.5
    assert out["saved"] == pytest.approx(round(1 - 36.5 / 46, 3))
    both = cascade.simulate(layout.root, {"new_task_kl": 0.05, "probe_acc": 1.0})  # the cheap probe everywhere
    assert both["eval_s_cascade"] == 4 * 1.5 + 3 * 10.5
    assert out["peak"] == pytest.approx(0.25) and out["peak_step"] == 5  # 0.8 -> 0.6
    assert out["peak_seen"] == pytest.approx(0.125) and out["peak_seen_step"] == 10  # 0.8 -> 0.7
    assert out["first_at_level"] == 5 and out["first_at_level_seen"] == 10
    assert (
        out["curve_error"] == pytest.approx(0.25 - 0.0625) and out["curve_error_step"] == 5
    )  # 0.125 / 2 drawn at step 5
    assert cascade.simulate(layout.root, {"new_task_kl": 0.005})["full_steps"] == [0, 5, 10, 20]
    with pytest.raises(UserError, match=r"recorded no probe 'probe_ac'; did you mean 'probe_acc'\?"):
        cascade.simulate(layout.root, {"probe_ac": 0.05})  # a typo simulated another cascade in silence
    record = layout.read_manifest()["cascade"]
    for entry in record["steps"].values():
        entry["cheap_s"] = entry["full_s"] = 0.01  # every step read from the result cache
    layout.update_manifest(cascade=record)
    cascade.simulate(layout.root, {"new_task_kl": 0.05})
    assert "read from the result cache, so the times saved mean nothing" in capsys.readouterr().err
    layout.update_manifest(cascade={"scheduled": [0, 20], "steps": {"0": {"values": {}, "full": False}}})
    with pytest.raises(UserError, match=r"cascade\.kl_threshold=0"):
        cascade.simulate(layout.root, {"new_task_kl": 0.05})
