"""Greedy decoding with the KV cache: the loop HF ``generate`` runs for ``do_sample=False``, less its per-step cost.

What ``generate`` does per new token beside the forward (input preparation, model-kwarg updates, the
logits-processor and stopping-criteria lists, one host sync to ask whether every row has ended, and
``StopStringCriteria`` on the device when there are stop strings) is reduced here to an argmax, a
``masked_fill`` and a slice of a preallocated mask (the 4D padding mask itself where that is the mask
transformers would build each step, reading it on the host); the host reads the device only every ``check_every``
steps (every step on the CPU, where reading is free), to end the batch once every row has met EOS or
one of the stop strings. The tokens are generate's: same prompt pass (the last position's logits
only), same positions (each row's count of real tokens), same mask, pad fed after EOS.

A stop string is searched in the generated text only (lm-eval's ``until``); ``generate``'s
``StopStringCriteria`` also matched one that began in the prompt and ended in the first tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from pipelines.scoring.inference import forward_params

_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "num_beams": (None, 1),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
}
"""Generation-config fields (with their neutral values) that make ``generate`` more than an argmax per step."""


def generate_settings(model: Any) -> list[str]:
    """The model's generation-config settings greedy argmax would not apply (empty: the loop here equals
    ``generate``)."""
    config = getattr(model, "generation_config", None)
    return [
        f"{k}={getattr(config, k)!r}"
        for k, neutral in _NEUTRAL.items()
        if config is not None and getattr(config, k, None) not in neutral
    ]


def _padding_mask_is_enough(model: Any) -> bool:
    """Whether a decode step's mask may be given as the (B, 1, 1, L) padding mask itself: SDPA attention (a boolean
    mask, True attends) and full attention in every layer, where that is exactly the mask transformers would build
    (one query, after every cached position). Given 4D, transformers uses it as it is."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return not getattr(text, "sliding_window", None) and set(
        getattr(text, "layer_types", None) or ["full_attention"]
    ) == {"full_attention"}


def _host_ended(ended: Tensor) -> list[bool]:
    return ended.tolist()  # a CPU-GPU sync point: only every check_every steps


@torch.inference_mode()  # no autograd bookkeeping per op (the tokens and the cache are discarded)
def greedy_tokens(
    model: Any,
    ids: Tensor,
    mask: Tensor,
    max_new_tokens: int,
    *,
    eos: int,
    pad: int,
    stopped: Callable[[list[int]], bool] | None = None,
    check_every: int | None = None,
    padded: bool | None = None,
) -> Tensor:
    """(B, N) greedy continuations of left-padded prompts ``ids``/``mask`` (B, W), ``pad`` after a row's EOS.

    N is ``max_new_tokens``, or fewer when every row ended before: at EOS, or where ``stopped`` (given a
    row's tokens so far) says its text is complete. Rows are independent, so whatever a row is fed after its
    end never changes what it generated before. ``padded=False`` (the caller knows no prompt is padded) runs
    without an attention mask; None or True with ``mask``.
    """
    from transformers import DynamicCache

    B, W = ids.shape
    params = forward_params(model)
    cache_kw = "cache" if "cache" in params else "past_key_values"
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    if check_every is None:
        check_every = 1 if ids.device.type == "cpu" else 8
    cache = DynamicCache(config=getattr(model, "config", None))
    # No padding: no mask, as transformers concludes from an all-ones one after building it and reading it on the
    # host. Padding: the padding mask as the 4D mask of every step where that is the mask transformers would build.
    full_mask = None if padded is False else torch.cat([mask, mask.new_ones(B, max_new_tokens)], 1)  # (B, W + N)
    if full_mask is not None and _padding_mask_is_enough(model):
        full_mask = full_mask.bool()[:, None, None, :]  # (B, 1, 1, W + N)
    out = model(
        input_ids=ids,
        attention_mask=None if full_mask is None else mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
        **{cache_kw: cache},
        **keep,
    )
    position = mask.sum(-1, keepdim=True)  # (B, 1): where each row's first new token goes
    tokens = ids.new_full((B, max_new_tokens), pad)
    ended = torch.zeros(B, dtype=torch.bool, device=ids.device)
    for t in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1).masked_fill(ended, pad)  # (B,)
        tokens[:, t] = nxt
        ended = ended | (nxt == eos)
        if t + 1 == max_new_tokens:
            break
        if (t + 1) % check_every == 0 and _all_ended(ended, tokens[:, : t + 1], stopped):
            return tokens[:, : t + 1]
        out = model(
            input_ids=nxt[:, None],
            attention_mask=None if full_mask is None else full_mask[..., : W + t + 1],
            position_ids=position + t,
            use_cache=True,
            **{cache_kw: cache},
        )
    return tokens


def _all_ended(ended: Tensor, tokens: Tensor, stopped: Callable[[list[int]], bool] | None) -> bool:
    """Whether every row has ended, given its ``tokens`` so far (B, t); a row ``stopped`` says is complete is marked
    in ``ended`` (B,) here. A host sync: called every ``check_every`` steps."""
    live = [i for i, e in enumerate(_host_ended(ended)) if not e]
    if stopped is not None and live:
        rows = tokens.tolist()
        hit = [i for i in live if stopped(rows[i])]
        live = [i for i in live if i not in hit]
        if hit:
            ended[hit] = True
    return not live


def decode(tokenizer: Any, tokens: list[int], eos: int) -> str:
    """A row's text: its tokens up to EOS, special tokens skipped."""
    return tokenizer.decode(tokens[: tokens.index(eos)] if eos in tokens else tokens, skip_special_tokens=True)


def stop_check(tokenizer: Any, stop: Sequence[str], eos: int) -> Callable[[list[int]], bool] | None:
    """A ``stopped`` for ``greedy_tokens``: whether a row's generated text holds a stop string."""
    if not stop:
        return None
    return lambda tokens: any(s in decode(tokenizer, tokens, eos) for s in stop)
