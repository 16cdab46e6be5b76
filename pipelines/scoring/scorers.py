"""The scorers: greedy generation with an answer extractor, multiple choice by log-likelihood, perplexity.

All are batched, sort their inputs by length (less padding) and restore the order, and run the
model of ``inference_model`` (a LoRA adapter merged into a copy of its base) with torch's own linear
layers (``pipelines.scoring.inference``). Generation and multiple choice use the KV cache: the greedy
loop of ``pipelines.scoring.greedy`` decodes with it, and multiple choice runs
each distinct context once, then scores every choice's continuation against the cached
context (HellaSwag's four endings share one context pass). Multiple-choice accuracy follows
lm-eval-harness: ``acc`` ranks choices by summed log-likelihood, ``acc_norm`` by
log-likelihood per character of the choice text; the continuation is the choice after a
space (lm-eval's target delimiter).

Each scorer has a ``*_rows`` twin that also gives every row's share of each value (the value is their
mean: 1 or 0 for an accuracy, the row's summed target NLL times rows over target tokens for ``nll``), so
two adapters scored on the same rows can be compared row by row (lambda auto's paired standard error).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pipelines.config.formats import GenerateScoring
from pipelines.data.tokens import encode, fixed_batches, prompt_ids, special_ids
from pipelines.scoring.extract import is_correct
from pipelines.scoring.greedy import decode, generate_settings, greedy_tokens, stop_check
from pipelines.scoring.inference import forward_params, inference_model, torch_linear

Pair = tuple[list[int], list[int]]
"""(context token ids, continuation token ids)."""

RowShares = dict[str, list[float]]
"""Per value (``acc``, ``nll``...): each scored row's share, in the rows' order; the value is their mean."""


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _progress(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", leave=False, mininterval=1.0)


def context_limit(model: Any, reserve: int = 0) -> int | None:
    """Most context tokens that leave ``reserve`` positions free (None: the model states no limit)."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return None if n is None else max(1, int(n) - reserve)


