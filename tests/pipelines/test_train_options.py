"""The fine-tune's speed and memory options (issue 27, item 4): each computes the update the default computes.

training.loss_chunk (the LM head run chunk by chunk on the target positions), training.activation_checkpointing
and training.optimizer_impl change how a step is computed, not what it computes: the loss and its gradients
match transformers' own, and the adapter trained with each option matches the default's, inside a real
DeepSpeed engine. None of them is part of a stage's identity.
"""

import itertools

import pytest
import torch
from torch.testing import assert_close

from lalora import lora_parameters
from pipelines.config import DeepSpeedConfig, LineageConfig
from pipelines.errors import BadInput
from pipelines.lineage.plan import stage_config
from pipelines.runtime.engine import adamw, train
from pipelines.runtime.loss import check_chunkable, chunked_causal_loss, target_positions
from pipelines.tracker import NullTracker
from tests.configs import tiny_config
from tests.conftest import padded_batch, tiny_lora_model


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("chunk", [1, 3, 10_000])
def test_the_chunked_loss_and_its_gradients_are_transformers_own(chunk):
    model = tiny_lora_model(seed=0).train()
    batch = padded_batch()
    ref = model(**batch).loss
    ref_grads = _grads(model, ref)
    loss = chunked_causal_loss(model, batch, chunk, None)
    assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    grads = _grads(model, loss)
    for name, g in ref_grads.items():
        assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_the_chunked_loss_runs_the_head_on_the_target_positions_only():
    """Prompt and padding positions never reach the head: with their hidden states made NaN on the way out of
    the decoder, the chunked loss and its gradients are what they are with them intact (a head run over every
    position and masked afterwards, as this loss was before, gives NaN gradients here); the positions are the
    ones whose next label is not -100, and the host-found ``targets`` give the same loss as the default."""
    model = tiny_lora_model(seed=0).train()
    batch = padded_batch()
    targets = target_positions(batch["labels"])
    assert targets.tolist() == [i * 6 + t for i, n in enumerate((7, 5, 6, 3)) for t in range(1, n - 1)]
    ref = chunked_causal_loss(model, batch, 4, None)
    ref_grads = _grads(model, ref)
    assert_close(chunked_causal_loss(model, batch, 4, None, targets), ref, rtol=0, atol=0)

    rows, length = batch["input_ids"].shape
    poisoned = torch.ones(rows * (length - 1), dtype=torch.bool)
    poisoned[targets] = False
    poisoned = torch.cat([poisoned.view(rows, length - 1), torch.zeros(rows, 1, dtype=torch.bool)], dim=1)

    nan = torch.zeros(rows, length, 1).masked_fill(poisoned[..., None], float("nan"))

    def poison(_module, _args, out):  # NaN added to every non-target position's hidden state, gradient passed on
        out.last_hidden_state = out.last_hidden_state + nan
        return out

    hook = model.get_base_model().model.register_forward_hook(poison)
    try:
        loss = chunked_causal_loss(model, batch, 4, None)
        assert_close(loss, ref, rtol=0, atol=0)
        for name, g in _grads(model, loss).items():
            assert_close(g, ref_grads[name], rtol=0, atol=0, msg=name)
    finally:
        hook.remove()


