"""The training loss: transformers' own causal-LM loss, or the same loss with the LM head fused into it, chunk by chunk.

Over a large vocabulary (Llama 3: 128k) the logits are the largest tensor of a step: batch x length x
vocabulary, upcast to float32 for the cross-entropy and kept, with their gradient, for the backward pass.
``chunked_causal_loss`` never holds them: the decoder's last hidden states are captured on the way out of the
model (which is asked for one position of logits only), and the head's matmul and the cross-entropy run
``chunk`` positions at a time; each chunk's gradient with respect to the hidden states is computed right there
(softmax less the one-hot, times the head's weight), so the backward pass multiplies a stored (positions x
hidden) tensor and recomputes nothing. The loss is transformers' ``ForCausalLMLoss``: position i predicts
label i + 1, -100 ignored, the float32 sum divided by the batch's target tokens (or by ``num_items``, the
data-parallel normaliser); logits in the model's dtype, upcast before the softmax, as transformers does. No
host sync: every position is computed (as transformers does), the ignored ones masked.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from pipelines.errors import BadInput
from pipelines.runtime.models import causal_lm

_POST_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling")
"""Config fields of models whose logits are transformed after the head (Gemma's soft-capping, Cohere's scale,
Granite's scaling): the chunked loss would miss the transformation, so those models use the full loss."""


def check_chunkable(module: nn.Module) -> None:
    """Refuse, as input to fix, a model whose logits are not its frozen LM head's output."""
    inner = causal_lm(module)
    head = inner.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad:
        raise BadInput(
            f"training.loss_chunk: the chunked loss needs a frozen, bias-free linear LM head; this model's "
            f"is {type(head).__name__} (LoRA on lm_head?): leave lm_head out of lora.target_modules or set "
            f"training.loss_chunk: 0"
        )
    config = inner.config
    for name in _POST_HEAD:
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise BadInput(
                f"training.loss_chunk: the model transforms its logits after the head ({name}="
                f"{getattr(config, name)}), which the chunked loss does not; set training.loss_chunk: 0"
            )


class _HeadCrossEntropy(torch.autograd.Function):
    """Sum over positions of -log softmax(hidden @ weight^T)[label], labels -100 ignored; the gradient with
    respect to ``hidden`` computed in the forward pass, chunk by chunk (``weight`` is frozen)."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.zeros_like(hidden)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            logits = (h @ weight.t()).float()
            keep = y != -100
            safe = torch.where(keep, y, 0)
            lse = torch.logsumexp(logits, dim=-1)
            total += torch.where(keep, lse - logits.gather(1, safe[:, None]).squeeze(1), 0.0).sum()
            probs = torch.exp(logits - lse[:, None])
            probs.scatter_add_(1, safe[:, None], -keep[:, None].to(probs.dtype))
            grad[start : start + chunk] = (probs * keep[:, None]).to(h.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor | None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def chunked_causal_loss(model: Any, batch: dict[str, Tensor], chunk: int, num_items: Tensor | None) -> Tensor:
    """``model`` (a DeepSpeed engine or the module it wraps) called as transformers calls it, its loss computed
    ``chunk`` positions at a time; equal to ``model(..., labels=...).loss`` up to the summation order."""
    inner = causal_lm(model.module if hasattr(model, "module") else model)
    captured: list[Tensor] = []
    hook = inner.get_decoder().register_forward_hook(lambda _m, _a, out: captured.append(out[0]))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1, use_cache=False)
    finally:
        hook.remove()
    hidden = captured[-1][:, :-1]
    labels = batch["labels"][:, 1:].to(hidden.device)
    weight = inner.get_output_embeddings().weight
    with _gathered(weight):  # at ZeRO-3 the head's weight is partitioned between forwards
        total = _HeadCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), chunk)
    return total / (num_items if num_items is not None else (labels != -100).sum())


def _gathered(weight: Tensor) -> Any:
    if not hasattr(weight, "ds_id"):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([weight])
