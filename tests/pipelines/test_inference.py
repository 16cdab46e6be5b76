"""The model the scorers run (a LoRA adapter merged into a copy, torch's own linear layers) and the greedy loop.

Tolerance of the merge, float32: summed log-likelihoods atol 1e-4, mean target NLL rel 1e-5, greedy completions
identical. Measured on the demo (its base, a LoRA of the demo's settings with B drawn at the trained adapters'
scale, std 0.08): logits move by <= 2.1e-5 and the NLL of the 800 evaluation rows by <= 1.5e-6 relative, so the
bounds leave 5-7x headroom over float32 rounding, while the adapter itself moves the NLL by far more (checked).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pipelines.scoring.greedy as greedy
from pipelines.config import load_config
from pipelines.data.sources import load_domain
from pipelines.data.tokens import encode, fixed_batches, prompt_ids
from pipelines.runtime.models import char_tokenizer, export_merged, load_base, load_for_inference, new_adapter
from pipelines.scoring.inference import inference_model, merged_copy, torch_linear
from pipelines.scoring.scorers import complete, generate_texts, left_pad, pair_loglikelihoods, target_nll
from tests.conftest import ROOT

DEMO = ROOT / "configs" / "demo.yaml"


def demo_adapter(base, std: float = 0.08):
    """A LoRA of the demo's settings on ``base``, B drawn (seeded) at the demo's trained adapters' scale."""
    cfg = load_config(DEMO)
    model = new_adapter(base, cfg.lora)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


@torch.no_grad()
def hf_generate(model, tok, prompts: list[list[int]], max_new: int) -> list[str]:
    """HF ``generate`` on the model as given (what generate_texts ran before it merged), one batch."""
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ids, mask = left_pad(prompts, pad, torch.device("cpu"))
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, pad_token_id=pad, eos_token_id=eos
    )
    return [
        tok.decode(g[: g.index(eos)] if eos in g else g, skip_special_tokens=True)
        for g in out[:, ids.shape[1] :].tolist()
    ]


@torch.no_grad()
def forward_nll(model, tok, rows, max_length: int) -> float:
    """Mean target NLL by plain forwards of the model as given (no merge)."""
    total, count = 0.0, 0
    for b in fixed_batches(encode(tok, rows, max_length), 64, tok.pad_token_id):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        target = b["labels"][:, 1:]
        total += float(
            F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum")
        )
        count += int((target != -100).sum())
    return total / count


