"""Symmetric PSD Kronecker factors, dense or compressed, and their algebra.

A K-FAC block approximates the Fisher of one matrix W (d_out, d_in) as S (x) G, with S the
(d_in, d_in) input covariance and G the (d_out, d_out) output-gradient covariance. For LoRA
one of the two is r x r and kept dense; the other is d x d and kept compressed as

    F ~ U diag(lam) U^T + diag(d)        U (n, k), lam (k,), d (n,)

the top-k eigenpairs plus the diagonal of the remainder, so the diagonal stays exact and
the factor stays PSD (both parts are). Nothing here ever forms a d x d matrix from a
compressed factor except ``to_dense`` (tests and small modules only).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


class Factor(ABC):
    """A symmetric PSD n x n matrix applied from the left or the right."""

    @property
    @abstractmethod
    def n(self) -> int: ...

    @abstractmethod
    def lmul(self, x: Tensor) -> Tensor:
        """F @ x for x (n, m)."""

    @abstractmethod
    def rmul(self, x: Tensor) -> Tensor:
        """x @ F for x (m, n)."""

    @abstractmethod
    def scale(self, c: float) -> Factor: ...

    @abstractmethod
    def diag(self) -> Tensor: ...

    @abstractmethod
    def to_dense(self) -> Tensor: ...

    @abstractmethod
    def state(self) -> dict[str, Tensor]: ...

    @abstractmethod
    def to(self, device: torch.device, dtype: torch.dtype) -> Factor: ...

    @abstractmethod
    def inverse_apply(self, x: Tensor, damping: float) -> Tensor:
        """(F + damping I)^{-1} @ x for x (n, m); damping > 0."""

    @staticmethod
    def from_state(state: Mapping[str, Tensor]) -> Factor:
        if "M" in state:
            return DenseFactor(state["M"])
        return LowRankFactor(state["U"], state["lam"], state["d"])


class DenseFactor(Factor):
    """A small factor stored as is: M (n, n)."""

    def __init__(self, m: Tensor) -> None:
        self.m = m

    @property
    def n(self) -> int:
        return int(self.m.shape[0])

    def lmul(self, x: Tensor) -> Tensor:
        return self.m @ x

    def rmul(self, x: Tensor) -> Tensor:
        return x @ self.m

    def scale(self, c: float) -> DenseFactor:
        return DenseFactor(self.m * c)

    def diag(self) -> Tensor:
        return self.m.diagonal()

    def to_dense(self) -> Tensor:
        return self.m

    def state(self) -> dict[str, Tensor]:
        return {"M": self.m}

    def to(self, device: torch.device, dtype: torch.dtype) -> DenseFactor:
        return DenseFactor(self.m.to(device, dtype))

    def inverse_apply(self, x: Tensor, damping: float) -> Tensor:
        eye = torch.eye(self.n, dtype=self.m.dtype, device=self.m.device)
        return torch.linalg.solve(self.m.double() + damping * eye.double(), x.double()).to(x.dtype)


class LowRankFactor(Factor):
    """U diag(lam) U^T + diag(d): top-k eigenpairs and the remainder's diagonal."""

    def __init__(self, u: Tensor, lam: Tensor, d: Tensor) -> None:
        self.u, self.lam, self.d = u, lam, d

    @property
    def n(self) -> int:
        return int(self.d.shape[0])

    @property
    def k(self) -> int:
        return int(self.lam.shape[0])

    def lmul(self, x: Tensor) -> Tensor:
        return self.u @ (self.lam[:, None] * (self.u.T @ x)) + self.d[:, None] * x

    def rmul(self, x: Tensor) -> Tensor:
        return ((x @ self.u) * self.lam) @ self.u.T + x * self.d

    def scale(self, c: float) -> LowRankFactor:
        return LowRankFactor(self.u, self.lam * c, self.d * c)

    def diag(self) -> Tensor:
        return (self.u.square() * self.lam).sum(1) + self.d

    def to_dense(self) -> Tensor:
        return (self.u * self.lam) @ self.u.T + torch.diag(self.d)

    def state(self) -> dict[str, Tensor]:
        return {"U": self.u, "lam": self.lam, "d": self.d}

    def to(self, device: torch.device, dtype: torch.dtype) -> LowRankFactor:
        return LowRankFactor(self.u.to(device, dtype), self.lam.to(device, dtype), self.d.to(device, dtype))

    def inverse_apply(self, x: Tensor, damping: float) -> Tensor:
        # F + damping I = D^{1/2} (I + V V^T) D^{1/2} with D = d + damping, V = D^{-1/2} U lam^{1/2};
        # (I + V V^T)^{-1} = I - V (I_k + V^T V)^{-1} V^T (Woodbury): only k x k solves.
        dd = (self.d.double() + damping).rsqrt()
        v = dd[:, None] * self.u.double() * self.lam.double().clamp_min(0).sqrt()
        y = dd[:, None] * x.double()
        inner = torch.eye(self.k, dtype=torch.float64, device=x.device) + v.T @ v
        y = y - v @ torch.linalg.solve(inner, v.T @ y)
        return (dd[:, None] * y).to(x.dtype)


