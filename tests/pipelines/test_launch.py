"""Scale-out through the deepspeed launcher: two gloo ranks on this CPU equal one process."""

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from lalora import load_precision
from pipelines.config import LineageConfig, LoraSettings, TinyModelConfig
from pipelines.runtime.launch import StepPaths, run_step
from pipelines.runtime.models import build_tiny_llama, char_tokenizer
from pipelines.stages.finetune import init_adapter
from pipelines.tracker import NullTracker

pytestmark = pytest.mark.slow  # a real flow, DeepSpeed engine or subprocess: make test, not test-fast


class Recorder(NullTracker):
    def __init__(self):
        self.metrics = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, metrics))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    tok = char_tokenizer()
    base = build_tiny_llama(TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                            max_positions=32), tok, seed=3)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    lora = LoraSettings(r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    anchor = init_adapter(str(root / "base"), lora, dtype="float32", out_dir=str(root / "init"))
    return root, anchor


CONFIG = {"lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
          "lalora": {"lambda": 5.0, "samples": 24, "batch_size": 8},
          "source": {"name": "src", "data": {"kind": "generator", "op": "copy", "size": 80}, "eval_size": 8},
          "domains": [{"name": "one", "data": {"kind": "generator", "op": "reverse", "size": 80}, "eval_size": 8}],
          "training": {"steps": 8, "batch_size": 8, "lr": 5e-3, "log_every": 4, "max_length": 32}}


def _cfg(world_size: int) -> LineageConfig:
    return LineageConfig.model_validate({**CONFIG, "deepspeed": {"world_size": world_size}})


def _paths(root, anchor, out, precision=None):
    return StepPaths(str(root / "base"), anchor, precision, str(root / "data"), str(root / out))


def _precision(root, anchor, world_size, out, tracker):
    return run_step("precision", _cfg(world_size), 1, _paths(root, anchor, out), tracker)


def _finetune(root, anchor, precision, world_size, out, tracker):
    return run_step("finetune", _cfg(world_size), 1, _paths(root, anchor, out, precision), tracker)


def test_world_size_two_equals_one_process(setup):
    root, anchor = setup
    one, two = 1, 2
    p1 = _precision(root, anchor, one, "ws1", NullTracker())
    rec = Recorder()
    p2 = _precision(root, anchor, two, "ws2", rec)
    assert p2.n_samples == p1.n_samples == 24
    assert any("curvature/n_samples" in m for _, m in rec.metrics)  # rank 0's tracker calls came back
    prec1, _ = load_precision(p1.path)
    prec2, _ = load_precision(p2.path)
    s1, s2 = prec1.to_state_dict(), prec2.to_state_dict()
    assert s1.keys() == s2.keys()
    for name in s1:
        assert_close(s2[name], s1[name], rtol=1e-5, atol=1e-10)

    f1 = _finetune(root, anchor, p1.path, one, "ws1", NullTracker())
    rec = Recorder()
    f2 = _finetune(root, anchor, p1.path, two, "ws2", rec)
    assert [s for s, m in rec.metrics if "train/loss" in m] == [4, 8]
    assert f2.final_loss == pytest.approx(f1.final_loss, rel=1e-4)
    a1 = load_file(f"{f1.adapter}/adapter_model.safetensors")
    a2 = load_file(f"{f2.adapter}/adapter_model.safetensors")
    assert a1.keys() == a2.keys() and len(a1) == 4
    init = load_file(f"{anchor}/adapter_model.safetensors")
    assert any(not torch.equal(a1[k], init[k]) for k in a1)  # it trained
    for k in a1:
        assert_close(a2[k], a1[k], rtol=1e-4, atol=1e-6)
