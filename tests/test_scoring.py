"""Packed scoring (shared contexts, logits only where scored) equals lm-eval's HFLM; merged adapters restore the base."""

import pytest
import torch
from lm_eval.models.huggingface import HFLM
from peft import LoraConfig, get_peft_model

from forgetscope import evaluate, models, scoring


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = models.load(models.resolve("tiny-random"))
    return model.eval(), tokenizer


def test_a_line_is_a_prefix_tree_each_request_seeing_its_own_tokens_only():
    tokens, positions, ends, scored = scoring.layout_line([([5, 6, 7], [1, 2, 3]), ([5, 6, 7], [4])])
    assert tokens == [5, 6, 7, 1, 2]  # a continuation's last token is never an input
    assert positions == [0, 1, 2, 3, 4]
    assert scored == [[2, 3, 4], [2]]  # the last context token predicts every first token
    assert scoring.ancestry_mask(ends).tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ]
    tokens, positions, ends, scored = scoring.layout_line([([5, 6], [1, 2]), ([5, 6], [3, 4])])
    assert tokens == [5, 6, 1, 3] and positions == [0, 1, 2, 2]  # both answers start right after the context
    assert scoring.ancestry_mask(ends)[3].tolist() == [
        True,
        True,
        False,
        True,
    ]  # the second answer does not see the first
    assert scored == [[1, 2], [1, 3]]


def test_requests_with_different_contexts_share_their_common_prefix():
    tokens, positions, ends, scored = scoring.layout_line([([1, 2, 4], [8, 7]), ([1, 2, 3], [9]), ([7], [1])])
    assert tokens == [1, 2, 3, 4, 8, 7]  # sorted: [1 2 3], then [1 2 4 8] sharing "1 2", then [7] alone
    assert positions == [0, 1, 2, 2, 3, 0]  # depths: each request at the positions of a separate pass
    assert scored == [[3, 4], [2], [5]]
    mask = scoring.ancestry_mask(ends)
    assert mask[4].tolist() == [True, True, False, True, True, False]  # "8" sees 1 2 4 and itself, not "3"
    assert mask[5].tolist() == [False] * 5 + [True]  # an unrelated request sees nothing else


def test_lines_keep_a_context_together_and_close_at_the_capacity():
    pairs = [([1, 2], [3]), ([1, 2], [4, 5]), ([9], [3]), ([9], [4]), ([1, 2], [6, 7, 8])]
    # [1 2]'s three answers stay together although they take 5 tokens > 4; one-token contexts need not
    assert scoring.plan_lines(pairs, capacity=4, max_length=10) == [[0, 1, 4], [2, 3]]
    assert scoring.plan_lines(pairs, capacity=4, max_length=4) == [[0, 1], [4], [2, 3]]  # but not past max_length
    assert scoring.plan_lines(pairs, capacity=64, max_length=64) == [[0, 1, 4, 2, 3]]


def test_forward_passes_take_lines_of_nearly_equal_length_within_the_budget():
    assert scoring.batch_lines([130, 128, 120, 100, 99, 20], budget=512, slack=16) == [[0, 1, 2], [3, 4], [5]]
    assert scoring.batch_lines([100] * 6, budget=300, slack=16) == [[0, 1, 2], [3, 4, 5]]


def _requests(tokenizer, pairs):
    return [((c, x), tokenizer(c).input_ids, tokenizer(x, add_special_tokens=False).input_ids) for c, x in pairs]


def _separate_pass(model, context: list[int], cont: list[int]) -> tuple[float, bool]:
    logprobs = torch.log_softmax(
        model(torch.tensor([context + cont[:-1]], device=model.device)).logits[0, len(context) - 1 :], dim=-1
    )
    return float(logprobs[range(len(cont)), cont].sum()), logprobs.argmax(-1).tolist() == cont


def test_packed_scores_equal_hflm_and_separate_passes(tiny):
    model, tokenizer = tiny
    pairs = [
        ("The capital of Peru is", " Lima"),
        ("The capital of Peru is", " Quito, of course"),
        ("The capital of Peru is", " Bogota"),
        ("The capital of Peru is", " Bogus"),
        ("The capital of Chile is", " Lima"),
        ("Two plus two", " is four"),
        ("x", " y z w"),
    ]
    requests = _requests(tokenizer, pairs) * 2 + [
        (
            (" ", "tail"),
            [tokenizer.bos_token_id or 0],
            tokenizer("a long tail of text " * 8, add_special_tokens=False).input_ids,
        )
    ]
    context = tokenizer("Two plus two").input_ids
    with torch.no_grad():
        best = [int(model(torch.tensor([context], device=model.device)).logits[0, -1].argmax())]
    requests.append((("Two plus two", "<greedy>"), context, best))  # a greedy answer: "is greedy" is true
    theirs = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=256)._loglikelihood_tokens(requests)
    packed = scoring.PackedLM(pretrained=model, tokenizer=tokenizer, batch_size=3, max_length=256)
    ours = packed._loglikelihood_tokens(requests)
    assert [g for _, g in ours] == [g for _, g in theirs] and ours[-1][1]
    assert [lp for lp, _ in ours] == pytest.approx([lp for lp, _ in theirs], rel=1e-5, abs=1e-5)
    # The same text split differently ("The capital" + " of Peru is Lima") shares every node with
    # "The capital of Peru is" + " Lima". (lm-eval's own dedup of equal inputs scores the two alike.)
    requests += _requests(tokenizer, [("The capital", " of Peru is Lima")])
    with torch.no_grad():
        separate = [_separate_pass(model, context, cont) for _, context, cont in requests]
    ours = packed._loglikelihood_tokens(requests)
    assert [g for _, g in ours] == [g for _, g in separate]
    assert [lp for lp, _ in ours] == pytest.approx([lp for lp, _ in separate], rel=1e-5, abs=1e-5)


