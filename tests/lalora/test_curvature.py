import pytest
import torch
from torch.testing import assert_close

from lalora import CURVATURES, build_estimator, lora_parameters
from lalora.curvature.hooks import sequence_nll
from tests.conftest import padded_batch, tiny_lora_model


def loop_fisher(model, batch):
    """Brute force: one backward per sequence, squared parameter gradients, mean."""
    params = lora_parameters(model)
    acc = {p.name: torch.zeros_like(p.param) for p in params}
    n = 0
    for i in range(batch["input_ids"].shape[0]):
        model.zero_grad(set_to_none=True)
        ids = batch["input_ids"][i : i + 1]
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"][i : i + 1]).logits
        loss = sequence_nll(logits, batch["labels"][i : i + 1]).sum()
        loss.backward()
        for p in params:
            acc[p.name] += p.param.grad.square()
        n += 1
    return {k: v / n for k, v in acc.items()}


def test_registry_has_structures_and_rejects_unknown():
    assert {"diag", "identity"} <= set(CURVATURES)
    with pytest.raises(ValueError, match="unknown curvature kind 'nope'; registered kinds: "):
        build_estimator("nope")


def test_hook_fisher_equals_per_sequence_loop_with_padding(model):
    batch = padded_batch()
    est = build_estimator("diag").estimate(model, [batch])
    ref = loop_fisher(model, batch)
    assert est.n_samples == 4
    got = est.precision.to_state_dict()
    assert set(got) == set(ref)
    for name in ref:
        assert_close(got[name], ref[name], rtol=1e-5, atol=1e-9)


def test_hook_fisher_leaves_no_parameter_gradients(model):
    build_estimator("diag").estimate(model, [padded_batch()])
    assert all(p.grad is None for p in model.parameters())


def test_padding_does_not_change_the_fisher(model):
    """The same sequences alone and inside a padded batch give the same per-sequence curvature."""
    batch = padded_batch()
    together = build_estimator("diag").estimate(model, [batch]).precision.to_state_dict()
    singles = [{k: v[i : i + 1, : int(batch["attention_mask"][i].sum())] for k, v in batch.items()} for i in range(4)]
    apart = build_estimator("diag").estimate(model, singles).precision.to_state_dict()
    for name in together:
        assert_close(together[name], apart[name], rtol=1e-5, atol=1e-9)


def test_a_matrices_have_zero_curvature_at_b_zero_anchor():
    model = tiny_lora_model(nonzero_b=False)
    est = build_estimator("diag").estimate(model, [padded_batch()])
    a_names = [p.name for p in lora_parameters(model) if p.kind == "A"]
    assert sorted(est.zero_curvature) == sorted(a_names)
    state = est.precision.to_state_dict()
    assert all(state[n].abs().sum() > 0 for n in state if n.endswith("lora_B"))


def test_mc_fisher_expectation_matches_exact_fisher_by_enumeration():
    """One target token: exact Fisher = sum_y p(y) (grad log p(y))^2 over the whole vocabulary."""
    vocab = 7
    model = tiny_lora_model(seed=3, vocab=vocab)
    ids = torch.tensor([[1, 4, 5, 3]])
    labels = torch.tensor([[-100, -100, -100, 3]])
    params = lora_parameters(model)
    logits = model(input_ids=ids).logits[0, -2]
    probs = torch.softmax(logits.float(), -1).detach()
    exact = {p.name: torch.zeros_like(p.param) for p in params}
    for y in range(vocab):
        model.zero_grad(set_to_none=True)
        torch.log_softmax(model(input_ids=ids).logits[0, -2], -1)[y].backward()
        for p in params:
            exact[p.name] += probs[y] * p.param.grad.square()
    batch = {"input_ids": ids.repeat(400, 1), "labels": labels.repeat(400, 1)}
    est = build_estimator("diag", fisher_type="mc", mc_samples=10, seed=0).estimate(model, [batch])
    assert est.n_samples == 4000
    got = est.precision.to_state_dict()
    num = sum((got[n] - exact[n]).norm() ** 2 for n in exact) ** 0.5
    den = sum(exact[n].norm() ** 2 for n in exact) ** 0.5
    assert float(num / den) < 0.1
    # and the empirical Fisher at one fixed label is a different quantity
    emp = build_estimator("diag").estimate(model, [{"input_ids": ids, "labels": labels}]).precision.to_state_dict()
    emp_err = sum((emp[n] - exact[n]).norm() ** 2 for n in exact) ** 0.5 / den
    assert float(emp_err) > float(num / den)


def test_identity_is_unit_precision_and_reads_no_data(model):
    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        est = build_estimator("identity").estimate(model, [padded_batch(), padded_batch(seed=1)])
    finally:
        hook.remove()
    assert forwards == []
    for p in lora_parameters(model):
        assert_close(est.precision.to_state_dict()[p.name], torch.ones_like(p.param))


def test_all_masked_batch_is_a_clear_error(model):
    batch = padded_batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    with pytest.raises(ValueError, match="no curvature samples"):
        build_estimator("diag").estimate(model, [batch])
