"""Per-sequence gradients at the LoRA matrices from one batched backward.

For a Linear layer y = x W^T the gradient of sample n's loss is sum_t g_{n,t} x_{n,t}^T,
with x the layer input and g the gradient at its output. Forward hooks keep x and y for
every LoRA A and B layer; one ``autograd.grad`` of the summed per-sequence losses with
respect to all the y gives every g at once. Because the sequences of a batch do not
interact, the slice n of g is exactly the gradient of sequence n's own loss. Padding and
prompt tokens carry label -100 and no loss, exactly as in training, so they contribute
nothing. No parameter ``.grad`` is written.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lalora.lora import LoraParam


@dataclass
class ModuleGrads:
    """One LoRA matrix's inputs and output gradients for a batch (possibly several calls)."""

    param: LoraParam
    inputs: list[Tensor]
    """Each (B, T, d_in) of the layer, one per call."""
    out_grads: list[Tensor]
    """Each (B, T, d_out), the per-sequence loss gradient at the layer output."""
    token_mask: Tensor | None = None
    """(B, T) bool: the tokens that can influence their sequence's loss (not padding, not
    after the last target position). Kronecker factors average inputs over these."""

    def per_sample_grad(self) -> Tensor:
        """(B, d_out, d_in): sum_t g_{n,t} x_{n,t}^T, summed over calls, in fp32."""
        total = None
        for x, g in zip(self.inputs, self.out_grads, strict=True):
            ps = torch.einsum("bto,bti->boi", g.float(), x.float())
            total = ps if total is None else total + ps
        assert total is not None
        return total


def sequence_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """(B,) summed next-token NLL per sequence; ``labels`` (B, T) use -100 for no loss."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="none")
    return nll.view(target.shape).sum(1)


def sample_labels(logits: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
    """Labels drawn from the model's predictive distribution at every target position.

    ``labels`` (B, T) marks which positions are targets (!= -100); the returned tensor has the
    same mask with each target replaced by a sample from softmax(logits) of the previous
    position (teacher forcing on the observed inputs, the usual "true Fisher" for LMs).
    """
    probs = torch.softmax(logits[:, :-1].detach().float(), dim=-1)
    flat = probs.reshape(-1, probs.size(-1)).cpu()
    draws = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:2]).to(labels.device)
    out = labels.clone()
    mask = labels[:, 1:] != -100
    out[:, 1:] = torch.where(mask, draws, labels[:, 1:])
    return out


def influencing_tokens(labels: Tensor, attention_mask: Tensor | None) -> Tensor:
    """(B, T) bool: positions t <= the last position whose next token is a target.

    In a causal LM a position's output only reaches the logits of itself and later positions,
    so tokens after the last scored prediction carry exactly zero gradient; padding too.
    """
    T = labels.shape[1]
    scored = labels[:, 1:] != -100  # position t predicts t + 1
    pos = torch.arange(T - 1, device=labels.device).expand_as(scored)
    last = torch.where(scored, pos, torch.full_like(pos, -1)).amax(dim=1)  # (B,)
    mask = torch.arange(T, device=labels.device)[None, :] <= last[:, None]
    if attention_mask is not None:
        mask = mask & attention_mask.bool()
    return mask


def per_sequence_output_grads(
    model: nn.Module,
    params: list[LoraParam],
    batch: Mapping[str, Tensor],
    fisher_type: str,
    mc_samples: int,
    generator: torch.Generator,
) -> Iterator[tuple[list[ModuleGrads], int]]:
    """Yield (per-module grads, number of sequences) once per label draw for one batch.

    ``empirical`` yields once with the observed labels; ``mc`` yields ``mc_samples`` times,
    each with labels sampled from the model, reusing one forward pass.
    """
    labels, attention_mask = batch["labels"], batch.get("attention_mask")
    mask = influencing_tokens(labels, attention_mask)
    if attention_mask is not None and bool(attention_mask.all()):  # this is a CPU-GPU sync point, once a batch
        attention_mask = None  # nothing masked: the plain causal path, a few % faster than an explicit all-ones mask
    records: dict[int, ModuleGrads] = {id(p.module): ModuleGrads(p, [], [], mask) for p in params}
    outputs: list[tuple[int, Tensor]] = []

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        records[id(module)].inputs.append(inputs[0].detach())
        outputs.append((id(module), output))

    # a transformers model whose config turns the KV cache on would fill one in this forward for nothing
    no_cache = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", False) else {}
    handles = [p.module.register_forward_hook(hook) for p in params]
    try:
        with torch.enable_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=attention_mask, **no_cache).logits
    finally:
        for h in handles:
            h.remove()
    has_target = (labels[:, 1:] != -100).any(dim=1)
    n_seq = int(has_target.sum())
    draws = 1 if fisher_type == "empirical" else mc_samples
    for i in range(draws):
        target = labels if fisher_type == "empirical" else sample_labels(logits, labels, generator)
        loss = sequence_nll(logits, target).sum()
        grads = torch.autograd.grad(loss, [o for _, o in outputs], retain_graph=i < draws - 1, allow_unused=True)
        for rec in records.values():
            rec.out_grads.clear()
        for (key, out), g in zip(outputs, grads, strict=True):
            records[key].out_grads.append(torch.zeros_like(out) if g is None else g)
        yield list(records.values()), n_seq