def left_pad(seqs: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(B, W) ids and attention mask, each sequence right-aligned."""
    width = max(map(len, seqs))
    ids = torch.tensor([[pad] * (width - len(s)) + list(s) for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


# --- generation -------------------------------------------------------------------------
@torch.no_grad()
def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    desc: str = "generate",
) -> list[str]:
    """Greedy continuations of token-id prompts, decoded up to EOS and cut at the first stop string.

    Runs ``inference_model`` (a LoRA adapter merged) with torch's own linear layers, through the loop of
    ``greedy_tokens``; a model whose generation config asks ``generate`` for more than greedy argmax (a
    repetition penalty, bad words, ...) goes through ``generate`` instead, the stop strings still cut here.
    """
    _, eos, pad = special_ids(tokenizer)
    model = inference_model(model)
    device = _device(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts = [""] * len(prompts)
    stopped = stop_check(tokenizer, stop, eos)
    plain = not generate_settings(model)
    with torch_linear(), _progress(len(prompts), desc) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = [prompts[i] for i in chunk]
            ids, mask = left_pad(batch, pad, device)
            if plain:
                out = greedy_tokens(
                    model,
                    ids,
                    mask,
                    max_new_tokens,
                    eos=eos,
                    pad=pad,
                    stopped=stopped,
                    padded=len({len(p) for p in batch}) > 1,
                )
            else:
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                    eos_token_id=eos,
                    use_cache=True,
                )
                out = out[:, ids.shape[1] :]
            for i, gen in zip(chunk, out.tolist(), strict=True):
                text = decode(tokenizer, gen, eos)
                for s in stop:
                    text = text.split(s, 1)[0]
                texts[i] = text
            bar.update(len(chunk))
    return texts


def complete(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    chat: str | Sequence[str] = "never",
    desc: str = "generate",
) -> list[str]:
    """Greedy completions of text prompts: BOS + each prompt (or its chat-template turn), its context cut
    to what leaves room for ``max_new_tokens``; what scoring, the registered model and export all run."""
    limit = context_limit(model, max_new_tokens)
    chats = [chat] * len(prompts) if isinstance(chat, str) else list(chat)
    ids = [prompt_ids(tokenizer, p, c)[-limit if limit else 0 :] for p, c in zip(prompts, chats, strict=True)]
    return generate_texts(
        model, tokenizer, ids, batch_size=batch_size, max_new_tokens=max_new_tokens, stop=stop, desc=desc
    )


def score_generate(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    cfg: GenerateScoring,
    *,
    batch_size: int,
    max_new_tokens: int,
    desc: str = "generate",
) -> dict[str, float]:
    """``accuracy``: share of rows whose extracted generation equals the extracted reference answer."""
    return score_generate_rows(
        model, tokenizer, rows, cfg, batch_size=batch_size, max_new_tokens=max_new_tokens, desc=desc
    )[0]


def score_generate_rows(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    cfg: GenerateScoring,
    *,
    batch_size: int,
    max_new_tokens: int,
    desc: str = "generate",
) -> tuple[dict[str, float], RowShares]:
    """``score_generate`` and whether each row was correct (1.0 or 0.0)."""
    texts = complete(
        model,
        tokenizer,
        [r["prompt"] for r in rows],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        stop=cfg.stop,
        chat=[r.get("chat", "never") for r in rows],
        desc=desc,
    )
    correct = [float(is_correct(t, r["answer"], cfg.extractor, cfg.pattern)) for t, r in zip(texts, rows, strict=True)]
    return {"accuracy": sum(correct) / len(rows)}, {"accuracy": correct}


# --- multiple choice ----------------------------------------------------------------------
def _cache_kwarg(model: Any) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache`` in forward (5.2x); accept both."""
    return "cache" if "cache" in forward_params(model) else "past_key_values"


@torch.no_grad()
def pair_loglikelihoods(
    model: Any, examples: list[list[Pair]], *, batch_size: int, pad: int, desc: str = "multiple choice"
) -> list[list[float]]:
    """Summed log p(continuation | context) of every (context, continuation) pair of every example.

    A batch holds whole examples, up to ``batch_size`` pairs, longest first (batches of like lengths). Its
    distinct contexts run once, left-padded, (U, W), filling a KV cache (only their last position's logits
    are computed); the cache rows are gathered per pair, (P, W), and the right-padded continuations, (P, C),
    run on top with positions continuing each context. The first continuation token is scored by the
    context's last logits. Runs ``inference_model`` (a LoRA adapter merged) with torch's own linear layers.
    """
    from transformers import DynamicCache

    model = inference_model(model)
    device, cache_kw = _device(model), _cache_kwarg(model)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in forward_params(model) else {}
    order = sorted(range(len(examples)), key=lambda i: -max(len(c) + len(t) for c, t in examples[i]))
    result: list[list[float]] = [[] for _ in examples]
    with torch_linear(), torch.inference_mode(), _progress(len(examples), desc) as bar:
        start = 0
        while start < len(order):
            chunk, n_pairs = [order[start]], len(examples[order[start]])
            while start + len(chunk) < len(order) and n_pairs + len(examples[order[start + len(chunk)]]) <= batch_size:
                n_pairs += len(examples[order[start + len(chunk)]])
                chunk.append(order[start + len(chunk)])
            start += len(chunk)
            contexts: dict[tuple[int, ...], int] = {}
            pairs = [(contexts.setdefault(tuple(c), len(contexts)), t) for i in chunk for c, t in examples[i]]
            ctx_ids, ctx_mask = left_pad(list(contexts), pad, device)
            cache = DynamicCache(config=getattr(model, "config", None))
            out = model(
                input_ids=ctx_ids,
                attention_mask=ctx_mask,
                position_ids=(ctx_mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True,
                **{cache_kw: cache},
                **keep,
            )
            first = out.logits[:, -1].float().log_softmax(-1)  # (U, V): next-token log-probs after each context
            index = torch.tensor([u for u, _ in pairs], device=device)
            cache.batch_select_indices(index)
            C = max(len(t) for _, t in pairs)
            cont = torch.tensor([t + [pad] * (C - len(t)) for _, t in pairs], device=device)  # (P, C)
            cont_mask = torch.tensor([[1] * len(t) + [0] * (C - len(t)) for _, t in pairs], device=device)
            positions = ctx_mask.sum(-1)[index, None] + torch.arange(C, device=device)
            out = model(
                input_ids=cont,
                attention_mask=torch.cat([ctx_mask[index], cont_mask], 1),
                position_ids=positions,
                use_cache=True,
                **{cache_kw: cache},
            )
            logp = torch.cat([first[index, None], out.logits[:, :-1].float().log_softmax(-1)], 1)  # (P, C, V)
            ll = (logp.gather(-1, cont[..., None])[..., 0] * cont_mask).sum(-1).tolist()
            k = 0
            for i in chunk:
                result[i] = ll[k : k + len(examples[i])]
                k += len(examples[i])
            bar.update(len(chunk))
    return result


def _argmax(values: Sequence[float]) -> int:
    """First index of the maximum (numpy's tie rule, as lm-eval)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def choice_pairs(tokenizer: Any, row: dict[str, Any], limit: int | None) -> list[Pair]:
    """A multiple-choice row as (context, ' ' + choice) token pairs; contexts cut from the left to fit ``limit``."""
    choices = row["choices"]
    contexts = row.get("contexts") or [row["prompt"]] * len(choices)
    conts = tokenizer([f" {c}" for c in choices], add_special_tokens=False)["input_ids"]
    pairs = []
    for ctx, cont in zip(contexts, conts, strict=False):  # a row's contexts and choices come from its data
        ids = prompt_ids(tokenizer, ctx, row.get("chat", "never"))
        if limit is not None and len(ids) + len(cont) > limit:
            ids = ids[-max(1, limit - len(cont)) :]
        if not ids:
            raise ValueError("a multiple-choice context is empty and the tokenizer has no BOS token to condition on")
        pairs.append((ids, list(cont)))
    return pairs


def score_multiple_choice(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], *, batch_size: int, desc: str = "multiple choice"
) -> dict[str, float]:
    """``acc``, ``acc_norm`` (lm-eval), and ``nll`` / ``perplexity`` of the gold continuation's tokens."""
    return score_multiple_choice_rows(model, tokenizer, rows, batch_size=batch_size, desc=desc)[0]


def score_multiple_choice_rows(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], *, batch_size: int, desc: str = "multiple choice"
) -> tuple[dict[str, float], RowShares]:
    """``score_multiple_choice`` and each row's ``acc``, ``acc_norm`` and share of ``nll``."""
    _, _, pad = special_ids(tokenizer)
    limit = context_limit(model)
    examples = [choice_pairs(tokenizer, r, limit) for r in rows]
    lls = pair_loglikelihoods(model, examples, batch_size=batch_size, pad=pad, desc=desc)
    acc: list[float] = []
    acc_norm: list[float] = []
    gold_ll: list[float] = []
    gold_tokens = 0
    for r, ll, pairs in zip(rows, lls, examples, strict=True):
        acc.append(float(_argmax(ll) == r["label"]))
        # one loglikelihood per (context, choice) pair: as many as both lists, unchecked (choice_pairs)
        per_char = [v / max(len(c), 1) for v, c in zip(ll, r["choices"], strict=False)]
        acc_norm.append(float(_argmax(per_char) == r["label"]))
        gold_ll.append(ll[r["label"]])
        gold_tokens += len(pairs[r["label"]][1])
    nll = -sum(gold_ll) / max(gold_tokens, 1)
    values = {
        "acc": sum(acc) / len(rows),
        "acc_norm": sum(acc_norm) / len(rows),
        "nll": nll,
        "perplexity": math.exp(min(nll, 50.0)),
    }
    return values, {"acc": acc, "acc_norm": acc_norm, "nll": [-v * len(rows) / max(gold_tokens, 1) for v in gold_ll]}


# --- perplexity ---------------------------------------------------------------------------
def target_nll(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], batch_size: int, max_length: int, desc: str = "nll"
) -> float:
    """Mean negative log-likelihood per target token (the answer and EOS; the prompt is masked); batches of
    like lengths (longest first), ``inference_model`` (a LoRA adapter merged), torch's own linear layers."""
    sums, count = target_nll_rows(model, tokenizer, rows, batch_size, max_length, desc)
    return math.fsum(sums) / max(count, 1)


