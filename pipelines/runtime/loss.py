"""The training loss: transformers' own causal-LM loss, or the same loss with the LM head fused into it, chunk by chunk,
at the target positions only.

Over a large vocabulary (Llama 3: 128k) the logits are the largest tensor of a step: batch x length x
vocabulary, upcast to float32 for the cross-entropy and kept, with their gradient, for the backward pass.
``chunked_causal_loss`` never holds them: the decoder's last hidden states are captured on the way out of the
model (which is asked for one position of logits only), the positions whose next token is a target (label not
-100) are picked out, and the head's matmul and the cross-entropy run ``chunk`` of them at a time; each chunk's
gradient with respect to the hidden states is computed right there (softmax less the one-hot, times the head's
weight), so the backward pass multiplies a stored (targets x hidden) tensor and recomputes nothing. Prompt and
padding positions, which transformers runs through the head and then masks, cost nothing. The loss is
transformers' ``ForCausalLMLoss``: position i predicts label i + 1, the float32 sum divided by the batch's
target tokens (or by ``num_items``, the data-parallel normaliser); logits in the model's dtype, upcast before
the softmax, as transformers does. The target positions are found on the host (``target_positions``, on the
batch before it moves to the device), so a step makes no host sync.
"""

from __future__ import annotations

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


def target_positions(labels: Tensor) -> Tensor:
    """Flat indices, over the batch's (rows x (length - 1)) predicting positions, of those whose next token is a
    target (label not -100). Run it on the host's copy of the batch: on a GPU ``nonzero`` waits for the device."""
    return (labels[:, 1:] != -100).reshape(-1).nonzero().squeeze(1)


class _HeadCrossEntropy(torch.autograd.Function):
    """Sum over rows of -log softmax(hidden @ weight^T)[label]; the gradient with respect to ``hidden`` computed in
    the forward pass, chunk by chunk (``weight`` is frozen)."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk, None]
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y).squeeze(1)).sum()
            probs = torch.exp(logits.sub_(lse[:, None]))
            probs.scatter_add_(1, y, torch.full_like(y, -1, dtype=probs.dtype))
            grad[start : start + chunk] = probs.to(h.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor | None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def chunked_causal_loss(
    model: Any, batch: dict[str, Tensor], chunk: int, num_items: Tensor | None, targets: Tensor | None = None
) -> Tensor:
    """``model`` (a DeepSpeed engine or the module it wraps) called as transformers calls it, its loss computed
    ``chunk`` target positions at a time; equal to ``model(..., labels=...).loss`` up to the summation order.
    ``targets``: ``target_positions`` of the batch's labels, on the batch's device (found here when not given,
    which on a GPU is a host sync).

    The loss runs inside the model's forward, in a pre-hook of its LM head: at ZeRO-3 the head's weight is whole
    there (DeepSpeed's own pre-hook, registered first, has gathered it) and nowhere else, and the gradient is taken
    there too, so the weight is not needed again. (Gathering it a second time around the loss, with DeepSpeed's
    ``GatheredParameters``, made a ZeRO-3 stage run 0.86x plain DeepSpeed's tokens/s on the CPU, where this runs
    1.05-1.09x: benchmarks/results/cpu-2026-12-06/zero3_anchor-loss-chunk-1024*.json.)"""
    inner = causal_lm(model.module if hasattr(model, "module") else model)
    labels = batch["labels"][:, 1:].reshape(-1)
    if targets is None:
        targets = target_positions(batch["labels"])
    targets = targets.to(labels.device)
    picked: list[Tensor] = []
    total: list[Tensor] = []

    def at_decoder(_module: nn.Module, _args: Any, out: Any) -> None:  # the last hidden states, target rows
        hidden = out[0][:, :-1]
        picked[:] = [hidden.reshape(-1, hidden.shape[-1]).index_select(0, targets.to(hidden.device))]

    def at_head(head: nn.Module, _args: Any) -> None:  # the head's weight is whole here, also at ZeRO-3
        y = labels.index_select(0, targets).to(picked[0].device)  # labels where the logits are, as transformers
        total[:] = [_HeadCrossEntropy.apply(picked[0], head.weight, y, chunk)]

    hooks = [
        inner.get_decoder().register_forward_hook(at_decoder),
        inner.get_output_embeddings().register_forward_pre_hook(at_head),
    ]
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    if not total:
        raise BadInput(
            f"training.loss_chunk: this model's forward does not call its LM head module "
            f"({type(inner).__name__}), where the chunked loss runs; set training.loss_chunk: 0"
        )
    return total[0] / (num_items if num_items is not None else targets.numel())
