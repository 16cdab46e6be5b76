"""Stage step 3: score the adapter on every domain (exact match of greedy generations, target NLL)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipelines.config import DomainConfig, EvaluationConfig
from pipelines.data import encode, fixed_batches, load_domain, prompt_ids, special_ids
from pipelines.modeling import load_adapter, load_base
from pipelines.workspace import write_json_atomic


@dataclass
class DomainScore:
    accuracy: float
    """Exact match of the greedy generation with the answer."""
    nll: float
    """Mean target-token negative log-likelihood (answer and EOS tokens)."""
    n: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.nll, 50.0))


@torch.no_grad()
def exact_match(model: Any, tokenizer: Any, rows: list[dict[str, str]], batch_size: int, max_new_tokens: int) -> float:
    """Greedy, batched (left padding), KV cache; the decoded text up to EOS must equal the answer."""
    _, eos, pad = special_ids(tokenizer)
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        prompts = [prompt_ids(tokenizer, r["prompt"]) for r in chunk]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=eos, use_cache=True)
        for r, gen in zip(chunk, out[:, width:].tolist()):
            gen = gen[: gen.index(eos)] if eos in gen else gen
            correct += tokenizer.decode(gen, skip_special_tokens=True).strip() == r["answer"].strip()
    return correct / len(rows)


@torch.no_grad()
def target_nll(model: Any, tokenizer: Any, rows: list[dict[str, str]], batch_size: int, max_length: int) -> float:
    _, _, pad = special_ids(tokenizer)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in fixed_batches(encode(tokenizer, rows, max_length), batch_size, pad):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100,
                                       reduction="sum"))
        count += int((target != -100).sum())
    return total / max(count, 1)


def evaluate(base_path: str, adapter_dir: str, domains: list[DomainConfig], cfg: EvaluationConfig, *, dtype: str,
             max_length: int, default_curvature: int, data_dir: str, out_path: str) -> dict[str, DomainScore]:
    """Scores per domain name, also written as JSON to ``out_path``."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    base, tokenizer = load_base(base_path, dtype)
    model = load_adapter(base, adapter_dir).eval()
    scores: dict[str, DomainScore] = {}
    for domain in tqdm(domains, desc="evaluate", unit="domain", leave=False):
        rows = load_domain(domain, Path(data_dir), default_curvature).eval
        scores[domain.name] = DomainScore(
            accuracy=exact_match(model, tokenizer, rows, cfg.batch_size, cfg.max_new_tokens),
            nll=target_nll(model, tokenizer, rows, cfg.batch_size, max_length),
            n=len(rows),
        )
    write_json_atomic(Path(out_path), {"seconds": time.perf_counter() - t0,
                                       "scores": {k: asdict(v) for k, v in scores.items()}})
    return scores
