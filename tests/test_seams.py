"""The library internals forgetscope relies on (forgetscope/seams.py), each checked against the
installed versions: a failure here names the seam to update after a library upgrade."""

import inspect

import pytest
import torch
from lm_eval.models.huggingface import HFLM

from forgetscope import models, registry, seams

UPGRADE = f"(checked with {seams.CHECKED}); update forgetscope/seams.py"


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = models.load(models.resolve("tiny-random"))
    return model.eval(), tokenizer


def test_lm_eval_reads_task_yamls_with_its_private_loader():
    spec = seams.load_task_yaml(registry.evals_dir() / "base_samples_ppl.yaml")
    assert spec.get("task") == "base_samples_ppl", f"lm_eval.tasks._yaml_loader.load_yaml changed {UPGRADE}"
    unresolved = seams.load_task_yaml(registry.evals_dir() / "base_samples_ppl.yaml", resolve_func=False)
    assert unresolved.get("task") == "base_samples_ppl", f"load_yaml(resolve_func=False) changed {UPGRADE}"


def test_hflm_takes_its_batch_size_ranks_and_scoring_hook_where_we_set_them(tiny):
    model, tokenizer = tiny
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    with seams.hflm_batch_size(lm, 7):
        assert lm.batch_size == 7, f"HFLM.batch_size no longer reads batch_size_per_gpu {UPGRADE}"
    assert lm.batch_size == 4
    seams.set_hflm_ranks(lm, 1, 3)
    assert (lm.rank, lm.world_size) == (1, 3), f"HFLM.rank/world_size no longer read _rank/_world_size {UPGRADE}"
    parameters = list(inspect.signature(HFLM._loglikelihood_tokens).parameters)
    assert parameters[:4] == ["self", "requests", "disable_tqdm", "override_bs"], (
        f"HFLM._loglikelihood_tokens, which PackedLM overrides, changed its signature {UPGRADE}"
    )


def test_hflm_re_ties_weights_unless_skipped(tiny):
    model, tokenizer = tiny
    calls = []
    model.tie_weights = lambda *a, **k: calls.append("tied")
    try:
        HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
        assert calls, f"HFLM no longer calls tie_weights: tie_weights_skipped may go {UPGRADE}"
        calls.clear()
        with seams.tie_weights_skipped(model):
            HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
        assert calls == []
    finally:
        del model.tie_weights


def test_loglikelihood_requests_are_rewritten_as_they_are_built():
    manager = registry.task_manager((str(registry.evals_dir()),), defaults=False)
    task = manager.load("numerals")["tasks"]["numerals"]
    seams.rewrite_loglikelihood_requests(task, lambda context, target: (context + "|", target))
    task.build_all_requests(limit=2, rank=0, world_size=1)
    assert task.instances and all(i.arguments[0].endswith("|") for i in task.instances), (
        f"Task.construct_requests no longer builds the requests {UPGRADE}"
    )


def test_a_metric_lm_eval_cannot_resolve_is_found(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"prompt": "Q:", "completion": " A"}\n')
    for name, metric in (("known", "acc"), ("unknown", "accuracy")):
        (tmp_path / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\n"
            f"dataset_kwargs: {{data_files: {{test: {tmp_path / 't.jsonl'}}}}}\ntest_split: test\n"
            'output_type: loglikelihood\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{completion}}"\n'
            f"metric_list: [{{metric: {metric}, aggregation: mean, higher_is_better: true}}]\n"
        )
    tasks = registry.task_manager((str(tmp_path),), defaults=False).load(["known", "unknown"])["tasks"]
    assert seams.unresolved_metrics(tasks["known"]) == [], f"ConfigurableTask._metric_fn_list changed {UPGRADE}"
    assert seams.unresolved_metrics(tasks["unknown"]) == ["accuracy"], (
        f"ConfigurableTask._metric_fn_list no longer holds None for a metric it cannot resolve {UPGRADE}"
    )


