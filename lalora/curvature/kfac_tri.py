"""Block tri-diagonal K-FAC: K-FAC blocks plus the cross block between A and B of a module."""

from __future__ import annotations

from typing import final

import torch
from torch import Tensor

from lalora.curvature.base import MemoryEstimate, register_curvature
from lalora.curvature.hooks import ModuleGrads
from lalora.curvature.kfac import KronCurvatureBase
from lalora.kron import CrossTerm, KronTriPrecision, module_of, project_psd
from lalora.lora import LoraParam


@final
@register_curvature("kfac-tri")
class KFACTriCurvature(KronCurvatureBase):
    """C_S = E_tokens[x a_B^T] (d_in, r) and C_G = (1/N) sum_{n,t} g_A g_B^T (r, d_out) per module.

    x is A's input, a_B = A x is B's input, g_A and g_B the gradients at A's and B's
    outputs, gathered on the same tokens with the same normalisation as the diagonal
    blocks, so the joint block is a PSD covariance before compression; ``project_psd``
    keeps it PSD after.
    """

    def _init_state(self, params: list[LoraParam]) -> dict[str, Tensor]:
        state = super()._init_state(params)
        by_name = {p.name: p for p in params}
        for p in params:
            if p.kind == "A":
                b = by_name[f"{module_of(p.name)}.lora_B"]
                r, d_in = p.param.shape
                d_out = b.param.shape[0]
                state[f"XS:{module_of(p.name)}"] = p.param.new_zeros((d_in, r), dtype=torch.float32)
                state[f"XG:{module_of(p.name)}"] = p.param.new_zeros((r, d_out), dtype=torch.float32)
        return state

    def _update(self, state: dict[str, Tensor], grads: list[ModuleGrads]) -> None:
        super()._update(state, grads)
        by_name = {rec.param.name: rec for rec in grads}
        for rec in grads:
            if rec.param.kind != "A":
                continue
            m = module_of(rec.param.name)
            x_a, g_a = self._tokens(rec)
            x_b, g_b = self._tokens(by_name[f"{m}.lora_B"])
            state[f"XS:{m}"].addmm_(x_a.T, x_b)
            state[f"XG:{m}"].addmm_(g_a.T, g_b)

    def _finalize(self, state: dict[str, Tensor], n_samples: int, params: list[LoraParam]) -> KronTriPrecision:
        terms = self._terms(state, n_samples, params)
        tokens = max(float(state["__tokens__"]), 1.0)
        cross = {}
        for p in params:
            if p.kind == "A":
                m = module_of(p.name)
                raw = CrossTerm(state[f"XS:{m}"] / tokens, state[f"XG:{m}"] / n_samples)
                cross[m] = [project_psd(terms[p.name], terms[f"{m}.lora_B"], raw)]
        return KronTriPrecision({n: [t] for n, t in terms.items()}, top_k=self.top_k, max_terms=self.max_terms,
                                cross=cross)

    def memory(self, shapes: dict[str, tuple[int, ...]]) -> MemoryEstimate:
        base = super().memory(shapes)
        extra = sum(4 * (d_in * r) for n, (r, d_in) in shapes.items() if n.endswith(".lora_A"))
        extra += sum(4 * (d_out * r) for n, (d_out, r) in shapes.items() if n.endswith(".lora_B"))
        return MemoryEstimate(base.pass_bytes + extra, base.stored_bytes + extra)
