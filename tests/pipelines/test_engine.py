"""The training loop inside a real DeepSpeed engine (CPU accelerator, gloo)."""

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from lalora import DiagPrecision, LaplacePenalty, Prior, build_estimator, lora_parameters
from pipelines.config import DeepSpeedConfig
from pipelines.runtime.engine import DivergenceError, train
from pipelines.tracker import NullTracker
from tests.conftest import LossSteps, child_env, padded_batch, tiny_lora_model

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # a real flow, DeepSpeed engine or subprocess: make test, not test-fast


class Recorder(NullTracker):
    def __init__(self):
        self.metrics = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, metrics))


def drift(model, anchor):
    return sum(float((p.param.detach() - anchor[p.name]).square().sum()) for p in lora_parameters(model))


def run(lam, zero_stage=0, steps=12, log_every=4, **options):
    model = tiny_lora_model(seed=0).train()
    params = lora_parameters(model)
    anchor = {p.name: p.param.detach().clone() for p in params}
    ones = DiagPrecision({p.name: torch.ones_like(p.param) for p in params})
    rec = Recorder()
    result = train(
        model,
        [p.param for p in params],
        itertools.repeat(padded_batch()),
        steps=steps,
        lr=1e-2,
        batch_size=4,
        ds=DeepSpeedConfig(zero_stage=zero_stage),
        tracker=rec,
        log_every=log_every,
        desc="test",
        make_penalty=lambda m: LaplacePenalty(ones, anchor, lora_parameters(m), lam, Prior(0, 0)),
        **options,
    )
    return model, anchor, result, rec


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_penalty_holds_parameters_to_the_anchor_inside_deepspeed(zero_stage):
    free, anchor, res0, rec = run(0.0, zero_stage)
    held, anchor_h, res1, _ = run(1000.0, zero_stage)
    assert res0.steps == 12 and [s for s, _ in rec.metrics] == [4, 8, 12]
    assert res0.final_penalty == 0.0 and res1.final_penalty > 0.0
    assert drift(held, anchor_h) < 0.2 * drift(free, anchor)


def test_curvature_of_a_model_inside_an_engine_equals_the_bare_model():
    import deepspeed

    from pipelines.runtime.distributed import distributed
    from pipelines.runtime.engine import deepspeed_config

    bare = tiny_lora_model(seed=4)
    expected = build_estimator("diag").estimate(bare, [padded_batch()]).precision.to_state_dict()
    with distributed():
        wrapped = tiny_lora_model(seed=4)
        params = [p.param for p in lora_parameters(wrapped)]
        engine, *_ = deepspeed.initialize(
            model=wrapped,
            model_parameters=params,
            optimizer=torch.optim.AdamW(params, lr=1e-3),
            config=deepspeed_config(DeepSpeedConfig(zero_stage=1), 4),
        )
        got = build_estimator("diag").estimate(engine, [padded_batch()]).precision.to_state_dict()
        engine.destroy()
    assert got.keys() == expected.keys()
    for name in expected:
        assert_close(got[name], expected[name], rtol=1e-5, atol=1e-9)


def test_a_zero3_engine_leaves_torchs_linear_as_it_found_it():
    """ZeRO-3's set-up replaces torch.nn.functional.linear for the process; the engine's teardown puts torch's
    back, so a later step (curvature, scoring) does not run every linear layer through DeepSpeed's."""
    seen = []

    def penalty(m):
        seen.append(torch.nn.functional.linear.__module__)  # inside the engine
        return LaplacePenalty(
            DiagPrecision({p.name: torch.ones_like(p.param) for p in lora_parameters(m)}),
            {p.name: p.param.detach().clone() for p in lora_parameters(m)},
            lora_parameters(m),
            1.0,
        )

    assert torch.nn.functional.linear is torch._C._nn.linear
    model = tiny_lora_model(seed=0).train()
    train(
        model,
        [p.param for p in lora_parameters(model)],
        itertools.repeat(padded_batch()),
        steps=2,
        lr=1e-2,
        batch_size=4,
        ds=DeepSpeedConfig(zero_stage=3),
        tracker=NullTracker(),
        log_every=1,
        desc="test",
        make_penalty=penalty,
    )
    assert seen and seen[0].startswith("deepspeed.")  # what the teardown has to undo
    assert torch.nn.functional.linear is torch._C._nn.linear