@torch.no_grad()
def forward_loglik(model, ctx: list[int], cont: list[int]) -> float:
    logp = model(input_ids=torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
    return float(sum(logp[len(ctx) - 1 + k, t] for k, t in enumerate(cont)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    cfg = load_config(DEMO)
    base, tok = load_base(cfg.model.path, "float32")
    data = tmp_path_factory.mktemp("demo-data")
    rows = {d.name: load_domain(d, Path(data), eval_only=True).eval for d in [cfg.source, *cfg.domains]}
    return cfg, demo_adapter(base), tok, rows


def test_scores_of_the_merged_copy_equal_the_unmerged_models_on_the_demo(demo):
    cfg, model, tok, rows = demo
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert inference_model(model) is not model  # the scorers do run a merged copy
    for name, domain_rows in rows.items():
        ids = [prompt_ids(tok, r["prompt"]) for r in domain_rows]
        expected = hf_generate(model, tok, ids, cfg.evaluation.max_new_tokens)
        got = generate_texts(
            model, tok, ids, batch_size=cfg.evaluation.batch_size, max_new_tokens=cfg.evaluation.max_new_tokens
        )
        assert got == expected, name
        unmerged = forward_nll(model, tok, domain_rows, cfg.training.max_length)
        with model.disable_adapter():
            without = forward_nll(model, tok, domain_rows, cfg.training.max_length)
        assert abs(without - unmerged) > 1e-2 * unmerged  # the adapter matters: a dropped merge would show
        assert target_nll(model, tok, domain_rows, 64, cfg.training.max_length) == pytest.approx(unmerged, rel=1e-5)
    # multiple choice: each row's answer against three wrong ones
    examples, manual = [], []
    for r in rows[cfg.domains[0].name][:40]:
        ctx = prompt_ids(tok, r["prompt"])
        conts = [tok(c, add_special_tokens=False)["input_ids"] for c in (r["answer"], r["answer"][::-1], "zz", "a")]
        examples.append([(ctx, c) for c in conts])
        manual.append([forward_loglik(model, ctx, c) for c in conts])
    got = pair_loglikelihoods(model, examples, batch_size=32, pad=tok.pad_token_id)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(manual), atol=1e-4, rtol=0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the caller's model is left as it was


def test_the_merged_copy_is_kept_until_the_model_changes(demo):
    _, model, tok, _ = demo
    model = copy.deepcopy(model)
    first = inference_model(model)
    assert inference_model(model) is first and not hasattr(first, "peft_config")
    shared = {id(p) for p in first.parameters()} & {id(p) for p in model.parameters()}
    assert shared and len(shared) < len(list(first.parameters()))  # embeddings and norms shared, linear weights not
    ids = torch.tensor([prompt_ids(tok, "abc=")])
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(0.5)  # as an optimizer step would
        second = inference_model(model)
        assert second is not first  # a stale copy would still score the old adapter
        torch.testing.assert_close(second(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=0)
        assert not torch.allclose(first(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-3)


def test_a_plain_model_is_scored_as_it_is():
    from pipelines.config import TinyModelConfig
    from pipelines.runtime.models import build_tiny_llama

    base = build_tiny_llama(
        TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), char_tokenizer(), 0
    )
    assert inference_model(base) is base
    with pytest.raises(ValueError, match="LoRA"):
        merged_copy(base)


def test_the_scorers_run_torch_linear_where_deepspeed_replaced_it(demo, monkeypatch):
    """A ZeRO-3 engine set up in this process leaves torch.nn.functional.linear replaced by DeepSpeed's Python
    autograd Function (3.7x a decode step on the H200); the scorers run torch's own and put it back after."""
    import deepspeed.runtime.zero.linear as zero_linear

    cfg, model, tok, rows = demo
    calls = []
    function = zero_linear.LinearFunctionForZeroStage3

    class Counted:  # DeepSpeed's own autograd Function, its calls counted
        @staticmethod
        def apply(*args):
            calls.append(1)
            return function.apply(*args)

    zero3_linear_wrap = zero_linear.zero3_linear_wrap  # what a ZeRO-3 engine installs as F.linear
    monkeypatch.setattr(zero_linear, "LinearFunctionForZeroStage3", Counted)
    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)
    domain_rows = rows[cfg.domains[0].name][:8]
    ids = [prompt_ids(tok, r["prompt"]) for r in domain_rows]
    generate_texts(model, tok, ids, batch_size=8, max_new_tokens=4)
    target_nll(model, tok, domain_rows, 8, cfg.training.max_length)
    pair_loglikelihoods(model, [[(ids[0], ids[1][1:3])]], batch_size=4, pad=tok.pad_token_id)
    assert calls == [] and torch.nn.functional.linear is zero3_linear_wrap
    with torch_linear():
        assert torch.nn.functional.linear is torch._C._nn.linear
    with torch.no_grad():
        model(input_ids=torch.tensor([ids[0]]))
    assert calls  # DeepSpeed's function does run a forward outside the scorers


def test_the_loop_reads_the_device_only_at_the_check_interval(demo, monkeypatch):
    cfg, model, tok, rows = demo
    merged = inference_model(model)
    prompts = [prompt_ids(tok, r["prompt"]) for r in rows[cfg.source.name][:6]]
    ids, mask = left_pad(prompts, tok.pad_token_id, torch.device("cpu"))
    every_step = greedy.greedy_tokens(merged, ids, mask, 12, eos=-1, pad=tok.pad_token_id, check_every=1)
    reads = []
    real = greedy._host_ended
    monkeypatch.setattr(greedy, "_host_ended", lambda ended: reads.append(1) or real(ended))
    sparse = greedy.greedy_tokens(merged, ids, mask, 12, eos=-1, pad=tok.pad_token_id, check_every=4)
    assert torch.equal(sparse, every_step) and sparse.shape == (6, 12)
    assert len(reads) == 2  # after steps 4 and 8; the 12th is the last anyway


def test_stop_strings_end_the_loop_early_and_cut_the_generated_text_only(demo):
    cfg, model, tok, rows = demo
    prompts = [prompt_ids(tok, r["prompt"]) for r in rows[cfg.source.name][:6]]
    full = generate_texts(model, tok, prompts, batch_size=6, max_new_tokens=10)
    assert all(len(t) >= 3 for t in full)
    stop = sorted({t[1:3] for t in full})  # each row meets one by its third token
    steps = []
    merged = inference_model(model)
    hook = merged.register_forward_hook(lambda *_: steps.append(1))
    try:
        cut = generate_texts(model, tok, prompts, batch_size=6, max_new_tokens=10, stop=stop)
    finally:
        hook.remove()
    expected = []
    for t in full:
        for s in stop:
            t = t.split(s, 1)[0]
        expected.append(t)
    assert cut == expected
    assert len(steps) <= 3  # the prompt pass and two steps, not ten
    # a stop string that starts in the prompt and ends in the completion does not end it (lm-eval's until)
    row = rows[cfg.source.name][0]
    straddle = row["prompt"][-1] + full[0][0]
    if straddle not in full[0]:
        assert generate_texts(model, tok, prompts[:1], batch_size=1, max_new_tokens=10, stop=[straddle]) == full[:1]


def test_a_generation_config_beyond_argmax_goes_through_generate(demo):
    cfg, model, tok, rows = demo
    model = copy.deepcopy(model)
    model.generation_config.repetition_penalty = 5.0
    prompts = [prompt_ids(tok, r["prompt"]) for r in rows[cfg.source.name][:6]]
    assert greedy.generate_settings(inference_model(model)) == ["repetition_penalty=5.0"]
    penalised = generate_texts(model, tok, prompts, batch_size=6, max_new_tokens=8)
    assert penalised == hf_generate(model, tok, prompts, 8)
    model.generation_config.repetition_penalty = 1.0
    assert penalised != generate_texts(model, tok, prompts, batch_size=6, max_new_tokens=8)


def test_the_exported_merged_model_completes_as_scoring_does(demo, tmp_path):
    """``lalora export --merge`` writes peft's merge of the same weights the scorers merge: same completions."""
    cfg, model, tok, rows = demo
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path / "adapter")
    export_merged(cfg.model.path, tmp_path / "adapter", tmp_path / "merged")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    scoring, _ = load_for_inference(cfg.model.path, tmp_path / "adapter")
    prompts = [r["prompt"] for name in rows for r in rows[name][:50]]
    assert complete(exported, tok, prompts, batch_size=64, max_new_tokens=8) == complete(
        scoring, tok, prompts, batch_size=64, max_new_tokens=8
    )
    exported_state, merged_state = exported.state_dict(), inference_model(scoring).state_dict()
    assert exported_state.keys() == merged_state.keys()
    assert all(torch.equal(exported_state[k], merged_state[k]) for k in exported_state)  # bit for bit
