"""Sweeps: the forgetting, steps-to-target and matched-learning measures of a sequence run on a
hand-computed fixture, and a sweep folder that accumulates rows and draws its figure."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from forgetscope import cli, models, runner, sweep
from forgetscope.snapshots import RunLayout

# step: (task a, task b) accuracy; stage 1 trains a over steps 1..10, stage 2 trains b over 11..20
CURVE = {0: (0.0, 0.0), 10: (0.9, 0.0), 15: (0.5, 0.6), 20: (0.3, 1.0)}


def fake_sequence(root, curve=CURVE, base="tiny-random"):
    """A finished two-stage run folder: a manifest with its stages and a curves table."""
    root.mkdir(parents=True)
    stages = [
        {"task": "a", "evals": ["a"], "start": 0, "end": 10},
        {"task": "b", "evals": ["b"], "start": 10, "end": 20},
    ]
    (root / "manifest.json").write_text(
        json.dumps({"status": "finished", "stages": stages, "base_path": models.resolve(base)})
    )
    rows = [
        {
            "run": root.name,
            "step": step,
            "task": task,
            "role": "new",
            "metric": metric,
            "value": value if metric == "acc" else -1.0,
            "higher_is_better": True,
        }
        for step, values in curve.items()
        for task, value in zip("ab", values)
        for metric in ("acc", "logprob")
    ]
    pd.DataFrame(rows).to_csv(RunLayout(root).curves, index=False)
    return root


def test_measure_by_hand(tmp_path):
    m = sweep.measure(fake_sequence(tmp_path / "r"), target=0.8)
    assert m["learned"] == pytest.approx(0.9) and m["metric"] == "acc"  # R[1][a]
    assert m["forgetting"] == pytest.approx(0.9 - 0.3)
    assert m["steps_to_target"] == pytest.approx(15 + (0.8 - 0.6) / (1.0 - 0.6) * 5 - 10)  # 7.5 steps into stage 2
    assert m["forgetting_at_target"] == pytest.approx(0.9 - (0.5 + 0.5 * (0.3 - 0.5)))  # a at step 17.5: 0.4
    model, _ = models.load(models.resolve("tiny-random"))
    assert m["params"] == sum(p.numel() for p in model.parameters())
    never = sweep.measure(fake_sequence(tmp_path / "s", {**CURVE, 20: (0.3, 0.7)}), target=0.8)
    assert math.isnan(never["steps_to_target"]) and math.isnan(never["forgetting_at_target"])


def test_a_sweep_runs_every_value_and_accumulates_in_its_folder(tmp_path, monkeypatch, capsys):
    ran = []

    def fake_run(recipe):
        ran.append((recipe.name, recipe.train.lr))
        return fake_sequence(tmp_path / "runs" / recipe.name)

    monkeypatch.setattr(runner, "run", fake_run)
    recipes = sorted(str(p) for p in (Path(__file__).parent.parent / "recipes").glob("capacity*.yaml"))
    out = tmp_path / "sweep"
    assert (
        cli.main(
            ["sweep", *recipes, "--key", "train.lr", "--values", "1e-3", "3e-3", "-o", str(out), "--target", "0.8"]
        )
        == 0
    )
    assert ran == [
        ("capacity-1e-3", 1e-3),
        ("capacity-3e-3", 3e-3),
        ("capacity_replay-1e-3", 1e-3),
        ("capacity_replay-3e-3", 3e-3),
    ]
    assert (
        cli.main(["sweep", recipes[1], "--key", "train.lr", "--values", "1e-2", "-o", str(out), "--target", "0.8"]) == 0
    )
    table = pd.read_csv(out / "sweep.csv")
    assert table["target"].tolist() == [0.8] * 5 and table["set"].isna().all()
    assert len(table) == 5 and table["forgetting"].tolist() == pytest.approx([0.6] * 5)
    assert (out / "sweep.png").stat().st_size > 10_000
    assert (
        cli.main(["sweep", recipes[0], "--key", "train.lr", "--values", "-1", "-o", str(out)]) == 2
    )  # validated first
    assert "train.lr: must be positive" in capsys.readouterr().err and len(ran) == 5
    tiny = str(Path(__file__).parent.parent / "recipes" / "tiny.yaml")
    assert cli.main(["sweep", recipes[0], tiny, "--key", "train.lr", "--values", "1e-3", "-o", str(out)]) == 2
    assert "a sweep runs recipes of stages" in capsys.readouterr().err and len(ran) == 5  # nothing ran


def test_an_unusable_sweep_folder_is_refused_before_anything_trains(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(runner, "run", lambda recipe: ran.append(recipe.name))
    recipe = str(Path(__file__).parent.parent / "recipes" / "capacity.yaml")
    (tmp_path / "afile").write_text("")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "sweep.csv").write_text("a,b\n1,2\n")
    for out in ("afile", "foreign"):
        assert cli.main(["sweep", recipe, "--key", "train.lr", "--values", "1e-3", "-o", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "is a file, not a folder" in err[0] and "not a sweep table" in err[1] and ran == []


CAPACITY = str(Path(__file__).parent.parent / "recipes" / "capacity.yaml")
SPELT_OTHERWISE = str(Path(__file__).parent.parent / "recipes" / ".." / "recipes" / "capacity.yaml")


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--values", "1e-3", "0.001"], "--values 0.001: the same train.lr as 1e-3 (0.001); give each value once"),
        (["--values", "1e-3", "1e-3"], "--values 1e-3: given twice; give each value once"),
        ([SPELT_OTHERWISE, "--values", "1e-3"], f"{SPELT_OTHERWISE}: the recipe is given twice"),
        (["--values", "1e-3", "--set", "train.lr=5"], "--set train.lr=5: gives the swept --key train.lr too"),
        (["--values", "1e-3", "--set", "train={lr: 5}"], "--set train={lr: 5}: gives the swept --key train.lr too"),
        (["--values", "abc"], "--values abc: train.lr: expected number"),
        (["--values", "["], "--values '[': not YAML"),
        (["--key", "name", "--values", "a", "b"], "--key name: not a setting of the training"),
        (["--key", "runs_dir", "--values", "a"], "--key runs_dir: not a setting of the training"),
        (["--key", "train.nope", "--values", "1"], "--key train.nope: unknown key (allowed: lr, "),
        (["--key", "trian.lr", "--values", "1"], "--key trian.lr: trian: unknown key; did you mean 'train'?"),
        (["--key", "", "--values", "1"], "--key '': not a field; give one as for --set, e.g. --key train.lr"),
        (["--key", "stages.5.lr", "--values", "1"], f"--key stages.5.lr: {CAPACITY}: there is no item 5"),
        (
            ["--values", "1e-3", "--target", "90"],
            "--target 90: outside the range of acc (0 to 1) of digits_reverse, a new task of capacity-1e-3",
        ),
    ],
)
def test_a_sweep_refuses_a_bad_key_value_or_set_before_anything_trains(tmp_path, monkeypatch, capsys, args, problem):
    ran = []
    monkeypatch.setattr(runner, "run", lambda recipe: ran.append(recipe.name))
    key = [] if "--key" in args else ["--key", "train.lr"]
    assert cli.main(["sweep", CAPACITY, *args, *key, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"forgetscope: error: {err.removeprefix('forgetscope: error: ').strip()}\n"  # one line
    assert problem in err and "--set train.lr=" not in err.replace("--set train.lr=5", "")
    assert ran == [] and not (tmp_path / "out").exists()


def test_a_sweep_folder_holds_one_key_and_each_setting_once(tmp_path, monkeypatch, capsys):
    def fake_run(recipe):
        root = tmp_path / "runs" / recipe.name
        return root if root.exists() else fake_sequence(root)

    monkeypatch.setattr(runner, "run", fake_run)
    out = tmp_path / "sweep"
    assert cli.main(["sweep", CAPACITY, "--key", "train.lr", "--values", "1e-3", "-o", str(out)]) == 0
    table = (out / "sweep.csv").read_bytes()
    twin = tmp_path / "twin.yaml"  # another recipe file with the same `name:`
    twin.write_text(Path(CAPACITY).read_text())
    refused = {
        ("--key", "train.weight_decay", "--values", "0.1"): f"{out / 'sweep.csv'}: holds a sweep of --key train.lr, "
        "not train.weight_decay; sweep train.weight_decay into another -o folder",
        ("--key", "train.lr", "--values", "0.001"): f"--values 0.001: {out / 'sweep.csv'} already has capacity at "
        "train.lr=1e-3 (run capacity-1e-3), the same setting",
        # rows measured at another target, or made with other overrides, would mix in one figure
        ("--key", "train.lr", "--values", "3e-3", "--target", "0.5"): f"--target 0.5: {out / 'sweep.csv'} holds "
        "rows made with --target none; give the same --target, or sweep into another -o folder",
        ("--key", "train.lr", "--values", "3e-3", "--set", "train.weight_decay=0.5"): "--set train.weight_decay=0.5: "
        f"{out / 'sweep.csv'} holds rows made with --set none",
    }
    for args, problem in refused.items():
        assert cli.main(["sweep", CAPACITY, *args, "-o", str(out)]) == 2
        assert problem in capsys.readouterr().err
    assert cli.main(["sweep", str(twin), "--key", "train.lr", "--values", "1e-3", "-o", str(out)]) == 2
    assert "already has run capacity-1e-3 from recipe capacity" in capsys.readouterr().err
    assert cli.main(["sweep", CAPACITY, str(twin), "--key", "train.lr", "--values", "3e-3", "-o", str(out)]) == 2
    assert "would both be run capacity-3e-3; give each recipe its own `name:`" in capsys.readouterr().err
    assert (out / "sweep.csv").read_bytes() == table  # the finished sweep is untouched
    assert cli.main(["sweep", CAPACITY, "--key", "train.lr", "--values", "1e-3", "3e-3", "-o", str(out)]) == 0
    assert pd.read_csv(out / "sweep.csv", dtype={"value": str})["value"].tolist() == ["1e-3", "3e-3"]