def test_generated_text_is_rewritten_before_the_filters(tmp_path):
    (tmp_path / "said.jsonl").write_text('{"prompt": "Q:", "completion": "A1"}\n')
    (tmp_path / "said.yaml").write_text(
        "task: said\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {tmp_path / 'said.jsonl'}}}}}\ntest_split: test\n"
        'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{completion}}"\n'
        "filter_list: [{name: lower, filter: [{function: lowercase}, {function: take_first}]}]\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    task = registry.task_manager((str(tmp_path),), defaults=False).load("said")["tasks"]["said"]
    seams.rewrite_generated_text(task, lambda context, doc, text: f"{context}|{doc['completion']}|{text}")
    task.build_all_requests(limit=1, rank=0, world_size=1)
    for instance in task.instances:
        instance.resps.append(" A1")  # as the evaluator files the model's answer
    task.apply_filters()
    assert [i.filtered_resps["lower"] for i in task.instances] == ["q:|a1| a1"], (
        f"Task.apply_filters no longer filters Instance.resps after generation {UPGRADE}"
    )


def test_accelerate_mixed_precision_keeps_the_plain_forward(bf16_accelerator):
    model, _ = models.load(models.resolve("tiny-random"))
    prepared = bf16_accelerator.prepare(model)
    x = torch.arange(6, device=prepared.device)[None]
    autocast = []
    prepared.model.register_forward_hook(lambda *args: autocast.append(torch.is_autocast_enabled(prepared.device.type)))
    prepared(x)
    assert autocast == [True], "accelerate's bf16 mixed precision did not autocast the forward pass"
    assert "_original_forward" in vars(prepared), f"accelerate no longer keeps _original_forward {UPGRADE}"
    with seams.plain_forward(prepared):
        prepared(x)
    assert autocast == [True, False]  # the model's own forward: no autocast
    prepared(x)
    assert autocast[-1] is True  # the training forward is back


def test_four_dimensional_masks_pass_through_as_given(tiny):
    model, _ = tiny
    ids = torch.arange(5, device=model.device)[None]
    allowed = torch.ones(5, 5, dtype=torch.bool, device=model.device).tril()
    allowed[3:, :3] = False  # the last two tokens form a block of their own
    for implementation in ("sdpa", "eager"):
        model.config._attn_implementation = implementation
        masked = model(ids, attention_mask=seams.attention_mask(model, allowed[None, None])).logits[0, 4]
        positions = torch.arange(5, device=model.device)[None]
        alone = model(ids[:, 3:], position_ids=positions[:, 3:]).logits[0, 1]  # the block alone, at its positions
        assert torch.allclose(masked, alone, atol=1e-5), f"transformers changed how it takes a 4D mask {UPGRADE}"
    model.config._attn_implementation = "sdpa"


def test_the_cpu_bf16_check_answers():
    assert isinstance(seams.cpu_has_bf16(), bool)


def test_the_static_cache_advances_one_position_per_token_fed(tiny):
    model, _ = tiny
    cache = seams.static_cache(model, 12)
    ids = torch.arange(4, device=model.device)[None]
    model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(4, device=model.device))
    model(ids[:, :1], past_key_values=cache, use_cache=True, cache_position=torch.tensor([4], device=model.device))
    assert cache.get_seq_length() == 5, f"StaticCache no longer fills one position per token {UPGRADE}"


def test_lm_eval_ships_the_mmlu_exemplars():
    import json

    exemplars = json.loads(seams.lm_eval_mmlu_exemplars())
    assert len(exemplars) >= 50, f"lm-eval's mmlu/flan_cot_fewshot/_cot_prompts.json moved or changed {UPGRADE}"


def test_a_trainer_told_so_divides_a_micro_batch_mean_by_the_accumulation_steps(tiny, tmp_path):
    import datasets
    from transformers import Trainer, TrainingArguments

    model, _ = tiny
    args = TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=2, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list([{"input_ids": [1, 2]}]))
    trainer.compute_loss = lambda model, inputs, **kwargs: sum(p.sum() for p in model.parameters()) * 0 + 1.0
    seams.average_loss_over_accumulation(trainer)
    trainer.current_gradient_accumulation_steps = 2
    loss = trainer.training_step(
        model.train(), {"input_ids": torch.tensor([[1, 2]])}, num_items_in_batch=torch.tensor(2)
    )
    assert float(loss) == pytest.approx(0.5), f"Trainer no longer reads model_accepts_loss_kwargs {UPGRADE}"


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_the_compiled_loss_is_the_loss_the_model_computes(lora):
    from peft import LoraConfig, get_peft_model

    model, _ = models.load(models.resolve("tiny-random"))
    if lora:
        model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0)).to(model.device)
    labels = ids.clone()
    labels[0, :4] = -100
    eager = model(input_ids=ids, labels=labels).loss
    seams.compile_loss(model)
    inner = model.get_base_model() if lora else model
    compiled, calls = inner.loss_function, []
    inner.loss_function = lambda *args, **kwargs: calls.append(1) or compiled(*args, **kwargs)
    loss = model(input_ids=ids, labels=labels).loss
    assert calls, f"the model no longer computes its loss through its loss_function {UPGRADE}"
    assert torch.allclose(loss, eager, rtol=1e-5)


def test_lm_eval_compiles_each_template_once():
    from lm_eval import utils

    seams.cache_lm_eval_templates()
    seams.cache_lm_eval_templates()  # idempotent: one cache, not a cache of a cache
    hits = utils.env.from_string.cache_info().hits
    assert [utils.apply_template("{{a}} =", {"a": a}) for a in (1, 2)] == ["1 =", "2 ="]
    assert utils.env.from_string.cache_info().hits == hits + 1, (
        f"lm_eval.utils.apply_template no longer compiles through env.from_string {UPGRADE}"
    )


def test_lora_target_matches_follows_peft():
    for targets, name, expected in [
        (["q_proj"], "model.layers.0.self_attn.q_proj", True),
        (["self_attn.q_proj"], "model.layers.0.self_attn.q_proj", True),
        (["q_proj"], "model.layers.0.self_attn.k_proj", False),
        (r".*\.(q|v)_proj", "model.layers.1.self_attn.v_proj", True),
        ("q_proj", "model.layers.1.self_attn.q_proj", False),  # a string is a regex over the whole name
    ]:
        assert seams.lora_target_matches(targets, name) is expected, f"{targets} vs {name} {UPGRADE}"


def test_quiet_too_long_warning_silences_the_tokenizers_length_warning(monkeypatch):
    from transformers import tokenization_utils_base

    said = []
    monkeypatch.setattr(tokenization_utils_base.logger, "warning", lambda message, *a, **k: said.append(message))
    loud, quiet = models.byte_tokenizer(), models.byte_tokenizer()  # model_max_length 512
    loud("x" * 600)
    assert any("Token indices sequence length" in m for m in said)
    said.clear()
    seams.quiet_too_long_warning(quiet)
    quiet("x" * 600)
    assert said == [], UPGRADE