@pytest.mark.parametrize("threshold", [100_000, 0])
def test_zero3_keeps_the_lora_matrices_and_what_is_under_the_threshold_whole(threshold):
    """A real ZeRO-3 engine: DeepSpeed's default threshold keeps the tiny base's small matrices whole (as a plain
    ZeRO-3 engine does: nothing to gather every step); at 0 every base matrix larger than a LoRA matrix is
    partitioned, and the LoRA matrices stay whole either way (the penalty reads them)."""
    from pipelines.runtime.engine import deepspeed_config, partitioned

    ds = DeepSpeedConfig(zero_stage=3, persistence_threshold=threshold)
    model = tiny_lora_model(seed=0)
    lora = [p.param for p in lora_parameters(model)]
    largest = max(p.numel() for p in lora)
    assert deepspeed_config(ds, 4, largest)["zero_optimization"]["stage3_param_persistence_threshold"] == max(
        threshold, largest
    )
    with partitioned(model, ds, lora) as module:
        persist = {name: p.ds_persist for name, p in module.named_parameters()}
        assert all(persist[name] for name, p in module.named_parameters() if p.requires_grad)
        bigger = [name for name, p in module.named_parameters() if p.ds_numel > largest]
        assert bigger  # the tiny base has matrices larger than its LoRA matrices, all under 100,000 elements
        assert all(persist[name] == (threshold > 0) for name in bigger), persist