def test_the_head_multiplies_only_the_target_rows():
    """Every matrix product with the head's weight is recorded at the dispatcher, with the rows it multiplies:
    the model's own head call on the one position it is asked for (a row per sequence), then each target row
    twice (its logits, its gradient), in chunks of at most ``chunk``, and nothing in the backward pass. A head
    run over every position, whatever it does with the result, multiplies all of the batch's rows (the control,
    transformers' own loss: 28 rows forward and 28 backward, against 4 + 2 x 13 here)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = tiny_lora_model(seed=0).train()
    batch = padded_batch()
    weight = model.get_base_model().get_output_embeddings().weight
    products = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    class HeadRows(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rows = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in products or func is torch.ops.aten.linear.default:
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                if any(t.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr() for t in tensors):
                    other = next(
                        t for t in tensors if t.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()
                    )
                    self.rows.append(other.reshape(-1, other.shape[-1]).shape[0])
            return func(*args, **(kwargs or {}))

    n_targets = len(target_positions(batch["labels"]))
    with HeadRows() as seen:
        chunked_causal_loss(model, batch, 4, None).backward()
    assert seen.rows[0] == batch["input_ids"].shape[0]  # logits_to_keep=1: the last position of each sequence
    assert sum(seen.rows[1:]) == 2 * n_targets and max(seen.rows[1:]) <= 4, seen.rows
    with HeadRows() as full:  # the control: transformers' loss runs every position through the head, both ways
        model(**batch).loss.backward()
    assert full.rows == [batch["input_ids"].numel()] * 2, full.rows


def test_a_model_whose_forward_skips_its_head_module_is_refused_as_input(monkeypatch):
    """The chunked loss runs in a pre-hook of the module ``get_output_embeddings`` returns: a model whose
    forward computes its logits some other way gets one line to fix, not an IndexError."""
    model = tiny_lora_model(seed=0)
    inner = model.get_base_model()
    unused = torch.nn.Linear(inner.config.hidden_size, inner.config.vocab_size, bias=False)
    monkeypatch.setattr(type(inner), "get_output_embeddings", lambda self: unused)
    with pytest.raises(BadInput, match=r"does not call its LM head module .*set training\.loss_chunk: 0"):
        chunked_causal_loss(model, padded_batch(), 4, None)


def test_the_chunked_loss_divides_by_the_data_parallel_normaliser_as_transformers_does():
    model = tiny_lora_model(seed=0)
    batch, items = padded_batch(), torch.tensor(7.0, dtype=torch.float64)
    assert_close(
        chunked_causal_loss(model, batch, 4, items).double(),
        model(**batch, num_items_in_batch=items).loss.double(),
        rtol=1e-6,
        atol=1e-6,
    )


def test_a_model_whose_logits_are_not_its_frozen_heads_output_is_refused_as_input():
    model = tiny_lora_model(seed=0)
    check_chunkable(model)
    model.get_base_model().config.final_logit_softcapping = 30.0
    with pytest.raises(BadInput, match=r"training\.loss_chunk: .*final_logit_softcapping.*set training\.loss_chunk: 0"):
        check_chunkable(model)
    model.get_base_model().lm_head.weight.requires_grad_(True)
    with pytest.raises(BadInput, match=r"frozen, bias-free linear LM head.*lora\.target_modules"):
        check_chunkable(model)


def test_auto_uses_torchs_own_adamw_on_the_cpu_and_fused_is_available():
    p = [torch.nn.Parameter(torch.ones(3))]
    assert adamw(p, 1e-3, "auto").defaults["fused"] is None  # what the recorded lineages ran
    assert adamw(p, 1e-3, "fused").defaults["fused"] is True


def test_the_options_are_not_part_of_a_stages_identity():
    cfg = LineageConfig.model_validate(tiny_config("one"))
    other = LineageConfig.model_validate(
        tiny_config("one", training={"optimizer_impl": "fused", "activation_checkpointing": True, "loss_chunk": 64})
    )
    assert stage_config(other, 1) == stage_config(cfg, 1)
    assert "loss_chunk" not in stage_config(cfg, 1)["training"]


def _trained(zero_stage, *, loss_chunk=0, optimizer_impl="auto", checkpointing=False):
    model = tiny_lora_model(seed=0).train()
    if checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = lora_parameters(model)
    result = train(
        model,
        [p.param for p in params],
        itertools.repeat(padded_batch()),
        steps=6,
        lr=1e-2,
        batch_size=4,
        ds=DeepSpeedConfig(zero_stage=zero_stage),
        tracker=NullTracker(),
        log_every=3,
        desc="test",
        make_penalty=None,
        optimizer_impl=optimizer_impl,
        loss_chunk=loss_chunk,
    )
    return {p.name: p.param.detach().clone() for p in lora_parameters(model)}, result.final_loss


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_each_option_trains_the_adapter_the_default_trains_inside_deepspeed(zero_stage):
    ref, ref_loss = _trained(zero_stage)
    for options in ({"loss_chunk": 5}, {"checkpointing": True}, {"optimizer_impl": "fused"}):
        got, loss = _trained(zero_stage, **options)
        assert loss == pytest.approx(ref_loss, rel=1e-5), options
        for name, value in ref.items():
            assert_close(got[name], value, rtol=1e-4, atol=1e-6, msg=f"{options}: {name}")
