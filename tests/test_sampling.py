"""The sampler: greedy decoding equals transformers' generate token for token, sampling is seeded,
and the returned ids are exactly the sequence the model wrote."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from forgetscope import models, sampling

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def lively(request):
    """A random Llama whose greedy continuations vary (large initial weights), with the byte tokenizer."""
    tokenizer = models.byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.3,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(DEVICE).eval()
    model.config._attn_implementation = request.param
    return model, tokenizer


PROMPTS = ["Hello there", "", "A much longer prompt with many words in it", "x", "The capital of Peru is"]


def test_greedy_equals_generate_token_for_token(lively):
    model, tokenizer = lively
    rows = sampling.generate(model, tokenizer, PROMPTS, False, 16, 0.0, 1.0, seed=0)
    assert len({tuple(r["completion_ids"]) for r in rows}) > 1  # the model is not degenerate
    for prompt, row in zip(PROMPTS, rows):
        ids = torch.tensor([row["prompt_ids"]], device=DEVICE)
        with torch.no_grad():
            theirs = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=16,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )[0, ids.shape[1] :].tolist()
        assert row["completion_ids"] == theirs[: len(row["completion_ids"])]
        assert row["prompt_ids"] == sampling.prompt_ids(prompt, tokenizer, chat=False)
        assert row["text"] == tokenizer.decode(row["completion_ids"], skip_special_tokens=True).strip()


def test_batches_and_padding_do_not_change_the_tokens(lively, monkeypatch):
    model, tokenizer = lively
    together = sampling.generate(model, tokenizer, PROMPTS, False, 10, 0.0, 1.0, seed=0)
    monkeypatch.setattr(sampling, "batch_size", lambda *a: 2)  # batches of 2, the last one filled up
    apart = sampling.generate(model, tokenizer, PROMPTS, False, 10, 0.0, 1.0, seed=0)
    assert [r["completion_ids"] for r in apart] == [r["completion_ids"] for r in together]


def test_sampling_is_seeded_and_stops_at_the_end_token(lively):
    model, tokenizer = lively
    first = sampling.generate(model, tokenizer, PROMPTS * 4, False, 24, 1.0, 0.9, seed=3)
    again = sampling.generate(model, tokenizer, PROMPTS * 4, False, 24, 1.0, 0.9, seed=3)
    other = sampling.generate(model, tokenizer, PROMPTS * 4, False, 24, 1.0, 0.9, seed=4)
    assert [r["completion_ids"] for r in first] == [r["completion_ids"] for r in again]
    assert [r["completion_ids"] for r in first] != [r["completion_ids"] for r in other]
    for row in first:
        ends = [k for k, t in enumerate(row["completion_ids"]) if t == tokenizer.eos_token_id]
        assert ends in ([], [len(row["completion_ids"]) - 1])  # nothing after the end token
        assert len(row["completion_ids"]) == 24 or ends


def test_top_p_keeps_the_smallest_set_that_reaches_it():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    drawn = {int(sampling.pick(logits, 1.0, 0.8, generator)) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reaches 0.8: the tail is cut
    assert {int(sampling.pick(logits, 1.0, 0.81, generator)) for _ in range(300)} == {0, 1, 2}
    assert int(sampling.pick(logits, 0.0, 1.0, generator)) == 0  # temperature 0: greedy


def test_top_p_beyond_the_candidates_sorts_the_whole_vocabulary(monkeypatch):
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", 2)  # the two most likely hold 0.5 + 0.3 < 0.9
    logits = torch.log(torch.tensor([[0.05, 0.3, 0.15, 0.5]]))
    generator = torch.Generator().manual_seed(0)
    drawn = {int(sampling.pick(logits, 1.0, 0.9, generator)) for _ in range(300)}
    assert drawn == {3, 1, 2}  # the nucleus of 0.9 has three tokens: found by sorting all four
    assert {int(sampling.pick(logits, 1.0, 0.8, generator)) for _ in range(300)} == {3, 1}


def test_only_the_rows_whose_candidates_fall_short_sort_the_vocabulary(monkeypatch):
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", 2)
    # row 0: its two candidates hold 0.95, enough for 0.9; row 1: 0.8, so it sorts all four
    logits = torch.log(torch.tensor([[0.6, 0.35, 0.04, 0.01], [0.05, 0.3, 0.15, 0.5]]))
    generator = torch.Generator().manual_seed(0)
    draws = [sampling.pick(logits, 1.0, 0.9, generator).tolist() for _ in range(300)]
    assert {row0 for row0, _ in draws} == {0, 1}
    assert {row1 for _, row1 in draws} == {3, 1, 2}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_the_cuda_graph_decodes_like_the_eager_step(lively, monkeypatch):
    model, tokenizer = lively
    graphed = sampling.generate(model, tokenizer, PROMPTS * 3, False, 20, 0.0, 1.0, seed=0)

    def refuse(*args, **kwargs):
        raise RuntimeError("capture refused")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", refuse)  # the fallback: the same step, run eagerly
    eager = sampling.generate(model, tokenizer, PROMPTS * 3, False, 20, 0.0, 1.0, seed=0)
    assert [r["completion_ids"] for r in graphed] == [r["completion_ids"] for r in eager]