FREED = """
import re, torch
from pathlib import Path
from pipelines.runtime.engine import release_freed_memory

def heap():
    return int(re.search(r"RssAnon:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) // 1024

keep, drop = [], []
for _ in range(3000):
    drop.append(torch.ones(25_000))  # 100 KB each: under glibc's mmap threshold, so on the C heap
    keep.append(torch.ones(16))  # survivors between them: the heap's top cannot shrink by itself
full = heap()
del drop
freed = heap()
release_freed_memory()
print(full, freed, heap())
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the process's RSS from /proc")
def test_freed_memory_goes_back_to_the_system(tmp_path):
    """What a step freed stays resident in the C heap (a curvature step's 440 MiB, held into the fine-tune) until
    ``release_freed_memory``, which an engine's teardown calls, hands it back. In a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", FREED], capture_output=True, text=True, cwd=ROOT, env=child_env(), timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    full, freed, released = map(int, out.stdout.split())
    assert freed > full - 50, (full, freed, released)  # freed, yet resident
    assert released < freed - 200, (full, freed, released)  # about 280 MiB of 300 handed back


def test_non_finite_loss_stops_the_stage():
    model = tiny_lora_model(seed=0).train()
    params = lora_parameters(model)
    anchor = {p.name: p.param.detach().clone() for p in params}
    inf = DiagPrecision({p.name: torch.full_like(p.param, float("inf")) for p in params})
    with torch.no_grad():
        params[1].param.add_(1.0)  # away from the anchor, so the infinite precision shows
    with pytest.raises(DivergenceError, match="non-finite penalty at step 0"):
        train(
            model,
            [p.param for p in params],
            itertools.repeat(padded_batch()),
            steps=3,
            lr=1e-2,
            batch_size=4,
            ds=DeepSpeedConfig(),
            tracker=NullTracker(),
            log_every=1,
            desc="diverge",
            make_penalty=lambda m: LaplacePenalty(inf, anchor, lora_parameters(m), 1.0),
        )


def test_a_later_non_finite_step_is_found_before_anything_is_logged_or_saved(tmp_path):
    """Steps are checked at each log or checkpoint boundary (no per-step host sync); the error
    names the first bad step and no checkpoint holds its state."""
    model = tiny_lora_model(seed=0).train()
    params = lora_parameters(model)
    calls = itertools.count()

    def make_penalty(module):
        zero = lora_parameters(module)[0].param

        def pen():
            bad = next(calls) >= 5
            return (zero.sum() * 0) + (float("nan") if bad else 0.0)

        return pen

    logged = []

    class Recorder(NullTracker):
        def log_metrics(self, metrics, step=None):
            logged.append(step)

    with pytest.raises(DivergenceError, match="non-finite penalty at step 5"):
        train(
            model,
            [p.param for p in params],
            itertools.repeat(padded_batch()),
            steps=12,
            lr=1e-3,
            batch_size=4,
            ds=DeepSpeedConfig(),
            tracker=Recorder(),
            log_every=4,
            desc="diverge",
            make_penalty=make_penalty,
            checkpoint_dir=tmp_path / "ckpt",
            checkpoint_every=4,
        )
    assert logged == [4]  # steps 1-4 were fine and logged; the window holding step 5 never was
    latest = (tmp_path / "ckpt" / "latest").read_text().strip() if (tmp_path / "ckpt" / "latest").exists() else None
    assert latest is not None and "4" in latest and "8" not in latest


def test_the_rendezvous_is_a_context_that_leaves_the_process_as_it_found_it():
    """distributed() picks a free port for its own group and restores the environment after: a child
    process (a `lalora run` a test or a notebook starts) never inherits this process's port, and no
    RANK / WORLD_SIZE / LOCAL_RANK outlives the block."""
    script = (
        "import os, subprocess, sys, torch\n"
        "from pipelines.runtime.distributed import distributed, world\n"
        "keys = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')\n"
        "before = {k: os.environ.get(k) for k in keys}\n"
        "with distributed() as inside:\n"
        "    child = subprocess.run([sys.executable, '-c', "
        "'import os; print(os.environ.get(\"MASTER_PORT\"))'],\n"
        "                           capture_output=True, text=True).stdout.strip()\n"
        "after = {k: os.environ.get(k) for k in keys}\n"
        "print(inside, before == after, child)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=child_env(), timeout=300
    )
    assert out.stdout.strip().splitlines()[-1] == "(0, 1) True None", out.stderr[-2000:]


def _zero2_cuda_options(monkeypatch):
    """ZeRO-2 as the GPU runs it (overlap_comm, contiguous gradients) with a reduction bucket small enough to
    fill during the backward, as a real model's gradients do."""
    from pipelines.runtime import engine as engine_mod

    plain = engine_mod.deepspeed_config

    def config(cfg, batch_size, *whole):
        out = plain(cfg, batch_size, *whole)
        out["zero_optimization"] |= {"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 50}
        return out

    monkeypatch.setattr(engine_mod, "deepspeed_config", config)


def _two_stages(steps=20):
    model = tiny_lora_model(seed=0).train()
    params = lora_parameters(model)
    for stage in range(2):  # the pipeline's stages, or a benchmark's warm-up and timed call, over one model
        result = train(
            model,
            [p.param for p in params],
            itertools.repeat(padded_batch()),
            steps=steps,
            lr=1e-3,
            batch_size=4,
            ds=DeepSpeedConfig(zero_stage=2),
            tracker=NullTracker(),
            log_every=10,
            desc=f"stage {stage}",
            make_penalty=None,
        )
        assert result.steps == steps
    return model


def test_two_consecutive_trainings_of_one_model_at_zero2(monkeypatch):
    """The H200's ZeRO-2 failure ('NoneType' object has no attribute 'view' in copy_grads_in_partition, second
    stage): an earlier engine's gradient hooks stayed on the parameters and emptied param.grad before the live
    engine's hook read it. train tears its engine down on return, so a second one over the same parameters works;
    the control shows the test sees the failure when the teardown is skipped."""
    import deepspeed

    _zero2_cuda_options(monkeypatch)
    _two_stages()
    monkeypatch.setattr(deepspeed.runtime.engine.DeepSpeedEngine, "destroy", lambda self: None)
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'view'"):
        _two_stages()


@pytest.mark.parametrize("loss_chunk", [0, 5])
def test_a_training_step_makes_no_host_sync(monkeypatch, loss_chunk):
    """Every device-to-host read our code makes (item, tolist, bool, int, float of a tensor) is counted: 20
    steps make exactly one more than 10 (one more log interval's flush, log_every 10), none per step; the
    chunked loss (training.loss_chunk) too."""
    import inspect

    ours = tuple(str(ROOT / d) for d in ("pipelines", "lalora"))
    reads = []

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = inspect.currentframe().f_back.f_code
            if caller.co_filename.startswith(ours):
                reads.append((name, Path(caller.co_filename).name, caller.co_name))
            return original(self, *args, **kwargs)

        return read

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))

    def steps(n):
        reads.clear()
        run(1.0, steps=n, log_every=10, loss_chunk=loss_chunk)
        return list(reads)

    ten, twenty = steps(10), steps(20)
    assert len(twenty) - len(ten) == 1, (ten, twenty)
    assert twenty.count(("tolist", "engine.py", "flush")) == 2 and len(ten) <= 2, ten


