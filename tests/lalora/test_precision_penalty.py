import pytest
import torch
from torch.testing import assert_close

from lalora import DiagPrecision, LaplacePenalty, Prior, accumulate, lora_parameters


def random_precision(model, seed):
    g = torch.Generator().manual_seed(seed)
    return DiagPrecision({p.name: torch.rand(p.param.shape, generator=g) for p in lora_parameters(model)})


def perturbed(model, seed=5, scale=0.1):
    params = lora_parameters(model)
    anchor = {p.name: p.param.detach().clone() for p in params}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.param.add_(scale * torch.randn(p.param.shape, generator=g))
    return params, anchor


@pytest.mark.parametrize("lam", [0.0, 0.7, 30.0])
def test_penalty_value_and_gradient_match_closed_form_and_autograd(model, lam):
    prec = random_precision(model, 0)
    prior = Prior(tau_A=0.3, tau_B=0.05)
    params, anchor = perturbed(model)
    pen = LaplacePenalty(prec, anchor, params, lam, prior)
    value = pen()
    if lam == 0.0:  # plain LoRA: a constant zero that does not touch the parameters
        assert value.item() == 0.0 and not value.requires_grad
        return
    value.backward()
    full = prec.with_prior(prior)
    for p in params:
        tau = 0.3 if p.kind == "A" else 0.05
        expect = lam * (prec.values[p.name] + tau) * (p.param.detach() - anchor[p.name])
        assert_close(p.param.grad, expect, rtol=1e-5, atol=1e-7)
    # the same value through the generic autograd path of quad_form
    delta = {p.name: p.param - anchor[p.name] for p in params}
    ref = 0.5 * lam * full.quad_form(delta)
    assert_close(value.detach(), ref.detach(), rtol=1e-5, atol=1e-7)
    for p in params:
        p.param.grad = None
    ref.backward()
    for p in params:
        expect = lam * full.values[p.name] * (p.param.detach() - anchor[p.name])
        assert_close(p.param.grad, expect, rtol=1e-5, atol=1e-7)


def test_penalty_is_zero_at_the_anchor_with_zero_gradient(model):
    params = lora_parameters(model)
    anchor = {p.name: p.param.detach().clone() for p in params}
    pen = LaplacePenalty(random_precision(model, 1), anchor, params, 5.0, Prior(1.0, 1.0))
    value = pen()
    value.backward()
    assert value.item() == 0.0
    assert all(float(p.param.grad.abs().max()) == 0.0 for p in params)


def test_identity_precision_is_plain_l2(model):
    params, anchor = perturbed(model)
    ones = DiagPrecision({p.name: torch.ones_like(p.param) for p in params})
    value = LaplacePenalty(ones, anchor, params, 2.0)()
    l2 = sum((p.param.detach() - anchor[p.name]).square().sum() for p in params)
    assert_close(value.detach(), l2, rtol=1e-5, atol=1e-7)


def test_penalty_rejects_precision_of_another_adapter(model):
    params = lora_parameters(model)
    anchor = {p.name: p.param.detach().clone() for p in params}
    bad = DiagPrecision({p.name: torch.ones(p.param.shape[0] + 1, p.param.shape[1]) for p in params})
    with pytest.raises(ValueError, match="shape mismatch for"):
        LaplacePenalty(bad, anchor, params, 1.0)
    with pytest.raises(ValueError, match="precision and adapter disagree"):
        LaplacePenalty(DiagPrecision({"x.lora_A": torch.ones(1)}), anchor, params, 1.0)
    with pytest.raises(ValueError, match="lambda must be >= 0"):
        LaplacePenalty(random_precision(model, 0), anchor, params, -1.0)


def test_algebra_and_accumulation_are_linear(model):
    a, b, c = (random_precision(model, s) for s in (1, 2, 3))
    params, anchor = perturbed(model)
    delta = {p.name: p.param.detach() - anchor[p.name] for p in params}
    q = lambda prec: prec.quad_form(delta)  # noqa: E731
    assert_close(q(a + b), q(a) + q(b))
    assert_close(q(a * 2.5), 2.5 * q(a))
    assert_close(q(0.5 * a), 0.5 * q(a))
    assert_close(q(accumulate(a, b, "sum")), q(a) + q(b))
    assert_close(q(accumulate(a, b, "online", gamma=0.3)), 0.3 * q(a) + q(b))
    assert accumulate(a, b, "replace") is b
    assert accumulate(None, b, "sum") is b
    # three domains: gamma^2 F1 + gamma F2 + F3
    three = accumulate(accumulate(a, b, "online", 0.5), c, "online", 0.5)
    assert_close(q(three), 0.25 * q(a) + 0.5 * q(b) + q(c))
    # inputs untouched
    assert_close(q(a), random_precision(model, 1).quad_form(delta))
    with pytest.raises(ValueError, match="gamma must be in"):
        accumulate(a, b, "online", gamma=1.5)


def test_prior_is_per_matrix_kind(model):
    zero = DiagPrecision({p.name: torch.zeros_like(p.param) for p in lora_parameters(model)})
    with_prior = zero.with_prior(Prior(tau_A=2.0, tau_B=3.0))
    for name, v in with_prior.values.items():
        assert torch.all(v == (2.0 if name.endswith("lora_A") else 3.0))
    with pytest.raises(ValueError, match="prior precisions must be >= 0"):
        Prior(tau_A=-1.0)


def test_lora_names_are_the_same_inside_a_wrapper_module(model):
    """Names are canonical: a precision from the bare model applies to a wrapped one (DeepSpeed's 'module.')."""
    wrapper = torch.nn.Module()
    wrapper.module = model
    bare = [p.name for p in lora_parameters(model)]
    wrapped = [p.name for p in lora_parameters(wrapper)]
    assert bare == wrapped


def test_penalty_follows_in_place_updates_and_reallocated_parameters(model):
    """Optimizers update in place (cached views stay current); a wrapper may swap storage."""
    params = lora_parameters(model)
    anchor = {p.name: p.param.detach().clone() for p in params}
    ones = DiagPrecision({p.name: torch.ones_like(p.param) for p in params})
    pen = LaplacePenalty(ones, anchor, params, 2.0)
    with torch.no_grad():
        params[0].param.add_(0.5)  # in place, like AdamW
    expect = float((0.5**2) * params[0].param.numel())
    assert_close(pen().detach(), torch.tensor(expect), rtol=1e-5, atol=1e-6)
    for p in params:  # new storage, like a wrapper casting or moving the parameters
        p.param.data = p.param.data.clone() + 1.0
    total = sum(float((p.param.detach() - anchor[p.name]).square().sum()) for p in params)
    assert_close(pen().detach(), torch.tensor(total), rtol=1e-5, atol=1e-6)


def test_combining_structures_is_a_clear_error(model):
    class Other(DiagPrecision):
        structure = "other"

    a = DiagPrecision({p.name: torch.ones_like(p.param) for p in lora_parameters(model)})
    with pytest.raises(ValueError, match="cannot combine a diag precision with a other precision"):
        accumulate(a, Other(a.values), "sum")
