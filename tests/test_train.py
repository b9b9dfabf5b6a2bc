"""Training speed options: packed batches train exactly like padded ones, compiled blocks keep the
model's names, and a compiled run trains and scores."""

import pytest
import torch

from forgetscope import data, models, train
from forgetscope.load import recipe_from_dict
from forgetscope.recipe import TaskConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _examples(tokenizer):
    records = [{"prompt": f"Question {i}?" + " filler" * (i % 5), "completion": f"Answer {i * 7}."} for i in range(7)]
    return data.tokenize(records, tokenizer, TaskConfig(name=None, chat_template="off"), 64)


def test_packed_batches_give_the_padded_loss_and_gradients():
    model, tokenizer = models.load(models.resolve("tiny-random"))
    model = model.to(DEVICE).float()
    examples = _examples(tokenizer)
    packed = data.pack(examples, capacity=64, pad_id=tokenizer.pad_token_id)
    assert packed["input_ids"].shape[0] < len(examples)  # fewer rows than examples: they share rows
    assert int((packed["labels"] != -100).sum()) == sum(
        sum(label != -100 for label in e["labels"][1:]) for e in examples
    )

    from transformers import DataCollatorForSeq2Seq

    padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)(examples)
    losses, grads = [], []
    for batch in (padded, packed):
        model.zero_grad()
        loss = model(**{k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)  # attention stays within each example
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_pack_fills_rows_longest_first_and_pads_only_row_ends():
    examples = [{"input_ids": [1] * n, "labels": [5] * n} for n in (5, 3, 2, 4)]
    batch = data.pack(examples, capacity=7, pad_id=0)
    assert batch["input_ids"].shape == (2, 7)  # rows: 5 + 2 and 4 + 3
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 3, 0, 1, 2]]
    assert batch["labels"][0].tolist() == [-100, 5, 5, 5, 5, -100, 5]
    tail = data.pack(examples[:2], capacity=9, pad_id=0)  # 5 + 3 in one row of width 8: no tail
    assert tail["input_ids"].shape == (1, 8)


def test_compiled_blocks_keep_the_model_as_it_was():
    model, _ = models.load(models.resolve("tiny-random"))
    names = list(model.state_dict())
    assert train.compile_blocks(model) == model.config.num_hidden_layers
    assert list(model.state_dict()) == names  # in place: snapshots, fingerprints and peft see the same model


@pytest.mark.slow
def test_a_packed_compiled_run_trains_and_scores(tmp_path, tiny_recipe_data):
    from forgetscope.runner import run

    data_ = {
        **tiny_recipe_data,
        "method": "full",
        "lora": None,
        "runs_dir": str(tmp_path),
        "train": {**tiny_recipe_data["train"], "packing": True, "compile": True, "lr": 3e-2, "steps": 6},
    }
    root = run(recipe_from_dict(data_))
    import pandas as pd

    log = pd.read_csv(root / "train_log.csv")
    assert log["loss"].iloc[-1] < log["loss"].iloc[0]
    assert set(pd.read_csv(root / "curves.csv")["step"]) == {0, 1, 3, 6}  # the schedule, and the model trained


def test_deterministic_runs_repeat_bit_for_bit(tmp_path, tiny_recipe_data):
    """``train.deterministic``: two runs of one recipe write identical adapters at every snapshot, so
    the second run's scores come from the result cache (on CUDA too, where kernels are otherwise
    free to sum in any order)."""
    from forgetscope.runner import run

    roots = []
    try:
        for name in ("first", "second"):
            data_ = {
                **tiny_recipe_data,
                "name": name,
                "runs_dir": str(tmp_path),
                "train": {**tiny_recipe_data["train"], "deterministic": True},
            }
            roots.append(run(recipe_from_dict(data_)))
    finally:
        torch.use_deterministic_algorithms(False)  # the Trainer switched it on for the whole process
    for step in ("step-000001", "step-000003"):
        files = sorted(p.name for p in (roots[0] / "snapshots" / step).glob("*.safetensors"))
        assert files
        for name in files:
            assert (roots[0] / "snapshots" / step / name).read_bytes() == (
                roots[1] / "snapshots" / step / name
            ).read_bytes()