def compress(m: Tensor, k: int, exact_below: int = 512, power_iters: int = 4, seed: int = 0) -> LowRankFactor:
    """The top-k eigenpairs of a symmetric PSD ``m`` (n, n) and the remainder's diagonal.

    Up to ``exact_below`` rows (and whenever k is a sizable fraction of n) a full
    eigendecomposition is used, exact when k >= n. Larger factors use randomized subspace
    iteration (Halko et al. 2011): O(n^2 k) instead of O(n^3). Either way the stored factor
    is PSD (both parts are) and its diagonal equals m's.
    """
    m = 0.5 * (m + m.T)
    n = m.shape[0]
    k = min(k, n)
    if n <= exact_below or 4 * k >= n:
        evals, evecs = torch.linalg.eigh(m.double())
        top = torch.argsort(evals, descending=True)[:k]
        u, lam = evecs[:, top], evals[top].clamp_min(0)
    else:
        g = torch.Generator(device="cpu").manual_seed(seed)
        q = torch.randn(n, k + 16, generator=g, dtype=torch.float64).to(m.device)
        md = m.double()
        for _ in range(power_iters):
            q, _ = torch.linalg.qr(md @ q)
        evals, evecs = torch.linalg.eigh(q.T @ md @ q)
        top = torch.argsort(evals, descending=True)[:k]
        u, lam = q @ evecs[:, top], evals[top].clamp_min(0)
    d = (m.double().diagonal() - (u.square() * lam).sum(1)).clamp_min(0)
    return LowRankFactor(u.to(m.dtype), lam.to(m.dtype), d.to(m.dtype))


def add(factors: Sequence[Factor], weights: Sequence[float], k: int) -> Factor:
    """sum_i w_i F_i (w_i >= 0), recompressed to rank k when the inputs are compressed.

    Dense inputs give a dense sum. Compressed inputs are merged without any n x n matrix:
    the stacked eigenvectors are orthonormalised (thin QR), the small core is
    diagonalised, the top k eigenpairs are kept and the dropped ones' diagonal moves into d.
    """
    if all(isinstance(f, DenseFactor) for f in factors):
        return DenseFactor(sum(w * f.to_dense() for f, w in zip(factors, weights)))  # type: ignore[return-value]
    if not all(isinstance(f, LowRankFactor) for f in factors):
        raise ValueError("cannot add a dense and a compressed factor")
    lows: list[LowRankFactor] = list(factors)  # type: ignore[arg-type]
    u = torch.cat([f.u.double() for f in lows], 1)
    lam = torch.cat([f.lam.double() * w for f, w in zip(lows, weights)])
    d = sum(f.d.double() * w for f, w in zip(lows, weights))
    q, r = torch.linalg.qr(u)
    evals, evecs = torch.linalg.eigh((r * lam) @ r.T)
    evals = evals.clamp_min(0)
    order = torch.argsort(evals, descending=True)
    kk = min(k, lows[0].n)
    keep, drop = order[:kk], order[kk:]
    basis = q @ evecs
    if drop.numel():
        d = d + (basis[:, drop].square() * evals[drop]).sum(1)
    dtype = lows[0].d.dtype
    return LowRankFactor(basis[:, keep].to(dtype), evals[keep].to(dtype), d.to(dtype))  # type: ignore[union-attr]


