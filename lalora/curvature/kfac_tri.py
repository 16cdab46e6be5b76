"""Block tri-diagonal K-FAC: K-FAC blocks plus the cross block between A and B of a module."""

from __future__ import annotations

from typing import final

from lalora.curvature.base import MemoryEstimate, State, register_curvature
from lalora.curvature.kfac import KronCurvatureBase
from lalora.kron import KronTriPrecision, project_psd_many
from lalora.lora import LoraParam


@final
@register_curvature("kfac-tri")
class KFACTriCurvature(KronCurvatureBase):
    """C_S = E_tokens[x a_B^T] (d_in, r) and C_G = (1/N) sum_{n,t} g_A g_B^T (r, d_out) per module.

    x is A's input, a_B = A x is B's input, g_A and g_B the gradients at A's and B's
    outputs, gathered on the same tokens with the same normalisation as the diagonal
    blocks, so the joint block is a PSD covariance before compression; ``project_psd_many``
    keeps it PSD after. Since a_B = A x and g_A = g_B B, C_S = S_A A^T and C_G = B^T G_B come
    from the K-FAC sums themselves (``_terms``): no per-batch work beyond block K-FAC's.
    """

    def _finalize(self, state: State, n_samples: int, params: list[LoraParam]) -> KronTriPrecision:
        terms, raw = self._terms(state, n_samples, params)
        items = [(terms[f"{m}.lora_A"], terms[f"{m}.lora_B"], c) for m, c in raw.items()]
        cross = {m: [c] for m, c in zip(raw, project_psd_many(items), strict=True)}  # modules of one shape in one batch
        return KronTriPrecision(
            {n: [t] for n, t in terms.items()}, top_k=self.top_k, max_terms=self.max_terms, cross=cross
        )

    def memory(self, shapes: dict[str, tuple[int, ...]]) -> MemoryEstimate:
        base = super().memory(shapes)
        extra = sum(4 * (d_in * r) for n, (r, d_in) in shapes.items() if n.endswith(".lora_A"))
        extra += sum(4 * (d_out * r) for n, (d_out, r) in shapes.items() if n.endswith(".lora_B"))
        return MemoryEstimate(base.pass_bytes + extra, base.stored_bytes + extra)
