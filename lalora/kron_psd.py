"""Keeping a kfac-tri joint block positive semi-definite: its cross block shrunk to fit, many modules at once.

For PD diagonal blocks P, Q the joint matrix [[P, C], [C^T, Q]] is PSD iff
||P^-1/2 C Q^-1/2|| <= 1; for Kronecker blocks P = S_A (x) G_A, Q = S_B (x) G_B and
C = C_S (x) C_G that norm is the product rho_S * rho_G of the factor-wise norms. Modules whose
factors have the same kinds and sizes are computed together, a fixed number of batched kernels
per group with no host sync (``project_psd_many``): a model's modules come in a few shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import cast

import torch
from torch import Tensor

from lalora.factors import CrossTerm, DenseFactor, Factor, KronTerm, LowRankFactor

Item = tuple[KronTerm, KronTerm, CrossTerm]
"""(A's term, B's term, their cross block) of one module."""


class _Stack:
    """L factors of one kind and size, stacked once in float64: (L, n, n) dense or U (L, n, k), lam, d."""

    def __init__(self, fs: Sequence[Factor]) -> None:
        self.dense = isinstance(fs[0], DenseFactor)
        self.n = fs[0].n
        if self.dense:
            self.m = torch.stack([f.to_dense() for f in fs]).double()
        else:
            lows: list[LowRankFactor] = list(fs)  # type: ignore[arg-type]
            self.u = torch.stack([f.u for f in lows]).double()
            self.lam = torch.stack([f.lam for f in lows]).double().clamp_min(0)
            self.d = torch.stack([f.d for f in lows]).double()

    def diag_mean(self) -> Tensor:
        if self.dense:
            return self.m.diagonal(dim1=-2, dim2=-1).mean(-1)
        return ((self.u.square() * self.lam[:, None, :]).sum(-1) + self.d).mean(-1)

    def to_dense(self) -> Tensor:
        return self.m if self.dense else (self.u * self.lam[:, None, :]) @ self.u.mT + torch.diag_embed(self.d)

    def inverse_apply(self, x: Tensor, damping: Tensor) -> Tensor:
        """(F_i + damping_i I)^-1 x_i, x (L, n, m): a batched solve, or Woodbury for compressed factors
        (as ``LowRankFactor.inverse_apply``), so no d x d matrix is formed."""
        if self.dense:
            eye = torch.eye(self.n, dtype=self.m.dtype, device=self.m.device)
            solved: Tensor = torch.linalg.solve(self.m + damping[:, None, None] * eye, x)
            return solved
        dd = (self.d + damping[:, None]).rsqrt()
        v = dd[..., None] * self.u * self.lam.sqrt()[:, None, :]
        y = dd[..., None] * x
        inner = torch.eye(v.shape[-1], dtype=v.dtype, device=v.device) + v.mT @ v
        small: Tensor = torch.linalg.solve(inner, v.mT @ y)
        return dd[..., None] * (y - v @ small)

    def inv_sqrt(self, damping: Tensor) -> Tensor:
        """(F_i + damping_i I)^-1/2, (L, n, n): for the small (r x r) side."""
        eye = torch.eye(self.n, dtype=torch.float64, device=damping.device)
        e: Tensor
        v: Tensor
        e, v = torch.linalg.eigh(self.to_dense() + damping[:, None, None] * eye)
        return (v * e.clamp_min(damping[:, None]).rsqrt()[:, None, :]) @ v.mT


def _norm_ratios(left: _Stack, cross: Tensor, right: _Stack, rel_damping: float) -> Tensor:
    """(L,): || L_i^-1/2 C_i R_i^-1/2 ||_2, C (L, n_left, n_right) float64, both factors damped by
    ``rel_damping`` times the larger mean diagonal of the pair (at least 1e-30).

    Only the smaller side is made dense (it is r x r); the other is applied through its inverse.
    """
    damping = (torch.maximum(left.diag_mean(), right.diag_mean()) * rel_damping).clamp_min(1e-30)
    if right.n <= left.n:
        m = cross.mT @ left.inverse_apply(cross, damping)  # C^T L^-1 C  (n_right, n_right)
        w = right.inv_sqrt(damping)
    else:
        m = cross @ right.inverse_apply(cross.mT, damping)  # C R^-1 C^T  (n_left, n_left)
        w = left.inv_sqrt(damping)
    eigenvalues: Tensor = torch.linalg.eigvalsh(w @ m @ w)
    return eigenvalues[..., -1].clamp_min(0).sqrt()


def _kind(f: Factor) -> tuple[str | int, ...]:
    return ("dense", f.n) if isinstance(f, DenseFactor) else ("low", f.n, cast(LowRankFactor, f).k)


def _side_norms(items: Sequence[Item], side: str, rel_damping: float) -> Tensor:
    """(L,): rho of one side (``s`` or ``g``) of every module, modules whose factors agree on that side together."""
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, (a, b, c) in enumerate(items):
        fa, fb, x = getattr(a, side), getattr(b, side), getattr(c, side)
        groups.setdefault((_kind(fa), _kind(fb), tuple(x.shape), x.dtype, x.device), []).append(i)
    rho: list[Tensor | None] = [None] * len(items)
    for idx in groups.values():
        left = _Stack([getattr(items[i][0], side) for i in idx])
        right = _Stack([getattr(items[i][1], side) for i in idx])
        cross = torch.stack([getattr(items[i][2], side) for i in idx]).double()
        for i, r in zip(idx, _norm_ratios(left, cross, right, rel_damping).unbind(0), strict=True):
            rho[i] = r
    return torch.stack(rho)  # type: ignore[arg-type]


def psd_scales(items: Sequence[Item], rel_damping: float = 1e-6, margin: float = 1e-3) -> list[Tensor]:
    """Per module, the factor (a 0-d float64 tensor in (0, 1]) its cross block C_G must be scaled by.

    The factors are damped by ``rel_damping`` times their mean diagonal (a conservative bound:
    damping only enlarges P and Q); the factor is (1 - margin) / (rho_S rho_G) where that
    product exceeds 1 - margin, else 1.
    """
    rho = _side_norms(items, "s", rel_damping) * _side_norms(items, "g", rel_damping)
    return list(torch.where(rho > 1 - margin, (1 - margin) / rho, torch.ones_like(rho)).unbind(0))


def project_psd_many(items: Sequence[Item], rel_damping: float = 1e-6, margin: float = 1e-3) -> list[CrossTerm]:
    """Each cross block shrunk, where needed, so that its module's joint block is PSD (``psd_scales``)."""
    scales = psd_scales(items, rel_damping, margin)
    return [replace(c, g=c.g * s.to(c.g.dtype)) for (_, _, c), s in zip(items, scales, strict=True)]


def project_psd(
    a: KronTerm, b: KronTerm, cross: CrossTerm, rel_damping: float = 1e-6, margin: float = 1e-3
) -> CrossTerm:
    """The cross block shrunk, if needed, so that [[S_A (x) G_A, C], [C^T, S_B (x) G_B]] is PSD.

    One module (``psd_scales``); the block itself comes back when it already fits.
    """
    (scale,) = psd_scales([(a, b, cross)], rel_damping, margin)
    if float(scale) >= 1:  # this is a CPU-GPU sync point
        return cross
    return replace(cross, g=cross.g * scale.to(cross.g.dtype))
