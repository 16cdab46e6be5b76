"""The sums behind the Kronecker factors: token rows, shared inputs, rows or half-work Gram sums.

A factor is a Gram matrix sum_t v_t v_t^T over the influencing tokens of every batch. Four
things keep its cost near that of the GEMMs alone, on a CPU and on a GPU:

- ``TokenRows`` picks the influencing tokens of a batch once (one host sync per batch),
  instead of a boolean mask per matrix;
- A matrices whose modules read the same input tensor (q/k/v, gate/up of a transformer block)
  have identical input factors: ``sums_for`` gives them one ``GramSum``, added to once per
  input and compressed once (``align_sums_`` makes the ranks agree on these groups);
- a factor the finalize step compresses by a sketch of p << n columns keeps the rows
  themselves while there are at most n of them (``GramSum``): its products cost 2 M n p
  multiply-adds through the rows, never the M n^2 / 2 of the Gram;
- past that, ``gram_`` sums only the row blocks on and above the diagonal (the matrix is
  symmetric): ~9/16 of the multiply-adds with 8 blocks; ``mirror_`` fills in the rest, once,
  when the factor is read.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence

import torch
from torch import Tensor

from lalora.curvature.hooks import ModuleGrads
from lalora.factors import RowGram

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


def gram_(acc: Tensor, x: Tensor) -> None:
    """Add x^T x (x (M, n)) to the (n, n) accumulator, in the blocks on and above the diagonal only."""
    if x.dtype != acc.dtype and not _half_precision_mm(x, acc):
        x = x.to(acc.dtype)
    for lo, hi in blocks(x.shape[1]):
        addmm_(acc[lo:hi, lo:], x[:, lo:hi].T, x[:, lo:])


def mirror_(acc: Tensor) -> Tensor:
    """Make a ``gram_`` accumulator the full symmetric matrix, in place: its lower blocks copied from the upper ones."""
    for lo, hi in blocks(acc.shape[-1])[:-1]:
        acc[hi:, lo:hi] = acc[lo:hi, hi:].T
    return acc


class GramSum:
    """sum_t v_t v_t^T (n x n, float32) over the rows added, kept as the rows while ``keep_rows`` and at most n.

    Rows are kept only for a factor compressed by a sketch (``lalora.factors.sketched``): the
    compression multiplies through them (``RowGram``), and in n x n floats at most they take no
    more memory than the dense sum. They are held as added: float32 rows that are a whole tensor
    (a batch's activations or gradients, or their kept rows) are not copied, a view into a larger
    tensor is. The batch that would pass n rows folds them into the dense sum (``gram_``, upper
    blocks), as does an all-reduce across ranks; later rows add to it. ``owners`` are the state
    keys sharing this sum (``sums_for``).
    """

    def __init__(self, n: int, keep_rows: bool, owners: set[str]) -> None:
        self.n, self.keep_rows, self.owners = n, keep_rows, owners
        self.rows: list[Tensor] = []
        self.count = 0
        self.acc: Tensor | None = None
        """The dense sum's blocks on and above the diagonal (``gram_``), once folded."""

    def add(self, x: Tensor) -> None:
        """Add the rows x (M, n)."""
        m = int(x.shape[0])
        if self.acc is None and self.keep_rows and self.count + m <= self.n:
            x = x.float()
            if x.untyped_storage().nbytes() > x.numel() * x.element_size():
                x = x.clone()  # a view would keep the rest of its tensor alive
            self.rows.append(x)
            self.count += m
        else:
            gram_(self.dense_sum(x.device), x)

    def dense_sum(self, device: torch.device) -> Tensor:
        """The dense accumulator (upper blocks), the kept rows folded into it first."""
        if self.acc is None:
            self.acc = torch.zeros((self.n, self.n), dtype=torch.float32, device=device)
            for x in self.rows:
                gram_(self.acc, x)
            self.rows, self.count = [], 0
        return self.acc

    def all_reduce_(self) -> None:
        """Sum across ranks, in place: rows differ by rank, so they are folded first (``align_sums_``)."""
        torch.distributed.all_reduce(self.dense_sum(self.device))

    @property
    def device(self) -> torch.device:
        return self.acc.device if self.acc is not None else self.rows[0].device

    def read(self) -> Tensor | RowGram:
        """The full sum: the kept rows as a ``RowGram`` (no copy), or the dense sum mirrored in place."""
        if self.acc is None and self.rows:
            return RowGram(self.rows)
        return mirror_(self.dense_sum(self.device))

    def split(self, keys: set[str]) -> GramSum:
        """A copy of this sum owned by ``keys`` alone; they leave this one's owners."""
        self.owners -= keys
        out = copy.copy(self)
        out.owners = set(keys)
        out.rows = list(self.rows)  # the rows are never written: sharing them is a copy
        out.acc = None if self.acc is None else self.acc.clone()
        return out


def sums_for(state: dict[str, Tensor | GramSum], keys: Sequence[str], n: int, keep_rows: bool) -> list[GramSum]:
    """The sums to add one input's rows to, for the state keys of the matrices that read it.

    The first batch gives keys read together one shared sum. A later batch grouping them as the
    first did (every batch, for one model's modules) adds to it once; one grouping them otherwise
    splits each key off into its own copy, so that every key's sum stays its own history.
    """
    found = [state.get(k) for k in keys]
    if all(f is None for f in found):
        shared = GramSum(n, keep_rows, set(keys))
        for k in keys:
            state[k] = shared
        return [shared]
    first = found[0]
    if isinstance(first, GramSum) and all(f is first for f in found) and first.owners == set(keys):
        return [first]
    out = []
    for k, f in zip(keys, found, strict=True):
        if f is None:
            f = GramSum(n, keep_rows, {k})
        assert isinstance(f, GramSum)
        if f.owners != {k}:
            f = f.split({k})
        state[k] = f
        out.append(f)
    return out


def align_sums_(state: dict[str, Tensor | GramSum], device: torch.device) -> None:
    """Before an all-reduce, give every rank the same sums under the same keys (a collective: every rank calls it).

    A rank that ran no batch has none, and ranks may have grouped shared inputs differently
    (``sums_for``): the ranks exchange which keys each of their sums holds, and each then splits
    its sums into the groups every rank agrees on (keys grouped together on every rank that has
    them) and adds zero dense sums for the groups it lacks.
    """
    mine = {k: (tuple(sorted(s.owners)), s.n) for k, s in state.items() if isinstance(s, GramSum)}
    everyone: list[dict[str, tuple[tuple[str, ...], int]]] = [{} for _ in range(torch.distributed.get_world_size())]
    # NCCL sends objects from the current CUDA device, which nothing else sets: make it this rank's
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        torch.distributed.all_gather_object(everyone, mine)
    sizes = {k: n for theirs in everyone for k, (_, n) in theirs.items()}
    groups: dict[tuple[object, ...], list[str]] = {}
    for k in sorted(sizes):  # keys with the same group on every rank form one group
        groups.setdefault(tuple(theirs[k][0] if k in theirs else None for theirs in everyone), []).append(k)
    for keys in groups.values():
        held = state.get(keys[0])
        if held is None:  # this rank saw none of them
            held = GramSum(sizes[keys[0]], keep_rows=False, owners=set(keys))
            held.dense_sum(device)
        assert isinstance(held, GramSum)
        if held.owners != set(keys):
            held = held.split(set(keys))
        for k in keys:
            state[k] = held