def test_a_latest_file_left_empty_by_a_kill_resumes_from_the_newest_checkpoint(tmp_path):
    """DeepSpeed rewrites ``latest`` in place after the tag's files are complete; a kill in between leaves it
    empty. The next run resumes from the newest tag (not from scratch, not a crash) and ends where an
    uninterrupted run ends."""

    def fit(steps, ckpt, tracker=None):
        model = tiny_lora_model(seed=0).train()
        params = lora_parameters(model)
        train(
            model,
            [p.param for p in params],
            (padded_batch(seed=i) for i in itertools.count()),
            steps=steps,
            lr=1e-2,
            batch_size=4,
            ds=DeepSpeedConfig(),
            tracker=tracker or NullTracker(),
            log_every=4,
            desc="resume",
            make_penalty=None,
            checkpoint_dir=ckpt,
            checkpoint_every=4,
        )
        return {p.name: p.param.detach().clone() for p in params}

    whole = fit(8, tmp_path / "whole")
    fit(4, tmp_path / "cut")  # stops after its checkpoint at step 4
    (tmp_path / "cut" / "latest").write_text("")  # as a kill while DeepSpeed rewrote it leaves it
    logged = LossSteps()
    resumed = fit(8, tmp_path / "cut", logged)
    assert logged.steps == [8]  # resumed after step 4: a start from scratch would log step 4 too
    assert (tmp_path / "cut" / "latest").read_text().strip() == "step00000008"
    for name, value in whole.items():
        assert_close(resumed[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("loss_chunk", [0, 5])
def test_training_and_curvature_forwards_fill_no_kv_cache(monkeypatch, loss_chunk):
    """load_base turns the config's KV cache on, for scoring; a training or curvature forward that follows the
    config builds a cache and copies every layer's keys and values into it each step (measured: 2.4% of a ZeRO-3
    training step, benchmarks/zero3_anchor.py). Counted: the caches transformers' Llama builds."""
    from transformers.models.llama import modeling_llama

    made = []

    class Counted(modeling_llama.DynamicCache):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(modeling_llama, "DynamicCache", Counted)
    model = tiny_lora_model()
    assert model.config.use_cache  # as load_base leaves it
    model(input_ids=padded_batch()["input_ids"])
    assert made == [1]  # what the config does to a forward that does not say otherwise: the count sees it
    made.clear()
    run(1.0, steps=3, loss_chunk=loss_chunk)
    build_estimator("kfac").estimate(tiny_lora_model(), [padded_batch()])
    assert made == []
