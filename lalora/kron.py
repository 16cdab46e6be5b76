"""Kronecker-factored precisions: block K-FAC (``kfac``) and block tri-diagonal K-FAC (``kfac-tri``).

For one LoRA matrix W (d_out, d_in) a term S (x) G acts on a displacement as
vec^-1((S (x) G) vec(dW)) = G dW S, so the quadratic form is <dW, G dW S> and no Kronecker
product or dense d x d matrix is ever built. A matrix carries a short list of such terms,
one per accumulated domain (a sum of Kronecker products is not a Kronecker product); past
``max_terms`` the two oldest are merged into their nearest Kronecker product.

``kfac-tri`` adds, per LoRA module, the cross block between A (r, d_in) and B (d_out, r):
C_S (x) C_G with C_S = E[x a_B^T] (d_in, r) and C_G = E[g_A g_B^T] (r, d_out). Its
contribution to the quadratic form is 2 <dA, C_G dB C_S^T>. The joint block of each term
is kept positive semi-definite by construction: with exact factors the cross factors are
cross-covariances of jointly observed vectors, so ||S_A^-1/2 C_S S_B^-1/2|| <= 1 and the same
for G (Cauchy-Schwarz), and the product of the two norms bounds the normalised cross block;
after compression the product is recomputed and, if it exceeds 1, the cross block is
shrunk to fit (``project_psd``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar, cast

import torch
from torch import Tensor

from lalora.factors import CrossTerm, Factor, KronTerm, nearest_kronecker, top_pair_weights
from lalora.kron_bind import bind_grouped, module_of
from lalora.kron_psd import project_psd, project_psd_many
from lalora.precision import Precision, Prior, register_precision

_SEP = "|"


@register_precision
class KronPrecision(Precision):
    """Per LoRA matrix a list of Kronecker terms, plus an optional ridge tau * I (the prior)."""

    structure: ClassVar[str] = "kfac"

    def __init__(
        self,
        blocks: Mapping[str, list[KronTerm]],
        *,
        top_k: int,
        max_terms: int,
        ridge: Mapping[str, float] | None = None,
    ) -> None:
        if max_terms < 1:
            raise ValueError(f"max_terms must be >= 1, got {max_terms}")
        self.blocks: dict[str, list[KronTerm]] = {n: list(t) for n, t in blocks.items()}
        self.top_k, self.max_terms = int(top_k), int(max_terms)
        self.ridge: dict[str, float] = {n: float((ridge or {}).get(n, 0.0)) for n in self.blocks}

    # --- structure ---------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.blocks)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: (t[0].g.n, t[0].s.n) for n, t in self.blocks.items()}

    @property
    def n_terms(self) -> int:
        return max(len(t) for t in self.blocks.values())

    def _new(self, blocks: Mapping[str, list[KronTerm]], ridge: Mapping[str, float], **extra: object) -> KronPrecision:
        return type(self)(blocks, top_k=self.top_k, max_terms=self.max_terms, ridge=ridge)

    # --- algebra -----------------------------------------------------------------------
    def __add__(self, other: KronPrecision) -> KronPrecision:
        """Terms are concatenated (exact) until ``max_terms``; then the oldest two merge."""
        self._check_compatible(other)
        blocks = {n: self.blocks[n] + other.blocks[n] for n in self.blocks}
        out = self._new(blocks, {n: self.ridge[n] + other.ridge[n] for n in self.blocks}, other=other)
        return out._merged()

    def _merged(self) -> KronPrecision:
        blocks = dict(self.blocks)
        for n, terms in blocks.items():
            while len(terms) > self.max_terms:
                s, g, _ = nearest_kronecker([(t.s, t.g) for t in terms[:2]], self.top_k)
                terms = [KronTerm(s, g), *terms[2:]]
            blocks[n] = terms
        return self._new(blocks, self.ridge)

    def scale(self, factor: float) -> KronPrecision:
        if factor < 0:
            raise ValueError(f"a precision can only be scaled by a non-negative factor, got {factor}")
        blocks = {n: [KronTerm(t.s, t.g.scale(factor)) for t in terms] for n, terms in self.blocks.items()}
        return self._new(blocks, {n: r * factor for n, r in self.ridge.items()}, factor=factor)

    def with_prior(self, prior: Prior) -> KronPrecision:
        return self._new(self.blocks, {n: r + prior.for_name(n) for n, r in self.ridge.items()})

    def matvec(self, delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Lambda delta per matrix: sum_terms G dW S + tau dW (no dense d x d matrix)."""
        out: dict[str, Tensor] = {}
        for n, terms in self.blocks.items():
            d = delta[n]
            acc = d * self.ridge[n] if self.ridge[n] else torch.zeros_like(d)
            for t in terms:
                acc = acc + t.g.lmul(t.s.rmul(d))
            out[n] = acc
        return out

    def quad_form(self, delta: Mapping[str, Tensor]) -> Tensor:
        dtype = self.blocks[self.names[0]][0].s.diag().dtype
        delta = {n: d.to(dtype) for n, d in delta.items()}
        mv = self.matvec(delta)
        return torch.stack([(delta[n] * mv[n]).sum() for n in self.names]).sum()

    def diagonal(self) -> dict[str, Tensor]:
        """Element (i, j) of matrix W is sum_terms G_ii S_jj + tau (cross blocks are off-diagonal)."""
        return {
            n: sum(torch.outer(t.g.diag(), t.s.diag()) for t in ts) + self.ridge[n]  # type: ignore[misc]
            for n, ts in self.blocks.items()
        }

    def to_device(self, device: torch.device, dtype: torch.dtype) -> KronPrecision:
        blocks = {
            n: [KronTerm(t.s.to(device, dtype), t.g.to(device, dtype)) for t in ts] for n, ts in self.blocks.items()
        }
        return self._new(blocks, self.ridge)

    def bind(self, params: Mapping[str, Tensor], anchor: Mapping[str, Tensor]) -> Callable[[], Tensor]:
        """One autograd node over modules batched by shape (``kron_bind``); backward is 2 Lambda delta."""
        self._check_names(params)
        return bind_grouped(self, params, anchor)

    def to_dense(self) -> Tensor:
        """The full precision over all LoRA parameters (column-major vec per matrix). Tests only."""
        return _dense(self)

    # --- serialisation -----------------------------------------------------------------
    def to_state_dict(self) -> dict[str, Tensor]:
        state: dict[str, Tensor] = {
            "_config.top_k": torch.tensor(self.top_k),
            "_config.max_terms": torch.tensor(self.max_terms),
        }
        for n, terms in self.blocks.items():
            for i, t in enumerate(terms):
                for side, f in (("S", t.s), ("G", t.g)):
                    for key, v in f.state().items():
                        state[_SEP.join((n, str(i), side, key))] = v.detach().contiguous()
            if self.ridge[n]:
                state[_SEP.join((n, "ridge"))] = torch.tensor(self.ridge[n])
        return state

    @classmethod
    def _parse_state(
        cls, state: Mapping[str, Tensor]
    ) -> tuple[dict[str, list[KronTerm]], dict[str, float], dict[str, int]]:
        config = {k.split(".", 1)[1]: int(v) for k, v in state.items() if k.startswith("_config.")}
        parts: dict[str, dict[int, dict[str, dict[str, Tensor]]]] = {}
        ridge: dict[str, float] = {}
        for key, v in state.items():
            fields = key.split(_SEP)
            if key.startswith("_config.") or (len(fields) == 3 and fields[1].startswith("x")):
                continue
            if len(fields) == 2 and fields[1] == "ridge":
                ridge[fields[0]] = float(v)
                continue
            if len(fields) != 4:
                raise ValueError(f"unexpected tensor {key!r} in a {cls.structure} precision")
            name, i, side, part = fields
            parts.setdefault(name, {}).setdefault(int(i), {}).setdefault(side, {})[part] = v
        blocks = {
            n: [KronTerm(Factor.from_state(t[i]["S"]), Factor.from_state(t[i]["G"])) for i in sorted(t)]
            for n, t in parts.items()
        }
        return blocks, ridge, config

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor]) -> KronPrecision:
        blocks, ridge, config = cls._parse_state(state)
        return cls(blocks, top_k=config.get("top_k", 32), max_terms=config.get("max_terms", 4), ridge=ridge)