@torch.no_grad()
def target_nll_rows(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], batch_size: int, max_length: int, desc: str = "nll"
) -> tuple[list[float], int]:
    """Each row's summed target-token NLL, in the rows' order, and the target tokens of all rows."""
    _, _, pad = special_ids(tokenizer)
    model = inference_model(model)
    device = _device(model)
    encoded = encode(tokenizer, rows, max_length)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
    count = sum(label != -100 for e in encoded for label in e.labels[1:])
    sums = torch.zeros(len(encoded), dtype=torch.float64, device=device)  # on the device: one host read, at the end
    with torch_linear(), torch.inference_mode(), _progress(len(encoded), desc) as bar:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch = fixed_batches([encoded[i] for i in index], len(index), pad)[0]
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            logits = out.logits[:, :-1].float()
            target = batch["labels"][:, 1:]
            per_token = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="none"
            )
            sums[torch.tensor(index, device=device)] = per_token.view(target.shape).sum(1, dtype=torch.float64)
            bar.update(len(index))
    return sums.tolist(), count


def score_perplexity(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    *,
    batch_size: int,
    max_length: int,
    desc: str = "perplexity",
) -> dict[str, float]:
    """``nll`` (mean target-token NLL) and ``perplexity`` = exp(nll)."""
    return score_perplexity_rows(model, tokenizer, rows, batch_size=batch_size, max_length=max_length, desc=desc)[0]


def score_perplexity_rows(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    *,
    batch_size: int,
    max_length: int,
    desc: str = "perplexity",
) -> tuple[dict[str, float], RowShares]:
    """``score_perplexity`` and each row's share of ``nll`` (its summed NLL times rows over target tokens)."""
    sums, count = target_nll_rows(model, tokenizer, rows, batch_size, max_length, desc)
    nll = math.fsum(sums) / max(count, 1)
    return {"nll": nll, "perplexity": math.exp(min(nll, 50.0))}, {"nll": [v * len(rows) / max(count, 1) for v in sums]}
