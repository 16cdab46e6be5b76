"""The Kronecker penalty kernel: LoRA modules of equal shapes evaluated as one batch.

Per call the quadratic form of a Kronecker precision is a handful of small matrix products
per matrix; over the ~100-500 LoRA matrices of a real model the per-op overhead would
dominate. Modules with the same A and B shapes (q/k/v/o of every layer, say) are stacked
once, so each group costs a fixed number of batched kernels (``bmm``) whatever its size:
per term two products per matrix kind, plus the cross block for ``kfac-tri``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import Tensor

from lalora.factors import DenseFactor, Factor, LowRankFactor


def module_of(name: str) -> str:
    """The LoRA module a matrix belongs to: ``x.lora_A`` -> ``x``."""
    return name.rsplit(".", 1)[0]


class KronBlocks(Protocol):
    """What the kernel reads of a Kronecker precision (``lalora.kron``'s KronPrecision and its tri subclass):
    the matrices' names, per matrix its terms (each with factors ``s`` and ``g``) and its ridge, and for kfac-tri
    the cross blocks per module (an attribute ``cross``, read when present). Structural, so that this module,
    which ``lalora.kron`` imports, imports nothing of it back."""

    @property
    def names(self) -> list[str]: ...

    @property
    def blocks(self) -> Mapping[str, Sequence[Any]]: ...

    @property
    def ridge(self) -> Mapping[str, float]: ...


class _Stacked:
    """L factors of one kind and size, applied batched to (L, ., .) tensors."""

    def __init__(self, factors: Sequence[Factor], device: torch.device, dtype: torch.dtype) -> None:
        first = factors[0]
        self.dense = isinstance(first, DenseFactor)
        if self.dense:
            self.m = torch.stack([f.to_dense() for f in factors]).to(device, dtype)
        else:
            lows: list[LowRankFactor] = list(factors)  # type: ignore[arg-type]
            self.u = torch.stack([f.u for f in lows]).to(device, dtype)  # (L, n, k)
            self.ut = self.u.transpose(1, 2).contiguous()  # (L, k, n)
            self.lam = torch.stack([f.lam for f in lows]).to(device, dtype)  # (L, k)
            self.d = torch.stack([f.d for f in lows]).to(device, dtype)  # (L, n)

    def lmul(self, x: Tensor) -> Tensor:
        """F @ x, x (L, n, m)."""
        if self.dense:
            return torch.bmm(self.m, x)
        return torch.baddbmm(self.d[:, :, None] * x, self.u, self.lam[:, :, None] * torch.bmm(self.ut, x))

    def rmul(self, x: Tensor) -> Tensor:
        """x @ F, x (L, m, n)."""
        if self.dense:
            return torch.bmm(x, self.m)
        return torch.baddbmm(x * self.d[:, None, :], torch.bmm(x, self.u) * self.lam[:, None, :], self.ut)


def _signature(f: Factor) -> tuple[str | int, ...]:
    return ("dense", f.n) if isinstance(f, DenseFactor) else ("low", f.n, cast(LowRankFactor, f).k)


@dataclass
class _Group:
    """Modules whose A, B and factors have the same shapes; index lists into the flat parameter list."""

    a_idx: list[int]
    b_idx: list[int]
    n_terms: int
    a_terms: tuple[_Stacked, _Stacked]  # (S, G), batch index = term * L + module
    b_terms: tuple[_Stacked, _Stacked]
    ridge_a: Tensor  # (L, 1, 1)
    ridge_b: Tensor
    cross: list[tuple[Tensor, Tensor, Tensor, Tensor]]  # C_S (L, d_in, r), C_S^T, C_G (L, r, d_out), C_G^T per term
    anchor_a: Tensor  # (L, r, d_in)
    anchor_b: Tensor  # (L, d_out, r)

    def matvec(self, da: Tensor, db: Tensor) -> tuple[Tensor, Tensor]:
        ma = da * self.ridge_a + self._apply(self.a_terms, da)
        mb = db * self.ridge_b + self._apply(self.b_terms, db)
        for cs, cst, cg, cgt in self.cross:  # r x r products first: never a d_out x d_in matrix
            ma = ma + torch.bmm(torch.bmm(cg, db), cst)
            mb = mb + torch.bmm(cgt, torch.bmm(da, cs))
        return ma, mb

    def _apply(self, terms: tuple[_Stacked, _Stacked], x: Tensor) -> Tensor:
        """sum_t G_t x S_t with the terms as extra batch entries: the op count does not grow with T."""
        s, g = terms
        if self.n_terms == 1:
            return g.lmul(s.rmul(x))
        y = g.lmul(s.rmul(x.repeat(self.n_terms, 1, 1)))
        return y.view(self.n_terms, *x.shape).sum(0)


def bind_grouped(prec: KronBlocks, params: Mapping[str, Tensor], anchor: Mapping[str, Tensor]) -> Callable[[], Tensor]:
    """A closure computing delta^T Lambda delta for a KronPrecision (or KronTriPrecision).

    One autograd node; its backward is the closed form 2 Lambda delta, computed in the
    forward without building a graph.
    """
    names = prec.names
    modules = sorted({module_of(n) for n in names}, key=lambda m: names.index(f"{m}.lora_A"))
    ref = params[names[0]]
    plist: list[Tensor] = []
    groups: list[_Group] = []
    for ms in _buckets(prec, params, modules).values():
        a_names, b_names = [f"{m}.lora_A" for m in ms], [f"{m}.lora_B" for m in ms]
        a_idx = list(range(len(plist), len(plist) + len(ms)))
        plist.extend(params[n] for n in a_names)
        b_idx = list(range(len(plist), len(plist) + len(ms)))
        plist.extend(params[n] for n in b_names)
        groups.append(_group(prec, ms, anchor, (a_idx, b_idx), ref.device, ref.dtype))

    def quad() -> Tensor:
        out: Tensor = _GroupedQuadForm.apply(groups, *plist)
        return out

    return quad


def _buckets(prec: KronBlocks, params: Mapping[str, Tensor], modules: list[str]) -> dict[tuple[object, ...], list[str]]:
    """The modules grouped by shape: the key fixes the number of terms and each term's factor kinds and sizes."""
    cross = getattr(prec, "cross", {})
    buckets: dict[tuple[object, ...], list[str]] = {}
    for m in modules:
        a, b = f"{m}.lora_A", f"{m}.lora_B"
        key = (
            tuple(params[a].shape),
            tuple(params[b].shape),
            tuple((_signature(t.s), _signature(t.g)) for t in prec.blocks[a]),
            tuple((_signature(t.s), _signature(t.g)) for t in prec.blocks[b]),
            len(cross.get(m, [])),
        )
        buckets.setdefault(key, []).append(m)
    return buckets


def _group(
    prec: KronBlocks,
    ms: list[str],
    anchor: Mapping[str, Tensor],
    idx: tuple[list[int], list[int]],
    device: torch.device,
    dtype: torch.dtype,
) -> _Group:
    """One bucket's stacked factors, ridges, cross terms and anchors; ``idx``: its A and B matrices' positions."""
    a_names, b_names = [f"{m}.lora_A" for m in ms], [f"{m}.lora_B" for m in ms]
    n_terms = len(prec.blocks[a_names[0]])
    cross = getattr(prec, "cross", {})

    def terms(ns: list[str]) -> tuple[_Stacked, _Stacked]:
        order = [(i, n) for i in range(n_terms) for n in ns]  # term-major, as _Group._apply reads it
        return (
            _Stacked([prec.blocks[n][i].s for i, n in order], device, dtype),
            _Stacked([prec.blocks[n][i].g for i, n in order], device, dtype),
        )

    def ridge(ns: list[str]) -> Tensor:
        return torch.tensor([prec.ridge[n] for n in ns], device=device, dtype=dtype)[:, None, None]

    xs = []
    for i in range(len(cross.get(ms[0], []))):
        cs = torch.stack([cross[m][i].s for m in ms]).to(device, dtype)
        cg = torch.stack([cross[m][i].g for m in ms]).to(device, dtype)
        xs.append((cs, cs.transpose(1, 2).contiguous(), cg, cg.transpose(1, 2).contiguous()))
    return _Group(
        idx[0],
        idx[1],
        n_terms,
        terms(a_names),
        terms(b_names),
        ridge(a_names),
        ridge(b_names),
        xs,
        torch.stack([anchor[n].detach() for n in a_names]).to(device, dtype),
        torch.stack([anchor[n].detach() for n in b_names]).to(device, dtype),
    )


class _GroupedQuadForm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, groups: list[_Group], *params: Tensor) -> Tensor:
        total = params[0].new_zeros((), dtype=torch.float32)
        grads: list[Tensor | None] = [None] * len(params)
        with torch.no_grad():
            for grp in groups:
                da = torch.stack([params[i] for i in grp.a_idx]) - grp.anchor_a
                db = torch.stack([params[i] for i in grp.b_idx]) - grp.anchor_b
                ma, mb = grp.matvec(da, db)
                total = total + (da * ma).sum(dtype=torch.float32) + (db * mb).sum(dtype=torch.float32)
                for i, g in zip(grp.a_idx, ma.unbind(0), strict=True):
                    grads[i] = g
                for i, g in zip(grp.b_idx, mb.unbind(0), strict=True):
                    grads[i] = g
        ctx.grads = grads
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        scale = 2.0 * grad_out
        grads = [g * scale.to(g.dtype) for g in ctx.grads]
        del ctx.grads
        return (None, *grads)
