"""Each scorer against values computed by hand on a seeded tiny Llama (one unpadded forward at a time)."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipelines.config.formats import GenerateScoring
from pipelines.data.tokens import prompt_ids
from pipelines.runtime.models import char_tokenizer
from pipelines.scoring.extract import extract, is_correct, reference
from pipelines.scoring.scorers import (
    choice_pairs,
    context_limit,
    generate_texts,
    pair_loglikelihoods,
    score_generate,
    score_generate_rows,
    score_multiple_choice,
    score_multiple_choice_rows,
    score_perplexity,
    score_perplexity_rows,
)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    """Random weights with a wide init, so greedy outputs differ between prompts; GQA (4 heads, 2 KV heads)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def manual_greedy(model, tok, prompt: str, max_new: int) -> str:
    ids = prompt_ids(tok, prompt)
    out = []
    for _ in range(max_new):
        nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
    return tok.decode(out, skip_special_tokens=True)


@torch.no_grad()
def manual_loglikelihood(model, ctx: list[int], cont: list[int]) -> float:
    logp = model(input_ids=torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
    return float(sum(logp[len(ctx) - 1 + k, t] for k, t in enumerate(cont)))


@pytest.mark.parametrize(
    "extractor,text,expected",
    [
        ("exact", "  42 \n", "42"),
        ("gsm8k", "3 + 4 = 7\n#### 1,007", "1007"),
        ("gsm8k", "the answer is 7", None),
        ("last_number", "first 3, then $1,250.", "1250"),
        ("last_number", "-4 and 2.5", "2.5"),
        ("last_number", "no digits here", None),
    ],
)
def test_extractors(extractor, text, expected):
    assert extract(text, extractor) == expected


def test_regex_extractor_and_references():
    pattern = r"The answer is:?\s*([^\n]+)"
    assert extract("work...\nThe answer is: 18.\nQuestion: next", "regex", pattern) == "18"
    assert reference(" 3 + 4 = 7\n#### 7", "gsm8k") == "7" and reference("18", "gsm8k") == "18"
    assert reference(" so 2 * 9 = 18\n#### 18", "last_number") == "18"
    assert is_correct("I think 2,000 cars.", " ... #### 2000", "last_number")
    assert not is_correct("#### 7", " ... #### 8", "gsm8k") and not is_correct("none", "#### 8", "gsm8k")
    assert is_correct(" abc ", "abc", "exact") and not is_correct("abcd", "abc", "exact")


def test_batched_generation_equals_the_greedy_loop(model, tok):
    prompts = ["copy ab=", "What is 2+2?", "x", "reverse hello=", "Question: 7\nAnswer:", "q"]
    expected = [manual_greedy(model, tok, p, 8) for p in prompts]
    assert len(set(expected)) == len(prompts)  # the fixture model does distinguish the prompts
    got = generate_texts(model, tok, [prompt_ids(tok, p) for p in prompts], batch_size=4, max_new_tokens=8)
    assert got == expected
    stop = expected[1][3]  # a character the second generation produces
    cut = generate_texts(model, tok, [prompt_ids(tok, p) for p in prompts], batch_size=4, max_new_tokens=8, stop=[stop])
    assert cut == [e.split(stop, 1)[0] for e in expected]
    rows = [
        {"prompt": p, "answer": e if i % 2 == 0 else e + "!"}
        for i, (p, e) in enumerate(zip(prompts, expected, strict=True))
    ]
    scored = score_generate(model, tok, rows, GenerateScoring(), batch_size=3, max_new_tokens=8)
    assert scored == {"accuracy": 0.5}


def mc_rows():
    return [
        {"prompt": "Question: sky?\nAnswer:", "choices": ["blue", "green", "a long wrong answer"], "label": 0},
        {"prompt": "Q: 1+1\nA:", "choices": ["2", "3"], "label": 1},
        {
            "prompt": "",
            "contexts": ["The cup fell because the cup", "The cup fell because the table"],
            "choices": ["was near the edge.", "was near the edge."],
            "label": 0,
        },
        {"prompt": "Pick:", "choices": ["x", "yy", "zzz", "w"], "label": 3},
        {"prompt": "A much longer context that needs left padding in its batch:", "choices": ["ok", "no"], "label": 0},
    ]


def test_multiple_choice_ranking_equals_a_manual_loop_over_choices(model, tok):
    rows = mc_rows()
    pairs = [choice_pairs(tok, r, None) for r in rows]
    manual = [[manual_loglikelihood(model, c, t) for c, t in ex] for ex in pairs]
    for batch_size in (1, 3, 16):  # one example at a time, examples split across batches, everything at once
        got = pair_loglikelihoods(model, pairs, batch_size=batch_size, pad=tok.pad_token_id)
        assert [len(g) for g in got] == [len(m) for m in manual]
        torch.testing.assert_close(
            torch.tensor([v for g in got for v in g]),
            torch.tensor([v for m in manual for v in m]),
            atol=1e-4,
            rtol=1e-5,
        )
    acc = sum(max(range(len(m)), key=lambda i: m[i]) == r["label"] for m, r in zip(manual, rows, strict=True)) / len(
        rows
    )
    acc_norm = sum(
        max(range(len(m)), key=lambda i: m[i] / len(r["choices"][i])) == r["label"]
        for m, r in zip(manual, rows, strict=True)
    ) / len(rows)
    gold_tokens = sum(len(p[r["label"]][1]) for p, r in zip(pairs, rows, strict=True))
    nll = -sum(m[r["label"]] for m, r in zip(manual, rows, strict=True)) / gold_tokens
    scored = score_multiple_choice(model, tok, rows, batch_size=4)
    assert scored["acc"] == acc and scored["acc_norm"] == acc_norm
    assert scored["nll"] == pytest.approx(nll, rel=1e-5)
    assert scored["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_multiple_choice_contexts_are_cut_from_the_left_to_fit(model, tok):
    row = {"prompt": "z" * 80, "choices": ["a", "bb"], "label": 0}
    pairs = choice_pairs(tok, row, limit=64)
    assert all(len(c) + len(t) <= 64 and c == prompt_ids(tok, row["prompt"])[-(64 - len(t)) :] for c, t in pairs)
    assert context_limit(model) == 64
    scored = score_multiple_choice(model, tok, [row], batch_size=2)  # the model's 64 positions apply by default
    manual = [manual_loglikelihood(model, c, t) for c, t in pairs]  # the cut pairs, as a manual loop scores them
    assert scored["nll"] == pytest.approx(-manual[0] / len(pairs[0][1]), rel=1e-5)
    assert scored["acc"] == float(max(range(2), key=lambda i: manual[i]) == 0)


def test_perplexity_is_the_mean_target_token_nll(model, tok):
    rows = [
        {"prompt": "", "answer": "some plain text"},
        {"prompt": "Q:", "answer": " an answer"},
        {"prompt": "", "answer": "x"},
    ]
    total, count = 0.0, 0
    for r in rows:
        ctx = prompt_ids(tok, r["prompt"])
        target = tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        total -= manual_loglikelihood(model, ctx, target)
        count += len(target)
    scored = score_perplexity(model, tok, rows, batch_size=2, max_length=64)
    assert scored["nll"] == pytest.approx(total / count, rel=1e-5)
    assert scored["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_each_row_has_its_share_of_every_score_in_the_rows_order(model, tok):
    """lambda auto compares two adapters row by row: each scorer's per-row shares are the rows' own values (the
    manual loop's, row by row, whatever the batching and length sort), and their mean is the score."""
    rows = [
        {"prompt": "", "answer": "some plain text"},
        {"prompt": "Q:", "answer": " an answer"},
        {"prompt": "", "answer": "x"},
        {"prompt": "A longer prompt here:", "answer": " mid"},
    ]
    sums, counts = [], []
    for r in rows:
        ctx = prompt_ids(tok, r["prompt"])
        target = tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        sums.append(-manual_loglikelihood(model, ctx, target))
        counts.append(len(target))
    values, shares = score_perplexity_rows(model, tok, rows, batch_size=3, max_length=64)
    assert values == score_perplexity(model, tok, rows, batch_size=3, max_length=64)
    expected = [s * len(rows) / sum(counts) for s in sums]  # a row's summed NLL, scaled so the mean is the score
    assert shares["nll"] == pytest.approx(expected, rel=1e-5)
    assert sum(shares["nll"]) / len(rows) == pytest.approx(values["nll"], rel=1e-9)

    mc = mc_rows()
    values, shares = score_multiple_choice_rows(model, tok, mc, batch_size=2)
    assert values == score_multiple_choice(model, tok, mc, batch_size=2)
    for key in ("acc", "acc_norm", "nll"):
        assert sum(shares[key]) / len(mc) == pytest.approx(values[key], rel=1e-9)
    assert set(shares["acc"]) <= {0.0, 1.0}
    alone = [score_multiple_choice(model, tok, [r], batch_size=2) for r in mc]  # each row scored by itself
    assert shares["acc"] == [a["acc"] for a in alone] and shares["acc_norm"] == [a["acc_norm"] for a in alone]

    prompts = ["ab", "ba", "aab", "bba"]
    texts = generate_texts(model, tok, [prompt_ids(tok, p) for p in prompts], batch_size=4, max_new_tokens=6)
    pairs = enumerate(zip(prompts, texts, strict=True))
    gen = [{"prompt": p, "answer": t if i in (1, 2) else t + "!"} for i, (p, t) in pairs]
    values, shares = score_generate_rows(model, tok, gen, GenerateScoring(), batch_size=3, max_new_tokens=6)
    assert shares == {"accuracy": [0.0, 1.0, 1.0, 0.0]} and values == {"accuracy": 0.5}
