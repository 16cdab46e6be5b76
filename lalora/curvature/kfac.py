"""Block K-FAC curvature: per LoRA matrix, input covariance (x) output-gradient covariance."""

from __future__ import annotations

from typing import ClassVar, final

import torch
from torch import Tensor

from lalora.curvature.base import CurvatureEstimator, MemoryEstimate, State, distributed, register_curvature
from lalora.curvature.hooks import ModuleGrads
from lalora.curvature.kron_stats import GramSum, TokenRows, align_sums_, shared_inputs, sums_for
from lalora.curvature.settings import FisherType, KronSettings
from lalora.factors import DenseFactor, compress_many, sketched
from lalora.kron import CrossTerm, KronPrecision, KronTerm, module_of
from lalora.lora import LoraParam

_TOKENS = "__tokens__"


def _symmetric(m: Tensor) -> Tensor:
    return 0.5 * (m + m.T)


class KronCurvatureBase(CurvatureEstimator):
    """Gathers S = E_tokens[x x^T] and G = (1/N) sum_{n,t} g g^T from the same hooks as diag.

    Normalisation ("K-FAC expand", Eschenhagen et al. 2023): inputs are averaged over the
    tokens that can influence a loss, output gradients are summed over tokens and averaged
    over sequences, so S (x) G equals the per-sequence Fisher exactly when a sequence has a
    single such token. The large factor of each matrix (the d_in side of A, the d_out side
    of B) is summed during the pass in at most n x n floats, one more such transient while it
    is folded (see ``memory``; ``kron_stats``: the rows themselves while at most n of
    them, else the blocks on and above the diagonal)
    and stored as its top-k eigenpairs plus a diagonal, all factors of one size compressed
    together; the r x r side, derived from those sums and the LoRA weights (``_terms``), stays
    dense.
    """

    precision_cls: ClassVar[type[KronPrecision]] = KronPrecision
    settings = KronSettings

    def __init__(
        self,
        fisher_type: FisherType = "empirical",
        mc_samples: int = 1,
        seed: int = 0,
        adapter_name: str = "default",
        top_k: int = 32,
        max_terms: int = 4,
    ) -> None:
        super().__init__(fisher_type, mc_samples, seed, adapter_name)
        if top_k < 1 or max_terms < 1:
            raise ValueError(f"top_k and max_terms must be >= 1, got {top_k} and {max_terms}")
        self.top_k, self.max_terms = top_k, max_terms

    def _init_state(self, params: list[LoraParam]) -> State:
        # only the large sides are summed (A's inputs, B's output gradients: see _terms), by the first batch's add
        return {_TOKENS: torch.zeros((), dtype=torch.float64, device=params[0].param.device)}

    def _add(self, state: State, keys: list[str], x: Tensor) -> None:
        n = int(x.shape[1])
        for total in sums_for(state, keys, n, keep_rows=sketched(n, self.top_k)):
            total.add(x)

    def _update(self, state: State, grads: list[ModuleGrads]) -> None:
        rows = TokenRows.of(grads)
        for group in shared_inputs([rec for rec in grads if rec.param.kind == "A"]):
            self._add(state, [f"S:{a.param.name}" for a in group], rows(group[0].inputs))  # once per input read
        for rec in grads:
            if rec.param.kind == "B":
                self._add(state, [f"G:{rec.param.name}"], rows(rec.out_grads))
        state[_TOKENS] += rows.count * len(grads[0].inputs)

    def _all_reduce(self, state: State, n: int) -> int:
        if distributed():  # a rank without batches has no sums; ranks may group shared inputs differently
            align_sums_(state, state[_TOKENS].device)
        return super()._all_reduce(state, n)

    def _terms(
        self, state: State, n_samples: int, params: list[LoraParam]
    ) -> tuple[dict[str, KronTerm], dict[str, CrossTerm]]:
        """Every matrix's term, and each module's cross block C_S (d_in, r), C_G (r, d_out) before any projection.

        S_A = sum / tokens and G_B = sum / N, the large sides, compressed together
        (``compress_many``); A matrices reading one input share one sum and one factor. The rest
        follows exactly from the LoRA weights, as B reads a = A x and passes g_A = g_B B back:
        C_S = S_A A^T, C_G = B^T G_B, S_B = A C_S, G_A = C_G B. Reads the summed state once: its
        dense accumulators are made symmetric in place.
        """
        per = {"S": 1.0 / max(float(state[_TOKENS]), 1.0), "G": 1.0 / n_samples}
        a_params = [p for p in params if p.kind == "A"]
        b_of = {module_of(p.name): p for p in params if p.kind == "B"}
        keys = [f"S:{p.name}" for p in a_params] + [f"G:{p.name}" for p in b_of.values()]
        sums: dict[int, tuple[str, GramSum]] = {id(state[k]): (k[0], state[k]) for k in keys}  # shared: once
        read = {i: total.read() for i, (_, total) in sums.items()}
        compressed = compress_many(list(read.values()), self.top_k)
        packed = {i: f.scale(per[side]) for (i, (side, _)), f in zip(sums.items(), compressed, strict=True)}
        terms, cross = {}, {}
        for a in a_params:
            m, b = module_of(a.name), b_of[module_of(a.name)]
            s_sum, g_sum = id(state[f"S:{a.name}"]), id(state[f"G:{b.name}"])
            wa, wb = a.param.detach().float(), b.param.detach().float()
            c_s = (read[s_sum] @ wa.T) * per["S"]
            c_g = (wb.T @ read[g_sum]) * per["G"]
            terms[a.name] = KronTerm(packed[s_sum], DenseFactor(_symmetric(c_g @ wb)))
            terms[b.name] = KronTerm(DenseFactor(_symmetric(wa @ c_s)), packed[g_sum])
            cross[m] = CrossTerm(c_s, c_g)
        return terms, cross

    def _finalize(self, state: State, n_samples: int, params: list[LoraParam]) -> KronPrecision:
        terms, _ = self._terms(state, n_samples, params)
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
