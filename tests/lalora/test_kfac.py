"""Block K-FAC and block tri-diagonal K-FAC: factors, quadratic forms, PSD, accumulation, checkpoints."""

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.testing import assert_close

from lalora import LaplacePenalty, Prior, accumulate, build_estimator, load_precision, lora_parameters, save_precision
from lalora.curvature.hooks import influencing_tokens, sequence_nll
from lalora.curvature.kron_stats import GramSum, blocks, gram_, mirror_, sums_for
from lalora.factors import (
    DenseFactor,
    RowGram,
    add,
    compress,
    compress_many,
    frobenius_inner,
    nearest_kronecker,
    sketched,
)
from lalora.kron import CrossTerm, KronTerm, KronTriPrecision, project_psd, project_psd_many
from tests.conftest import padded_batch, tiny_lora_model, wide_lora_model


def vec(m):
    """Column-major vec, the convention of (S (x) G) vec(W) = vec(G W S)."""
    return m.T.reshape(-1)


def random_psd(n, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank or n, generator=g, dtype=torch.float64)
    return x @ x.T / (rank or n)


def delta_for(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {p.name: torch.randn(p.param.shape, generator=g, dtype=torch.float64) for p in lora_parameters(model)}


def loop_factors(model, batch):
    """Brute force K-FAC factors: one forward/backward per sequence, per-token inputs and output grads."""
    params = lora_parameters(model)
    s = {p.name: 0 for p in params}
    gg = {p.name: 0 for p in params}
    xs = {}
    tokens, n = 0, 0
    mask = influencing_tokens(batch["labels"], batch["attention_mask"])
    for i in range(batch["input_ids"].shape[0]):
        store = {}

        def hook(mod, inp, out, name=None, store=store):
            out.retain_grad()
            store[name] = (inp[0].detach(), out)

        hs = [p.module.register_forward_hook(lambda m, a, o, name=p.name: hook(m, a, o, name)) for p in params]
        logits = model(
            input_ids=batch["input_ids"][i : i + 1], attention_mask=batch["attention_mask"][i : i + 1]
        ).logits
        for h in hs:
            h.remove()
        sequence_nll(logits, batch["labels"][i : i + 1]).sum().backward()
        keep = mask[i]
        for p in params:
            x, out = store[p.name]
            x, g = x[0][keep].double(), out.grad[0][keep].double()
            s[p.name] = s[p.name] + x.T @ x
            gg[p.name] = gg[p.name] + g.T @ g
            xs[(p.name, i)] = (x, g)
        tokens += int(keep.sum())
        n += 1
    model.zero_grad(set_to_none=True)
    return {k: v / tokens for k, v in s.items()}, {k: v / n for k, v in gg.items()}, xs, tokens, n


# --- factors -------------------------------------------------------------------------------
def test_compress_full_rank_is_exact_and_truncation_keeps_the_diagonal_and_psd():
    m = random_psd(12, rank=5)
    assert_close(compress(m, 12).to_dense(), m, rtol=1e-10, atol=1e-12)
    low = compress(m, 3)
    assert_close(low.diag(), m.diagonal(), rtol=1e-10, atol=1e-12)
    assert float(torch.linalg.eigvalsh(low.to_dense()).min()) >= -1e-12
    x = torch.randn(12, 4, dtype=torch.float64)
    assert_close(low.lmul(x), low.to_dense() @ x)
    assert_close(low.rmul(x.T), x.T @ low.to_dense())
    assert_close(
        low.inverse_apply(x, 0.1), torch.linalg.solve(low.to_dense() + 0.1 * torch.eye(12, dtype=torch.float64), x)
    )


def test_add_and_frobenius_inner_without_dense_matrices_match_dense():
    a, b = compress(random_psd(10, 3, seed=1), 3), compress(random_psd(10, 4, seed=2), 4)
    assert_close(frobenius_inner(a, b), float((a.to_dense() * b.to_dense()).sum()), rtol=1e-10, atol=0)
    full = add([a, b], [0.5, 2.0], k=10)
    assert_close(full.to_dense(), 0.5 * a.to_dense() + 2.0 * b.to_dense(), rtol=1e-9, atol=1e-12)
    cut = add([a, b], [0.5, 2.0], k=2)
    assert_close(cut.diag(), full.diag(), rtol=1e-9, atol=1e-12)  # dropped eigen-mass moves to the diagonal


# --- the estimator -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kfac", "kfac-tri"])
def test_factors_equal_a_per_sequence_loop_with_padding(kind):
    model, batch = tiny_lora_model(), padded_batch()
    prec = build_estimator(kind, top_k=64).estimate(model, [batch]).precision
    s_ref, g_ref, *_ = loop_factors(model, batch)
    for name, terms in prec.blocks.items():
        assert len(terms) == 1
        assert_close(terms[0].s.to_dense().double(), s_ref[name], rtol=1e-4, atol=1e-7)
        assert_close(terms[0].g.to_dense().double(), g_ref[name], rtol=1e-4, atol=1e-7)


def assert_cross_blocks_equal_the_loop(prec, xs, tokens, n, min_scale=0.998, atol=1e-7):
    """C_S exactly; C_G up to project_psd's scale: a_B = A x makes the joint block singular (rho = 1), so it
    keeps C_G 0.999 inside the bound of exact factors, more inside that of compressed ones (``min_scale``)."""
    for m, (c,) in prec.cross.items():
        a, b = f"{m}.lora_A", f"{m}.lora_B"
        c_s = sum(xs[(a, i)][0].T @ xs[(b, i)][0] for i in range(n)) / tokens
        c_g = sum(xs[(a, i)][1].T @ xs[(b, i)][1] for i in range(n)) / n
        assert_close(c.s.double(), c_s, rtol=1e-4, atol=atol)
        scale = float((c.g.double() * c_g).sum() / c_g.square().sum())
        assert min_scale < scale <= 1.0
        assert_close(c.g.double(), scale * c_g, rtol=1e-4, atol=atol)


def test_kfac_tri_cross_blocks_equal_a_per_sequence_loop():
    """C_S = E[x a_B^T], C_G = (1/N) sum g_A g_B^T, taken from the K-FAC sums and the LoRA weights, equal the
    cross-covariances of the recorded inputs and output gradients."""
    model, batch = tiny_lora_model(), padded_batch()
    prec = build_estimator("kfac-tri", top_k=64).estimate(model, [batch]).precision
    _, _, xs, tokens, n = loop_factors(model, batch)
    assert_cross_blocks_equal_the_loop(prec, xs, tokens, n)


def test_factors_equal_the_loop_when_the_accumulators_are_summed_in_blocks():
    """d_in = 128 and d_out = 160: the Gram sums take the half-work block path (``gram_``), mirrored when read."""
    model = wide_lora_model(hidden=128, intermediate=160, targets=("q_proj", "up_proj"))
    batch = padded_batch()
    assert len(blocks(128)) > 1 and len(blocks(160)) > 1
    prec = build_estimator("kfac-tri", top_k=160).estimate(model, [batch]).precision  # 4k >= n: compression is exact
    s_ref, g_ref, *_ = loop_factors(model, batch)
    for name, (t,) in prec.blocks.items():
        assert_close(t.s.to_dense().double(), s_ref[name], rtol=1e-4, atol=1e-7)
        assert_close(t.g.to_dense().double(), g_ref[name], rtol=1e-4, atol=1e-7)


def test_an_all_ones_attention_mask_is_left_out_of_the_forward_and_changes_nothing():
    """Nothing masked: the model runs its plain causal path (faster than an explicit mask), same factors."""
    model = tiny_lora_model()
    ids = torch.randint(3, 11, (3, 6), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[:, :2] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    seen = []
    handle = model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    try:
        prec = build_estimator("kfac", top_k=64).estimate(model, [batch]).precision
    finally:
        handle.remove()
    assert seen == [None]
    s_ref, g_ref, *_ = loop_factors(model, batch)  # the loop passes the mask
    for name, (t,) in prec.blocks.items():
        assert_close(t.s.to_dense().double(), s_ref[name], rtol=1e-4, atol=1e-7)
        assert_close(t.g.to_dense().double(), g_ref[name], rtol=1e-4, atol=1e-7)


def test_a_matrices_reading_one_input_share_one_gram_and_one_compressed_factor(monkeypatch):
    """q_proj and v_proj read the same hidden states: their input factor is one sum, added to and compressed once."""
    owners = []
    add_rows = GramSum.add

    def counting_add(self, x):
        owners.append(len(self.owners))
        add_rows(self, x)

    monkeypatch.setattr(GramSum, "add", counting_add)
    model, batch = tiny_lora_model(), padded_batch()
    prec = build_estimator("kfac", top_k=64).estimate(model, [batch, padded_batch(seed=2)]).precision
    q, v, up = (f"model.layers.0.{m}.lora_A" for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj"))
    assert prec.blocks[q][0].s is prec.blocks[v][0].s  # one compressed factor
    assert prec.blocks[up][0].s is not prec.blocks[q][0].s
    assert sorted(owners) == [1] * 2 * (1 + 3) + [2] * 2  # per batch: S of q+v once, up's S, G of the 3 B matrices
    s_ref, *_ = loop_factors(model, {k: torch.cat([batch[k], padded_batch(seed=2)[k]]) for k in batch})
    assert_close(prec.blocks[v][0].s.to_dense().double(), s_ref[v], rtol=1e-4, atol=1e-7)


def test_gram_accumulation_in_blocks_equals_the_full_product():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(50, 300, generator=g), torch.randn(70, 300, generator=g)]
    one = torch.zeros(300, 300)
    for x in xs:
        gram_(one, x)
    assert len(blocks(300)) == 4
    assert_close(mirror_(one), sum(x.T @ x for x in xs), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("keep_rows", [True, False])
def test_a_gram_sum_keeps_its_rows_up_to_n_then_folds_them_into_the_dense_sum(keep_rows):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(m, 200, generator=g) for m in (120, 80, 30)]
    total = GramSum(200, keep_rows, {"S:a"})
    held = []
    for i, x in enumerate(xs):
        total.add(x)
        held.append(total.acc is None)
        want = sum(x.T @ x for x in xs[: i + 1])
        got = total.read()
        assert isinstance(got, RowGram) == (keep_rows and i < 2)
        dense = got.dense() if isinstance(got, RowGram) else got
        assert_close(dense, want, rtol=1e-5, atol=1e-3)
        q = torch.randn(200, 5, generator=g)
        assert_close(got @ q, want @ q, rtol=1e-4, atol=1e-3)
        assert_close(q.T @ got, q.T @ want, rtol=1e-4, atol=1e-3)
        assert_close(got.diagonal(), want.diagonal(), rtol=1e-5, atol=1e-3)
    assert held == ([True, True, False] if keep_rows else [False] * 3)  # 120 + 80 rows fit in 200, 230 do not


def test_a_batch_that_groups_keys_otherwise_splits_their_shared_sum():
    """One sum per group of A matrices reading one input; should a batch group them otherwise, each key keeps
    its own history (never for one model's modules, where every batch groups them alike)."""
    g = torch.Generator().manual_seed(0)
    x1, x2, x3 = (torch.randn(10, 40, generator=g) for _ in range(3))
    state: dict = {}
    for total in sums_for(state, ["q", "k", "v"], 40, keep_rows=False):
        total.add(x1)
    assert state["q"] is state["k"] is state["v"]
    assert sums_for(state, ["q", "k", "v"], 40, keep_rows=False) == [state["q"]]  # the same grouping: one add
    for total in sums_for(state, ["q", "k"], 40, keep_rows=False):
        total.add(x2)
    for total in sums_for(state, ["v"], 40, keep_rows=False):
        total.add(x3)
    assert state["q"] is not state["k"] and state["k"] is not state["v"]
    assert state["v"].owners == {"v"}
    want = {"q": x1.T @ x1 + x2.T @ x2, "k": x1.T @ x1 + x2.T @ x2, "v": x1.T @ x1 + x3.T @ x3}
    for key, m in want.items():
        assert_close(state[key].read(), m, rtol=1e-5, atol=1e-4)


def test_factors_kept_as_rows_equal_the_loop_compressed_and_fold_past_n_rows(monkeypatch):
    """hidden 144 and MLP 320, top_k 8: every large factor is compressed by a sketch, so its sum keeps the rows
    while there are at most n of them (117 a batch here): one batch keeps them all; at two the 144-wide sums
    (q and v's shared input, up's input, q's and v's output gradients) are folded, up's 320-wide G holds two
    chunks; at three every sum is dense. The stored large factors equal the brute-force loop's dense factors
    compressed the same way, their diagonals exactly; the r x r factors and kfac-tri's cross blocks, taken
    through the rows, equal the loop's."""
    import lalora.curvature.kfac as kfac_module

    seen = []

    def recording(ms, k):
        seen.append(sorted((m.shape[0], type(m).__name__, len(getattr(m, "xs", []))) for m in ms))
        return compress_many(ms, k)

    monkeypatch.setattr(kfac_module, "compress_many", recording)
    model = wide_lora_model()
    assert sketched(144, 8) and sketched(320, 8)
    batches = [padded_batch(seed=s, lengths=(40, 40, 40)) for s in (1, 2, 3)]  # 117 influencing tokens each
    precs = [build_estimator("kfac-tri", top_k=8).estimate(model, batches[:i]).precision for i in (1, 2, 3)]
    assert seen == [
        [(144, "RowGram", 1)] * 4 + [(320, "RowGram", 1)],
        [(144, "Tensor", 0)] * 4 + [(320, "RowGram", 2)],
        [(144, "Tensor", 0)] * 4 + [(320, "Tensor", 0)],
    ]
    q, v = (f"model.layers.0.self_attn.{m}_proj.lora_A" for m in "qv")
    for i, prec in enumerate(precs, 1):
        assert prec.blocks[q][0].s is prec.blocks[v][0].s  # one sum, one compressed factor
        joined = {k: torch.cat([b[k] for b in batches[:i]]) for k in batches[0]}
        s_ref, g_ref, xs, tokens, n = loop_factors(model, joined)
        for name, (t,) in prec.blocks.items():
            sides = [(t.s, s_ref[name]), (t.g, g_ref[name])]
            (big, ref), (small, small_ref) = sides if name.endswith("lora_A") else sides[::-1]
            want = compress(ref.float(), 8)
            assert_close(big.diag().double(), ref.diagonal(), rtol=1e-4, atol=1e-6)
            assert_close(big.lam, want.lam, rtol=1e-3, atol=1e-6)
            assert_close(big.to_dense(), want.to_dense(), rtol=1e-3, atol=1e-3 * float(want.lam[0]))
            assert_close(small.to_dense().double(), small_ref, rtol=1e-4, atol=1e-7)
        # top-8 factors: a scale of 0.64 here; float32 sums of 234-351 rows: atol 1e-6 (C_S up to ~12, C_G ~0.01)
        assert_cross_blocks_equal_the_loop(prec, xs, tokens, n, min_scale=0.0, atol=1e-6)


def test_compress_many_equals_compress_and_handles_low_rank_and_zero_float32_factors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 300, generator=g)  # rank 10, below the sketch's 8 + 16 columns
    low, full = x.T @ x, random_psd(300, seed=3).float()
    got = compress_many([low, torch.zeros(300, 300), full], 8)
    for m, f in zip((low, full), (got[0], got[2]), strict=True):
        one = compress(m, 8)
        assert_close(f.lam, one.lam)
        assert_close(f.d, one.d)
        assert_close(f.diag(), m.diagonal(), rtol=1e-5, atol=1e-4)
        assert torch.isfinite(f.u).all() and float(f.d.min()) >= 0
    top = torch.linalg.eigvalsh(low.double()).flip(0)[:8].float()
    assert_close(got[0].lam, top, rtol=1e-4, atol=1e-3)  # rank <= sketch width: the top eigenpairs are found
    assert not got[1].to_dense().any()  # a zero factor stays zero (no NaN from the empty sketch)


@pytest.mark.parametrize("seed", range(4))
def test_a_float32_gram_of_fewer_rows_than_the_sketch_keeps_its_top_eigenpairs(seed):
    """17 rows against a sketch of 8 + 16 columns, over four decades of scale: the Nystrom core Q^T m Q is
    singular up to float32 rounding. A Cholesky factor of it failed on nearly every such matrix (39 of 40 seeds)
    and left the factor its diagonal alone; the eigendecomposition keeps the top eigenpairs, kept as rows or
    summed dense alike."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-4, 0, 144)[torch.randperm(144, generator=g)]
    x = torch.randn(17, 144, generator=g) * scales * torch.logspace(-3, 0, 17)[:, None]
    acc = torch.zeros(144, 144)
    gram_(acc, x)
    exact = torch.linalg.eigvalsh(x.double().T @ x.double()).flip(0)[:8]
    for f in compress_many([mirror_(acc), RowGram([x])], 8):
        assert_close(f.lam.double(), exact, rtol=1e-4, atol=1e-6 * float(exact[0]))
        assert_close(f.diag(), acc.diagonal(), rtol=1e-4, atol=1e-6 * float(exact[0]))


def test_kfac_quadratic_form_equals_the_dense_kronecker_form():
    model = tiny_lora_model()
    prec = build_estimator("kfac", top_k=4).estimate(model, [padded_batch()]).precision.with_prior(Prior(0.1, 0.2))
    delta = delta_for(model)
    dense = 0.0
    for name, terms in prec.blocks.items():
        for t in terms:
            k = torch.kron(t.s.to_dense().double(), t.g.to_dense().double())
            dense += float(vec(delta[name]) @ k @ vec(delta[name]))
        dense += prec.ridge[name] * float(delta[name].square().sum())
    got = prec.to_device(torch.device("cpu"), torch.float64).quad_form(delta)
    assert_close(float(got), dense, rtol=1e-5, atol=0)
    assert_close(float(got), float(vec_all(prec, delta) @ prec.to_dense() @ vec_all(prec, delta)), rtol=1e-5, atol=0)


def vec_all(prec, delta):
    return torch.cat([vec(delta[n]) for n in prec.names])


def test_kfac_diagonal_matches_diag_where_kfac_is_exact():
    """A single linear layer and one sequence with one scored position: S (x) G is the Fisher itself."""

    class OneLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 6)
            self.proj = nn.Linear(6, 7)

        def forward(self, input_ids, attention_mask=None):
            return SimpleNamespace(logits=self.proj(self.emb(input_ids)))

    torch.manual_seed(0)
    model = get_peft_model(OneLayer(), LoraConfig(r=2, lora_alpha=2, target_modules=["proj"])).eval()
    for p in lora_parameters(model):
        nn.init.normal_(p.param, std=0.5)
    ids = torch.tensor([[3, 5]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([[-100, 5]])}
    diag = build_estimator("diag").estimate(model, [batch]).precision.values
    kfac = build_estimator("kfac", top_k=8).estimate(model, [batch]).precision
    for name, (t,) in kfac.blocks.items():
        kron_diag = torch.outer(t.g.diag(), t.s.diag())  # element (i, j): G_ii S_jj
        assert_close(kron_diag, diag[name], rtol=1e-5, atol=1e-10)


# --- kfac-tri: PSD -------------------------------------------------------------------------
def test_kfac_tri_precision_is_psd_with_compressed_factors():
    model = tiny_lora_model(r=3)
    est = build_estimator("kfac-tri", top_k=2).estimate(model, [padded_batch(), padded_batch(seed=5)])
    prec = est.precision
    assert isinstance(prec, KronTriPrecision) and prec.cross
    assert any(bool(t.s.any()) for ts in prec.cross.values() for t in ts)
    evals = torch.linalg.eigvalsh(prec.to_dense())
    assert float(evals.min()) >= -1e-9 * float(evals.max())
    summed = accumulate(prec, prec.scale(0.5), "sum")
    evals = torch.linalg.eigvalsh(summed.to_dense())
    assert float(evals.min()) >= -1e-9 * float(evals.max())


def test_project_psd_shrinks_an_oversized_cross_block_to_a_psd_joint_matrix():
    s_a, g_a = DenseFactor(random_psd(4, seed=1)), DenseFactor(random_psd(2, seed=2))
    s_b, g_b = DenseFactor(random_psd(2, seed=3)), DenseFactor(random_psd(5, seed=4))
    a, b = KronTerm(s_a, g_a), KronTerm(s_b, g_b)
    big = CrossTerm(torch.randn(4, 2, dtype=torch.float64) * 10, torch.randn(2, 5, dtype=torch.float64) * 10)

    def joint(c):
        p = torch.kron(s_a.m, g_a.m)
        q = torch.kron(s_b.m, g_b.m)
        x = torch.kron(c.s, c.g)
        return torch.cat([torch.cat([p, x], 1), torch.cat([x.T, q], 1)])

    assert float(torch.linalg.eigvalsh(joint(big)).min()) < 0  # the raw block is not PSD
    fixed = project_psd(a, b, big)
    assert float(torch.linalg.eigvalsh(joint(fixed)).min()) >= -1e-10
    assert_close(fixed.s, big.s)  # only a scale changes
    small = CrossTerm(big.s * 1e-4, big.g * 1e-4)
    assert project_psd(a, b, small) is small


def test_project_psd_many_batches_modules_of_one_shape_and_matches_one_by_one():
    def item(seed, d_in, scale):
        g = torch.Generator().manual_seed(seed)
        a = KronTerm(compress(random_psd(d_in, seed=seed), 3), DenseFactor(random_psd(2, seed=seed + 1)))
        b = KronTerm(DenseFactor(random_psd(2, seed=seed + 2)), compress(random_psd(5, seed=seed + 3), 3))
        return (
            a,
            b,
            CrossTerm(
                torch.randn(d_in, 2, generator=g, dtype=torch.float64) * scale,
                torch.randn(2, 5, generator=g, dtype=torch.float64) * scale,
            ),
        )

    items = [item(1, 6, 10.0), item(5, 6, 1e-4), item(9, 6, 3.0), item(13, 7, 10.0)]  # three share a shape
    many = project_psd_many(items)
    for (a, b, raw), got in zip(items, many, strict=True):
        one = project_psd(a, b, raw)
        assert_close(got.g, one.g)
        assert_close(got.s, raw.s)
        joint = KronTriPrecision(
            {"m.lora_A": [a], "m.lora_B": [b]}, top_k=3, max_terms=1, cross={"m": [got]}
        ).to_dense()
        assert float(torch.linalg.eigvalsh(joint).min()) >= -1e-10
    assert project_psd(*items[1]) is items[1][2]  # a block that fits is left alone
    assert not torch.equal(many[0].g, items[0][2].g)  # an oversized one is shrunk


# --- penalty ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kfac", "kfac-tri"])
def test_penalty_gradient_equals_lambda_times_precision_times_displacement(kind):
    model = tiny_lora_model()
    params = lora_parameters(model)
    prec = build_estimator(kind, top_k=3).estimate(model, [padded_batch()]).precision
    anchor = {p.name: p.param.detach().clone() for p in params}
    with torch.no_grad():
        for p in params:
            p.param.add_(torch.randn_like(p.param) * 0.1)
    prior = Prior(0.3, 0.05)
    pen = LaplacePenalty(prec, anchor, params, lam=2.5, prior=prior)
    value = pen()
    value.backward()
    full = prec.with_prior(prior)
    delta = {p.name: (p.param.detach() - anchor[p.name]).double() for p in params}
    dense = full.to_dense()
    d = vec_all(full, delta)
    assert_close(float(value.detach()), 0.5 * 2.5 * float(d @ dense @ d), rtol=1e-5, atol=0)
    expected = 2.5 * dense @ d
    offset = 0
    for name in full.names:
        n = delta[name].numel()
        grad = next(p.param.grad for p in params if p.name == name)
        assert_close(vec(grad).double(), expected[offset : offset + n], rtol=1e-4, atol=1e-8)
        offset += n
    # and the same through autograd of quad_form
    live = {p.name: p.param for p in params}
    for p in params:
        p.param.grad = None
    (0.5 * 2.5 * full.quad_form({n: live[n] - anchor[n] for n in full.names})).backward()
    offset = 0
    for name in full.names:
        n = delta[name].numel()
        assert_close(vec(live[name].grad).double(), expected[offset : offset + n], rtol=1e-4, atol=1e-8)
        offset += n


# --- accumulation ---------------------------------------------------------------------------
def test_accumulation_is_exact_up_to_max_terms_then_nearest_kronecker():
    model = tiny_lora_model()
    est = build_estimator("kfac", top_k=64, max_terms=2)
    p1 = est.estimate(model, [padded_batch(seed=1)]).precision
    p2 = est.estimate(model, [padded_batch(seed=2)]).precision
    p3 = est.estimate(model, [padded_batch(seed=3)]).precision
    delta = delta_for(model)
    two = accumulate(p1, p2, "sum")
    assert two.n_terms == 2
    assert_close(float(two.quad_form(delta)), float(p1.quad_form(delta) + p2.quad_form(delta)), rtol=1e-6, atol=0)
    online = accumulate(p1, p2, "online", gamma=0.5)
    assert_close(
        float(online.quad_form(delta)), float(0.5 * p1.quad_form(delta) + p2.quad_form(delta)), rtol=1e-6, atol=0
    )
    three = accumulate(two, p3, "sum")
    assert three.n_terms == 2  # the two oldest were merged
    exact = p1.to_dense() + p2.to_dense() + p3.to_dense()
    err = float(torch.linalg.matrix_norm(three.to_dense() - exact) / torch.linalg.matrix_norm(exact))
    assert err < 0.1, err  # measured: 0.069 on this model (three domains, max_terms 2)


def test_nearest_kronecker_is_exact_for_a_shared_factor_and_beats_factor_averaging():
    s = compress(random_psd(6, seed=1), 6)
    g1, g2 = DenseFactor(random_psd(3, seed=2)), DenseFactor(random_psd(3, seed=3))
    ms, mg, err = nearest_kronecker([(s, g1), (s, g2)], k=6)
    exact = torch.kron(s.to_dense(), g1.m + g2.m)
    assert_close(torch.kron(ms.to_dense(), mg.m), exact, rtol=1e-8, atol=1e-10)
    assert err < 1e-7
    s2 = compress(random_psd(6, seed=4), 6)
    terms = [(s, g1), (s2, g2)]
    ms, mg, err = nearest_kronecker(terms, k=6)
    exact = torch.kron(s.to_dense(), g1.m) + torch.kron(s2.to_dense(), g2.m)
    got = torch.kron(ms.to_dense(), mg.m)
    rel = float(torch.linalg.matrix_norm(got - exact) / torch.linalg.matrix_norm(exact))
    assert_close(rel, err, rtol=1e-6, atol=1e-9)  # the reported error is the true one
    avg = torch.kron((s.to_dense() + s2.to_dense()) / 2, g1.m + g2.m)
    assert rel <= float(torch.linalg.matrix_norm(avg - exact) / torch.linalg.matrix_norm(exact))


# --- checkpoints ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kfac", "kfac-tri"])
def test_checkpoint_round_trip_and_shape_check(kind, tmp_path):
    model = tiny_lora_model()
    prec = build_estimator(kind, top_k=3).estimate(model, [padded_batch()]).precision
    prec = accumulate(prec, prec.scale(0.3), "sum")
    save_precision(tmp_path / "c", prec, fisher_type="empirical", n_samples=4, prior=Prior())
    shapes = {p.name: tuple(p.param.shape) for p in lora_parameters(model)}
    back, meta = load_precision(tmp_path / "c", shapes)
    assert type(back) is type(prec) and meta.structure == kind and back.n_terms == 2
    delta = delta_for(model)
    assert_close(float(back.quad_form(delta)), float(prec.quad_form(delta)), rtol=1e-6, atol=0)
    wrong = {n: (s[0] + 1, s[1]) if n.endswith("lora_B") else s for n, s in shapes.items()}
    with pytest.raises(Exception, match="shape mismatch"):
        load_precision(tmp_path / "c", wrong)


def test_memory_estimate_orders_the_structures():
    model = tiny_lora_model()
    shapes = {p.name: tuple(p.param.shape) for p in lora_parameters(model)}
    diag = build_estimator("diag").memory(shapes)
    kfac = build_estimator("kfac", top_k=2).memory(shapes)
    tri = build_estimator("kfac-tri", top_k=2).memory(shapes)
    assert diag.pass_bytes == 4 * sum(a * b for a, b in shapes.values())
    assert kfac.pass_bytes > diag.pass_bytes and tri.pass_bytes > kfac.pass_bytes
    d_in, r, k = 16, 2, 2  # q_proj.lora_A is (r, d_in): d_in x d_in accumulated, k eigenpairs + d stored
    one = build_estimator("kfac", top_k=k).memory({"m.q_proj.lora_A": (r, d_in)})
    assert one.pass_bytes == 4 * (d_in * d_in + r * r)
    assert one.stored_bytes == 4 * (r * r + d_in * k + k + d_in)


def test_a_matrices_have_zero_kfac_curvature_at_a_b_zero_anchor():
    model = tiny_lora_model(nonzero_b=False)
    est = build_estimator("kfac-tri", top_k=4).estimate(model, [padded_batch()])
    a_names = [p.name for p in lora_parameters(model) if p.kind == "A"]
    assert sorted(est.zero_curvature) == sorted(a_names)
    assert all(not bool(t.g.any()) for ts in est.precision.cross.values() for t in ts)  # g_A = B^T g = 0


def test_randomized_compression_of_a_large_factor_finds_its_top_eigenpairs():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(600, 600, generator=g, dtype=torch.float64))
    spectrum = torch.cat([torch.linspace(100, 10, 8), torch.full((592,), 1e-3)]).double()
    m = (q * spectrum) @ q.T
    low = compress(m, 8)  # 600 > exact_below: the randomized path
    assert_close(low.lam.sort(descending=True).values, spectrum[:8], rtol=1e-6, atol=1e-8)
    assert_close(low.diag(), m.diagonal(), rtol=1e-9, atol=1e-12)
    rel = torch.linalg.matrix_norm(low.to_dense() - m) / torch.linalg.matrix_norm(m)
    assert float(rel) < 1e-3
