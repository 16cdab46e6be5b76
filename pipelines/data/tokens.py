"""Tokenization with prompt masking, and batches: fixed ones for curvature and scoring, endless shuffled
ones for training."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pipelines.data.sources import DataError


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    """-100 on BOS and prompt tokens: only the answer and EOS carry loss."""


def special_ids(tokenizer: Any) -> tuple[int | None, int, int]:
    """(bos, eos, pad); pad falls back to eos, which is always masked in labels."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; set one (tokenizer.eos_token) so answers can end")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return tokenizer.bos_token_id, eos, pad


def prompt_ids(tokenizer: Any, prompt: str, chat: str = "never") -> list[int]:
    """BOS + the prompt's tokens; with ``chat`` auto/always, the prompt as a user turn of the chat template.

    The chat template brings its own BOS and ends with the assistant's generation prompt.
    """
    if chat != "never":
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if chat == "always":
            raise DataError("chat_template is 'always' but the tokenizer has no chat template; set it to auto or never")
    bos, _, _ = special_ids(tokenizer)
    return ([bos] if bos is not None else []) + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def encode(tokenizer: Any, rows: list[dict[str, Any]], max_length: int, overlong: str = "truncate") -> list[Encoded]:
    """Prompt and answer tokenized apart and joined, so the label mask is exact; truncated to max_length,
    or (``overlong`` "error") a DataError naming the first longer example."""
    _, eos, _ = special_ids(tokenizer)
    answers = tokenizer([r["answer"] for r in rows], add_special_tokens=False)["input_ids"]
    out = []
    for i, (r, ans) in enumerate(zip(rows, answers, strict=True)):
        p = prompt_ids(tokenizer, r["prompt"], r.get("chat", "never"))
        if overlong == "error" and len(p) + len(ans) + 1 > max_length:
            raise DataError(
                f"example {i} is {len(p) + len(ans) + 1} tokens, over training.max_length={max_length} "
                f"(prompt {r['prompt'][:40]!r}...); raise max_length or set training.overlong: truncate"
            )
        ids = (p + ans + [eos])[:max_length]
        labels = ([-100] * len(p) + ans + [eos])[:max_length]
        out.append(Encoded(ids, labels))
    return out


def collate(examples: list[Encoded], pad_id: int) -> dict[str, Tensor]:
    """Right padding; (B, T) input_ids, attention_mask and labels (-100 on padding)."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def fixed_batches(examples: list[Encoded], batch_size: int, pad_id: int) -> list[dict[str, Tensor]]:
    return [collate(examples[i : i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]


def length_grouped(
    order: list[int], lengths: list[int], batch_size: int, rng: random.Random, megabatch: int = 64
) -> list[list[int]]:
    """Batches of similar lengths from a shuffled ``order``, in random batch order.

    The shuffled order is cut into megabatches of ``megabatch * batch_size`` examples, each
    sorted by length (longest first) and cut into batches; the batches are then shuffled. The
    last batch of a megabatch may be short.
    """
    size = megabatch * batch_size
    batches = []
    for m in range(0, len(order), size):
        block = sorted(order[m : m + size], key=lambda j: -lengths[j])
        batches += [block[i : i + batch_size] for i in range(0, len(block), batch_size)]
    rng.shuffle(batches)
    return batches


def batch_indices(lengths: list[int], batch_size: int, seed: int, group_by_length: bool = False) -> Iterator[list[int]]:
    """Endless shuffled batches of indices; epoch e uses the permutation seeded by (seed, e).

    Short batches are dropped unless the data holds less than one batch. ``group_by_length``
    batches examples of similar length together (see ``length_grouped``).
    """
    epoch = 0
    while True:
        order = list(range(len(lengths)))
        rng = random.Random(f"{seed}:{epoch}")
        rng.shuffle(order)
        if group_by_length:
            batches = length_grouped(order, lengths, batch_size, rng)
        else:
            batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        yield from [b for b in batches if len(b) == batch_size] or batches[:1]
        epoch += 1


def train_batches(
    examples: list[Encoded], batch_size: int, pad_id: int, seed: int, group_by_length: bool = False
) -> Iterator[dict[str, Tensor]]:
    """Endless shuffled batches (``batch_indices``), collated; the per-sequence loss is unchanged by
    ``group_by_length`` (nothing is packed together)."""
    for b in batch_indices([len(e.input_ids) for e in examples], batch_size, seed, group_by_length):
        yield collate([examples[j] for j in b], pad_id)