def frobenius_inner(a: Factor, b: Factor) -> float:
    """<A, B>_F = tr(A B) without forming a compressed factor densely."""
    if isinstance(a, DenseFactor) and isinstance(b, DenseFactor):
        return float((a.m.double() * b.m.double()).sum())
    if isinstance(a, LowRankFactor) and isinstance(b, LowRankFactor):
        ua, la, da = a.u.double(), a.lam.double(), a.d.double()
        ub, lb, db = b.u.double(), b.lam.double(), b.d.double()
        c = ua.T @ ub  # (ka, kb)
        low_low = float(((c * lb) * (c * la[:, None])).sum())  # tr(Ua La Ua^T Ub Lb Ub^T)
        low_d_b = float((la * ((ua.square() * db[:, None]).sum(0))).sum())
        low_d_a = float((lb * ((ub.square() * da[:, None]).sum(0))).sum())
        return low_low + low_d_b + low_d_a + float((da * db).sum())
    raise ValueError("cannot take the inner product of a dense and a compressed factor")


def top_pair_weights(gs: Tensor, gg: Tensor) -> Tensor:
    """Weights alpha of the top left singular vector sum_i alpha_i s_i of sum_i s_i g_i^T, given the
    Gram matrices gs = [<s_i, s_j>] and gg = [<g_i, g_j>] (K x K): the top eigenvector of gg @ gs,
    through the symmetric form P^T gg P with gs = P P^T. Up to scale and sign."""
    es, vs = torch.linalg.eigh(gs)
    p = vs * es.clamp_min(0).sqrt()
    _, w = torch.linalg.eigh(p.T @ gg @ p)
    return p @ w[:, -1]


def nearest_kronecker(terms: Sequence[tuple[Factor, Factor]], k: int) -> tuple[Factor, Factor, float]:
    """The single S (x) G closest in Frobenius norm to sum_i S_i (x) G_i (Van Loan-Pitsianis).

    The rearranged operator sum_i vec(S_i) vec(G_i)^T has rank <= K; its top singular pair
    lies in span(S_i) x span(G_i), so only the K x K Gram matrices are needed. PSD inputs
    have non-negative Gram entries, so the top pair has non-negative weights (Perron) and
    S, G are again PSD. Returns (S, G, relative Frobenius error of the approximation).
    """
    kk = len(terms)
    gs = torch.tensor([[frobenius_inner(a[0], b[0]) for b in terms] for a in terms], dtype=torch.float64)
    gg = torch.tensor([[frobenius_inner(a[1], b[1]) for b in terms] for a in terms], dtype=torch.float64)
    alpha = top_pair_weights(gs, gg)  # coefficients of u = sum_i alpha_i S_i, up to scale
    if float(alpha.sum()) < 0:
        alpha = -alpha
    alpha = alpha.clamp_min(0)
    norm_u = float(alpha @ gs @ alpha)
    if norm_u <= 0:  # every S_i is zero: the sum is zero
        return terms[0][0].scale(0.0), terms[0][1].scale(0.0), 0.0
    beta = (gs @ alpha) / norm_u
    beta = beta.clamp_min(0)
    s = add([t[0] for t in terms], alpha.tolist(), k)
    g = add([t[1] for t in terms], beta.tolist(), k)
    total = float(torch.ones(kk, dtype=torch.float64) @ (gs * gg) @ torch.ones(kk, dtype=torch.float64))
    approx = float(alpha @ gs @ alpha) * float(beta @ gg @ beta)
    cross = float((gs @ alpha) @ (gg @ beta))  # <sum_i S_i (x) G_i, S (x) G>
    err2 = max(total - 2 * cross + approx, 0.0)
    return s, g, (err2 / total) ** 0.5 if total > 0 else 0.0
