"""Scale-out through the deepspeed launcher: two gloo ranks on this CPU equal one process."""

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from lalora import load_precision, lora_parameters
from pipelines.config import LineageConfig, LoraSettings, TinyModelConfig
from pipelines.runtime.models import build_tiny_llama, char_tokenizer, load_adapter, load_base
from pipelines.stages.finetune import init_adapter
from pipelines.stages.steps import FINETUNE, PRECISION, run_step
from pipelines.tracker import NullTracker
from pipelines.workspace import StepPaths

pytestmark = pytest.mark.slow  # a real flow, DeepSpeed engine or subprocess: make test, not test-fast


class Recorder(NullTracker):
    def __init__(self):
        self.metrics, self.params = [], {}

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, metrics))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    tok = char_tokenizer()
    base = build_tiny_llama(
        TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_positions=32), tok, seed=3
    )
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    lora = LoraSettings(r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    anchor = init_adapter(str(root / "base"), lora, dtype="float32", out_dir=str(root / "init"))
    return root, anchor


CONFIG = {
    "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
    "lalora": {"lambda": 5.0, "samples": 24, "batch_size": 8},
    "source": {"name": "src", "data": {"kind": "generator", "op": "copy", "size": 80}, "eval_size": 8},
    "domains": [{"name": "one", "data": {"kind": "generator", "op": "reverse", "size": 80}, "eval_size": 8}],
    "training": {"steps": 8, "batch_size": 8, "lr": 5e-3, "log_every": 4, "max_length": 32},
}


def _cfg(world_size: int, zero_stage: int = 0, kind: str = "diag") -> LineageConfig:
    return LineageConfig.model_validate(
        {
            **CONFIG,
            "lalora": {**CONFIG["lalora"], "curvature": {"kind": kind}},
            # 0: the tiny base's matrices (under DeepSpeed's default threshold) partitioned at ZeRO-3 all the same
            "deepspeed": {"world_size": world_size, "zero_stage": zero_stage, "persistence_threshold": 0},
        }
    )


def _paths(root, anchor, out, precision=None):
    return StepPaths(str(root / "base"), anchor, precision, str(root / "data"), str(root / out))


def _precision(root, anchor, world_size, out, tracker, zero_stage=0, kind="diag"):
    return run_step(PRECISION, _cfg(world_size, zero_stage, kind), 1, _paths(root, anchor, out), tracker)


def _finetune(root, anchor, precision, world_size, out, tracker, zero_stage=0, kind="diag"):
    return run_step(FINETUNE, _cfg(world_size, zero_stage, kind), 1, _paths(root, anchor, out, precision), tracker)


@pytest.mark.parametrize("zero_stage,kind", [(0, "diag"), (3, "diag"), (3, "kfac")])
def test_world_size_two_equals_one_process(setup, zero_stage, kind):
    """Two ranks through the launcher equal one process without DeepSpeed partitioning; at ZeRO-3 the base
    is partitioned across the two (each rank holds about half its bytes) and the LoRA matrices are whole where
    the curvature and the penalty read them. The curvature data is 3 batches: at ZeRO-3 the rank with fewer
    runs a batch that scores nothing, as every forward gathers weights with the other rank."""
    root, anchor = setup
    one, two = 1, 2
    tag = f"z{zero_stage}-{kind}"
    p1 = _precision(root, anchor, one, f"ws1-{tag}", NullTracker(), kind=kind)
    rec = Recorder()
    p2 = _precision(root, anchor, two, f"ws2-{tag}", rec, zero_stage, kind)
    assert p2.n_samples == p1.n_samples == 24
    assert any("curvature/n_samples" in m for _, m in rec.metrics)  # rank 0's tracker calls came back
    prec1, _ = load_precision(p1.path)
    prec2, _ = load_precision(p2.path)
    s1, s2 = prec1.to_state_dict(), prec2.to_state_dict()
    assert s1.keys() == s2.keys()
    if kind == "diag":
        for name in s1:
            assert_close(s2[name], s1[name], rtol=1e-5, atol=1e-10)
    else:  # the factors' eigenvectors are defined up to sign (and rotation within an eigenspace): the matrix is not
        d1, d2 = prec1.to_dense(), prec2.to_dense()
        assert_close(d2, d1, rtol=1e-5, atol=1e-6 * float(d1.abs().max()))

    f1 = _finetune(root, anchor, p1.path, one, f"ws1-{tag}", NullTracker(), kind=kind)
    rec = Recorder()
    f2 = _finetune(root, anchor, p1.path, two, f"ws2-{tag}", rec, zero_stage, kind)
    assert [s for s, m in rec.metrics if "train/loss" in m] == [4, 8]
    held = rec.params["train.base_param_bytes_per_rank"]
    whole = sum(p.numel() * 4 for p in load_base(str(root / "base"))[0].parameters())
    if zero_stage == 3:  # half of each partitioned matrix (rounded up), the small norms whole
        assert 0.5 * whole <= held < 0.52 * whole, (held, whole)
    else:
        assert held == whole
    assert f2.final_loss == pytest.approx(f1.final_loss, rel=1e-4)
    a1 = load_file(f"{f1.adapter}/adapter_model.safetensors")
    a2 = load_file(f"{f2.adapter}/adapter_model.safetensors")
    assert a1.keys() == a2.keys() and len(a1) == 4
    init = load_file(f"{anchor}/adapter_model.safetensors")
    assert any(not torch.equal(a1[k], init[k]) for k in a1)  # it trained
    for k in a1:
        assert a2[k].numel() == a1[k].numel() > 0  # never the empty adapter of a ZeRO-3 save
        assert_close(a2[k], a1[k], rtol=1e-4, atol=1e-6)
    loaded = load_adapter(load_base(str(root / "base"))[0], f2.adapter)  # peft loads it onto the base
    loaded_params = lora_parameters(loaded)
    assert len(loaded_params) == len(a2)
    for p in loaded_params:
        key = next(k for k in a2 if k.startswith(f"base_model.model.{p.name}."))
        assert torch.equal(p.param.detach(), a2[key])