@register_precision
class KronTriPrecision(KronPrecision):
    """K-FAC blocks plus, per module and term, the cross block between its A and B."""

    structure: ClassVar[str] = "kfac-tri"

    def __init__(
        self,
        blocks: Mapping[str, list[KronTerm]],
        *,
        top_k: int,
        max_terms: int,
        ridge: Mapping[str, float] | None = None,
        cross: Mapping[str, list[CrossTerm]] | None = None,
    ) -> None:
        super().__init__(blocks, top_k=top_k, max_terms=max_terms, ridge=ridge)
        self.cross: dict[str, list[CrossTerm]] = {m: list(c) for m, c in (cross or {}).items()}
        for m, terms in self.cross.items():
            if len(terms) != len(self.blocks[f"{m}.lora_A"]) or len(terms) != len(self.blocks[f"{m}.lora_B"]):
                raise ValueError(f"module {m}: cross terms and K-FAC terms disagree in number")

    def _new(
        self, blocks: Mapping[str, list[KronTerm]], ridge: Mapping[str, float], **extra: object
    ) -> KronTriPrecision:
        cross = self.cross
        if "other" in extra:
            other: KronTriPrecision = extra["other"]  # type: ignore[assignment]
            cross = {m: cross[m] + other.cross[m] for m in cross}
        if "factor" in extra:
            c = float(extra["factor"])  # type: ignore[arg-type]
            cross = {m: [CrossTerm(t.s, t.g * c) for t in ts] for m, ts in cross.items()}
        return KronTriPrecision(blocks, top_k=self.top_k, max_terms=self.max_terms, ridge=ridge, cross=cross)

    def _merged(self) -> KronTriPrecision:
        blocks, cross = dict(self.blocks), dict(self.cross)
        for m, xterms in cross.items():
            a, b = f"{m}.lora_A", f"{m}.lora_B"
            ta, tb = blocks[a], blocks[b]
            while len(xterms) > self.max_terms:
                sa, ga, _ = nearest_kronecker([(t.s, t.g) for t in ta[:2]], self.top_k)
                sb, gb, _ = nearest_kronecker([(t.s, t.g) for t in tb[:2]], self.top_k)
                xs, xg = _nearest_kronecker_rect([(t.s, t.g) for t in xterms[:2]])
                new_a, new_b = KronTerm(sa, ga), KronTerm(sb, gb)
                ta, tb = [new_a, *ta[2:]], [new_b, *tb[2:]]
                xterms = [project_psd(new_a, new_b, CrossTerm(xs, xg)), *xterms[2:]]
            blocks[a], blocks[b], cross[m] = ta, tb, xterms
        out = KronTriPrecision(blocks, top_k=self.top_k, max_terms=self.max_terms, ridge=self.ridge, cross=cross)
        return out

    def matvec(self, delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = super().matvec(delta)
        for m, terms in self.cross.items():
            a, b = f"{m}.lora_A", f"{m}.lora_B"
            for t in terms:
                out[a] = out[a] + (t.g @ delta[b]) @ t.s.T  # [(r, d_out)(d_out, r)](r, d_in)
                out[b] = out[b] + t.g.T @ (delta[a] @ t.s)  # (d_out, r)[(r, d_in)(d_in, r)]
        return out

    def to_device(self, device: torch.device, dtype: torch.dtype) -> KronTriPrecision:
        base = super().to_device(device, dtype)
        cross = {
            m: [CrossTerm(t.s.to(device, dtype), t.g.to(device, dtype)) for t in ts] for m, ts in self.cross.items()
        }
        return KronTriPrecision(base.blocks, top_k=self.top_k, max_terms=self.max_terms, ridge=self.ridge, cross=cross)

    def to_state_dict(self) -> dict[str, Tensor]:
        state = super().to_state_dict()
        for m, terms in self.cross.items():
            for i, t in enumerate(terms):
                state[_SEP.join((m, f"x{i}", "S"))] = t.s.detach().contiguous()
                state[_SEP.join((m, f"x{i}", "G"))] = t.g.detach().contiguous()
        return state

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor]) -> KronTriPrecision:
        blocks, ridge, config = cls._parse_state(state)
        raw: dict[str, dict[int, dict[str, Tensor]]] = {}
        for key, v in state.items():
            fields = key.split(_SEP)
            if len(fields) == 3 and fields[1].startswith("x"):
                raw.setdefault(fields[0], {}).setdefault(int(fields[1][1:]), {})[fields[2]] = v
        cross = {m: [CrossTerm(t[i]["S"], t[i]["G"]) for i in sorted(t)] for m, t in raw.items()}
        return cls(
            blocks, top_k=config.get("top_k", 32), max_terms=config.get("max_terms", 4), ridge=ridge, cross=cross
        )


