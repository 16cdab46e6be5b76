"""The sums behind the Kronecker factors: token rows, shared inputs, half-work Gram accumulation.

A factor is a Gram matrix sum_t v_t v_t^T over the influencing tokens of every batch. Three
things keep its cost near that of the GEMMs alone, on a CPU and on a GPU:

- ``TokenRows`` picks the influencing tokens of a batch once (one host sync per batch),
  instead of a boolean mask per matrix;
- A matrices whose modules read the same input tensor (q/k/v, gate/up of a transformer block)
  have identical input factors: ``shared_inputs`` groups them and ``gram_`` computes that Gram
  once per group and adds it to each member, so their sums stay equal bit for bit and the
  finalize step compresses one of them (``identical_runs``);
- ``gram_`` sums only the row blocks on and above the diagonal (the matrix is symmetric):
  ~9/16 of the multiply-adds with 8 blocks; ``mirror_`` fills in the rest, once, when the factor is read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lalora.curvature.hooks import ModuleGrads

_MIN_BLOCK = 64
_MAX_BLOCKS = 8


class TokenRows:
    """The influencing tokens of one batch as rows: (B, T, d) tensors to (M, d).

    ``count`` is M. Finding the kept rows is the batch's one host sync; when every token is
    kept the rows are views, no copy.
    """

    def __init__(self, mask: Tensor | None, n_tokens: int) -> None:
        self.index: Tensor | None = None
        self.count = n_tokens
        if mask is not None:
            keep = mask.reshape(-1).nonzero().squeeze(1)  # this is a CPU-GPU sync point
            self.count = int(keep.numel())
            self.index = None if self.count == mask.numel() else keep

    @classmethod
    def of(cls, grads: Sequence[ModuleGrads]) -> TokenRows:
        first = grads[0]
        x = first.inputs[0]
        return cls(first.token_mask, int(x.shape[0] * x.shape[1]))

    def __call__(self, ts: Sequence[Tensor]) -> Tensor:
        """(M * len(ts), d): the kept rows of each (B, T, d) tensor, one call after the other."""
        flat = [t.reshape(-1, t.shape[-1]) for t in ts]
        if self.index is not None:
            flat = [f.index_select(0, self.index) for f in flat]
        return flat[0] if len(flat) == 1 else torch.cat(flat)


def _key(ts: Sequence[Tensor]) -> tuple[object, ...]:
    """Equal keys mean the same memory read the same way (the records keep every tensor alive)."""
    return tuple((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device) for t in ts)


def shared_inputs(recs: Sequence[ModuleGrads]) -> list[list[ModuleGrads]]:
    """The records grouped by identical input tensors, in first-seen order."""
    groups: dict[tuple[object, ...], list[ModuleGrads]] = {}
    for rec in recs:
        groups.setdefault(_key(rec.inputs), []).append(rec)
    return list(groups.values())


def blocks(n: int) -> list[tuple[int, int]]:
    """The row blocks [lo, hi) of an n x n Gram accumulator; sums are kept in columns >= lo of each."""
    b = min(_MAX_BLOCKS, max(1, n // _MIN_BLOCK))
    step = -(-n // b)
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


def _half_precision_mm(a: Tensor, out: Tensor) -> bool:
    """bf16/fp16 inputs multiply on a GPU's tensor cores straight into fp32 sums."""
    return a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and out.dtype == torch.float32


def addmm_(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out += a @ b, the product summed in ``out``'s precision."""
    if _half_precision_mm(a, out):
        out.add_(torch.mm(a, b, out_dtype=out.dtype))
    else:
        out.addmm_(a.to(out.dtype), b.to(out.dtype))


def gram_(accs: Sequence[Tensor], x: Tensor) -> None:
    """Add x^T x (x (M, n)) to each (n, n) accumulator, in the blocks on and above the diagonal only.

    One accumulator takes the product in place; several take the same computed product, so
    they stay equal bit for bit.
    """
    if x.dtype != accs[0].dtype and not _half_precision_mm(x, accs[0]):
        x = x.to(accs[0].dtype)
    out = accs[0] if len(accs) == 1 else torch.zeros_like(accs[0])
    for lo, hi in blocks(x.shape[1]):
        addmm_(out[lo:hi, lo:], x[:, lo:hi].T, x[:, lo:])
    if len(accs) > 1:
        for acc in accs:
            acc.add_(out)


def mirror_(acc: Tensor) -> Tensor:
    """Make a ``gram_`` accumulator the full symmetric matrix, in place: its lower blocks copied from the upper ones."""
    for lo, hi in blocks(acc.shape[-1])[:-1]:
        acc[hi:, lo:hi] = acc[lo:hi, hi:].T
    return acc


def identical_runs(mats: Sequence[Tensor]) -> list[int]:
    """For each matrix the index of the first of its run of bit-identical neighbours (itself if none).

    One host sync for all comparisons. Exact: equal sums give equal factors.
    """
    pairs = [i for i in range(1, len(mats)) if mats[i].shape == mats[i - 1].shape]
    same = torch.stack([(mats[i] == mats[i - 1]).all() for i in pairs]).tolist() if pairs else []
    first = list(range(len(mats)))
    for i, eq in zip(pairs, same, strict=True):
        if eq:
            first[i] = first[i - 1]
    return first