def test_packed_rolling_loglikelihood_equals_hflm(tiny):
    from lm_eval.api.instance import Instance

    model, tokenizer = tiny
    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "The quick brown cat", "A different text " * 30, "x"]
    requests = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(texts)]
    theirs = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, max_length=64).loglikelihood_rolling(requests)
    packed = scoring.PackedLM(pretrained=model, tokenizer=tokenizer, batch_size=2, max_length=64)
    assert packed.loglikelihood_rolling(requests) == pytest.approx(theirs, rel=1e-5)
    assert packed.batch_size == 2 and packed.greedy_needed  # restored after the call


def test_requests_longer_than_the_context_go_through_hflm(tiny, monkeypatch):
    model, tokenizer = tiny
    requests = _requests(tokenizer, [("word " * 40, " end"), ("short", " one")])
    packed = scoring.PackedLM(pretrained=model, tokenizer=tokenizer, batch_size=2, max_length=16)
    seen = []
    original = HFLM._loglikelihood_tokens
    monkeypatch.setattr(
        HFLM, "_loglikelihood_tokens", lambda self, reqs, *a: seen.append(len(reqs)) or original(self, reqs, *a)
    )
    ours = packed._loglikelihood_tokens(requests)
    assert seen == [1]  # only the over-long request, truncated from the left as lm-eval does
    theirs = original(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, max_length=16), requests)
    assert [lp for lp, _ in ours] == pytest.approx([lp for lp, _ in theirs], rel=1e-5)


def test_merged_adapters_score_like_the_adapter_and_restore_the_base_exactly(tiny):
    base, _ = models.load(models.resolve("tiny-random"))
    peft = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    before = {k: v.clone() for k, v in peft.state_dict().items()}
    x = torch.arange(12, device=peft.device)[None]
    expected = peft(x).logits
    with evaluate.merged_adapters(peft):
        assert all(layer.merged for layer in peft.modules() if hasattr(layer, "merged"))
        merged = peft(x).logits
    assert torch.allclose(merged, expected, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in peft.state_dict().items())  # bit for bit
    assert not any(getattr(layer, "merged", False) for layer in peft.modules())


def test_scoring_precision_ignores_the_training_autocast_and_bf16_is_opt_in(bf16_accelerator):
    model, _ = models.load(models.resolve("tiny-random"))
    model = bf16_accelerator.prepare(model)  # as the Trainer does
    autocast = []
    model.model.register_forward_hook(lambda *args: autocast.append(torch.is_autocast_enabled(model.device.type)))
    x = torch.arange(5, device=model.device)[None]
    with evaluate.scoring_precision(model, "fp32"):
        out = model(x).logits
    assert autocast == [False] and out.dtype == torch.float32  # fp32 scoring, though training autocasts
    with evaluate.scoring_precision(model, "bf16"):
        assert model(x).logits.dtype == torch.bfloat16  # bf16 only when asked
    model(x)
    assert autocast == [False, True, True]  # the training forward (bf16 autocast) is restored after scoring


def test_the_cache_key_holds_the_precision(tiny, tmp_path, monkeypatch):
    from forgetscope.recipe import EvalConfig

    monkeypatch.setenv("FORGETSCOPE_CACHE", str(tmp_path))
    model, tokenizer = tiny
    suites = [
        evaluate.prepare_suite(EvalConfig(new=["numerals"], general=[], limit=3, precision=p), tmp_path, False)
        for p in ("fp32", "bf16")
    ]
    assert evaluate.evaluate_model(model, tokenizer, suites[0])["cached"] == []
    assert evaluate.evaluate_model(model, tokenizer, suites[1])["cached"] == []  # not fp32's results
    assert evaluate.evaluate_model(model, tokenizer, suites[1])["cached"] == ["numerals"]


def test_a_batch_out_of_memory_is_scored_in_halves(tiny, monkeypatch):
    model, tokenizer = tiny
    requests = _requests(
        tokenizer,
        [
            ("The capital of Peru is", " Lima"),
            ("Two plus two", " is four"),
            ("x", " y z w"),
            ("The capital of Chile is", " Santiago"),
        ],
    )
    packed = scoring.PackedLM(pretrained=model, tokenizer=tokenizer, batch_size=64, max_length=256)
    expected = packed._loglikelihood_tokens(requests)
    original = scoring.PackedLM._score_lines
    sizes = []

    def small_memory(self, lines, targets):
        sizes.append(len(lines))
        if len(lines) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, lines, targets)

    monkeypatch.setattr(scoring.PackedLM, "_score_lines", small_memory)
    monkeypatch.setattr(scoring, "LINE_TOKENS", 8)  # one request a line: several lines a batch
    packed = scoring.PackedLM(pretrained=model, tokenizer=tokenizer, batch_size=64, max_length=256)
    got = packed._loglikelihood_tokens(requests)
    assert max(sizes) > 1 and packed.lines_per_pass == 1  # halved down to single lines, and kept small
    assert [g for _, g in got] == [g for _, g in expected]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in expected], rel=1e-5)
    found = scoring.auto_lines(model, "fp32")
    assert found == 16 if model.device.type == "cpu" else 1 <= found <= scoring.MAX_AUTO_LINES