def _dense(p: KronPrecision) -> Tensor:
    names = p.names
    sizes = [int(torch.tensor(p.shapes[n]).prod()) for n in names]
    offsets = dict(zip(names, torch.tensor([0, *sizes]).cumsum(0).tolist()[:-1], strict=True))
    total = sum(sizes)
    out = torch.zeros(total, total, dtype=torch.float64)
    for n, terms in p.blocks.items():
        o, size = offsets[n], int(torch.tensor(p.shapes[n]).prod())
        block = sum(torch.kron(t.s.to_dense().double(), t.g.to_dense().double()) for t in terms)
        out[o : o + size, o : o + size] = block + p.ridge[n] * torch.eye(size, dtype=torch.float64)
    for m, terms in getattr(p, "cross", {}).items():
        a, b = f"{m}.lora_A", f"{m}.lora_B"
        oa, ob = offsets[a], offsets[b]
        na, nb = int(torch.tensor(p.shapes[a]).prod()), int(torch.tensor(p.shapes[b]).prod())
        c = cast(Tensor, sum(torch.kron(t.s.double(), t.g.double()) for t in terms))
        out[oa : oa + na, ob : ob + nb] = c
        out[ob : ob + nb, oa : oa + na] = c.T
    return out


def _nearest_kronecker_rect(terms: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Nearest single C_S (x) C_G to sum_i C_S_i (x) C_G_i for rectangular (cross) factors."""
    s = torch.stack([t[0].double().reshape(-1) for t in terms])
    g = torch.stack([t[1].double().reshape(-1) for t in terms])
    gs, gg = s @ s.T, g @ g.T
    alpha = top_pair_weights(gs, gg)
    norm = float(alpha @ gs @ alpha)
    if norm <= 0:
        return terms[0][0] * 0, terms[0][1] * 0
    beta = (gs @ alpha) / norm
    dtype = terms[0][0].dtype
    return ((alpha @ s).reshape(terms[0][0].shape).to(dtype), (beta @ g).reshape(terms[0][1].shape).to(dtype))


__all__ = ["CrossTerm", "KronPrecision", "KronTerm", "KronTriPrecision", "module_of", "project_psd", "project_psd_many"]
