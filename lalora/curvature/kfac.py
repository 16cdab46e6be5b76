"""Block K-FAC curvature: per LoRA matrix, input covariance (x) output-gradient covariance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, final

import torch
from torch import Tensor

from lalora.curvature.base import CurvatureEstimator, FisherSettings, FisherType, MemoryEstimate, register_curvature
from lalora.curvature.hooks import ModuleGrads
from lalora.factors import DenseFactor, Factor, compress
from lalora.kron import KronPrecision, KronTerm
from lalora.lora import LoraParam

_TOKENS = "__tokens__"


@dataclass(frozen=True)
class KronSettings(FisherSettings):
    """The Kronecker structures' settings: the Fisher's, and how the large factors are stored."""

    top_k: int = field(default=32, metadata={"doc": "Eigenpairs kept of each large (d x d) factor, plus its diagonal "
                                                    "(our default).", "ge": 1})
    max_terms: int = field(default=4, metadata={"doc": "Kronecker terms kept per matrix across domains before the two "
                                                       "oldest merge into their nearest Kronecker product.", "ge": 1})


class KronCurvatureBase(CurvatureEstimator):
    """Gathers S = E_tokens[x x^T] and G = (1/N) sum_{n,t} g g^T from the same hooks as diag.

    Normalisation ("K-FAC expand", Eschenhagen et al. 2023): inputs are averaged over the
    tokens that can influence a loss, output gradients are summed over tokens and averaged
    over sequences, so S (x) G equals the per-sequence Fisher exactly when a sequence has a
    single such token. The large factor of each matrix (the d_in side of A, the d_out side
    of B) is accumulated dense during the pass (see ``memory``) and stored as its top-k
    eigenpairs plus a diagonal; the r x r side stays dense.
    """

    precision_cls: ClassVar[type[KronPrecision]] = KronPrecision
    settings = KronSettings

    def __init__(self, fisher_type: FisherType = "empirical", mc_samples: int = 1, seed: int = 0,
                 adapter_name: str = "default", top_k: int = 32, max_terms: int = 4) -> None:
        super().__init__(fisher_type, mc_samples, seed, adapter_name)
        if top_k < 1 or max_terms < 1:
            raise ValueError(f"top_k and max_terms must be >= 1, got {top_k} and {max_terms}")
        self.top_k, self.max_terms = top_k, max_terms

    def _init_state(self, params: list[LoraParam]) -> dict[str, Tensor]:
        state = {_TOKENS: torch.zeros((), dtype=torch.float64, device=params[0].param.device)}
        for p in params:
            d_out, d_in = p.param.shape
            state[f"S:{p.name}"] = p.param.new_zeros((d_in, d_in), dtype=torch.float32)
            state[f"G:{p.name}"] = p.param.new_zeros((d_out, d_out), dtype=torch.float32)
        return state

    @staticmethod
    def _tokens(rec: ModuleGrads) -> tuple[Tensor, Tensor]:
        """(M, d_in) inputs and (M, d_out) output gradients of the influencing tokens."""
        xs, gs = [], []
        for x, g in zip(rec.inputs, rec.out_grads):
            if rec.token_mask is not None:
                x, g = x[rec.token_mask], g[rec.token_mask]
            xs.append(x.reshape(-1, x.shape[-1]).float())
            gs.append(g.reshape(-1, g.shape[-1]).float())
        return torch.cat(xs), torch.cat(gs)

    def _update(self, state: dict[str, Tensor], grads: list[ModuleGrads]) -> None:
        for rec in grads:
            x, g = self._tokens(rec)
            state[f"S:{rec.param.name}"].addmm_(x.T, x)
            state[f"G:{rec.param.name}"].addmm_(g.T, g)
        first = grads[0]
        count = first.token_mask.sum() if first.token_mask is not None else first.inputs[0].shape[0] * first.inputs[0].shape[1]
        state[_TOKENS] += float(count) * len(first.inputs)

    def _factor(self, m: Tensor, small: bool) -> Factor:
        return DenseFactor(m) if small else compress(m, self.top_k)

    def _terms(self, state: dict[str, Tensor], n_samples: int, params: list[LoraParam]) -> dict[str, KronTerm]:
        tokens = max(float(state[_TOKENS]), 1.0)
        terms = {}
        for p in params:
            s, g = state[f"S:{p.name}"] / tokens, state[f"G:{p.name}"] / n_samples
            if p.kind == "A":  # A (r, d_in): S is d_in x d_in, G is r x r
                terms[p.name] = KronTerm(self._factor(s, small=False), self._factor(g, small=True))
            else:  # B (d_out, r): S is r x r, G is d_out x d_out
                terms[p.name] = KronTerm(self._factor(s, small=True), self._factor(g, small=False))
        return terms

    def _finalize(self, state: dict[str, Tensor], n_samples: int, params: list[LoraParam]) -> KronPrecision:
        terms = self._terms(state, n_samples, params)
        return KronPrecision({n: [t] for n, t in terms.items()}, top_k=self.top_k, max_terms=self.max_terms)

    def memory(self, shapes: dict[str, tuple[int, ...]]) -> MemoryEstimate:
        """Dense fp32 accumulators during the pass; compressed factors when stored."""
        pass_bytes = stored = 0
        for name, (d_out, d_in) in shapes.items():
            pass_bytes += 4 * (d_in * d_in + d_out * d_out)
            small, large = (d_out, d_in) if name.endswith(".lora_A") else (d_in, d_out)
            k = min(self.top_k, large)
            stored += 4 * (small * small + large * k + k + large)
        return MemoryEstimate(pass_bytes=pass_bytes, stored_bytes=stored)


@final
@register_curvature("kfac")
class KFACCurvature(KronCurvatureBase):
    """Block K-FAC: one Kronecker block per LoRA matrix."""
