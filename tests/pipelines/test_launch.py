"""Scale-out through the deepspeed launcher: two gloo ranks on this CPU equal one process."""

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from lalora import load_precision
from pipelines.config import DeepSpeedConfig, DomainConfig, GeneratorSource, LaLoRAConfig, LoraSettings, TinyModelConfig, TrainingConfig
from pipelines.finetune import finetune, init_adapter
from pipelines.launch import launch
from pipelines.modeling import build_tiny_llama, char_tokenizer
from pipelines.precision import compute_precision
from pipelines.tracking import NullTracker


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


SOURCE = DomainConfig(name="src", data=GeneratorSource(op="copy", size=80), eval_size=8)
TARGET = DomainConfig(name="one", data=GeneratorSource(op="reverse", size=80), eval_size=8)
LALORA = LaLoRAConfig(samples=24, batch_size=8, **{"lambda": 5.0})
TRAINING = TrainingConfig(steps=8, batch_size=8, lr=5e-3, log_every=4)


def _precision(root, anchor, ds, out, tracker):
    kwargs = dict(base_path=str(root / "base"), anchor_adapter=anchor, cfg=LALORA, curvature_domain=SOURCE,
                  previous=None, stage=1, dtype="float32", max_length=32, seed=0, data_dir=str(root / "data"),
                  out_dir=str(root / out))
    if ds.world_size == 1:
        return compute_precision(**kwargs, tracker=tracker)
    return launch("precision", kwargs, ds, root / out, tracker)


def _finetune(root, anchor, precision, ds, out, tracker):
    kwargs = dict(base_path=str(root / "base"), anchor_adapter=anchor, precision_dir=precision, lalora=LALORA,
                  domain=TARGET, training=TRAINING, ds=ds, dtype="float32", stage=1, data_dir=str(root / "data"),
                  out_dir=str(root / out))
    if ds.world_size == 1:
        return finetune(**kwargs, tracker=tracker)
    return launch("finetune", kwargs, ds, root / out, tracker)


def test_world_size_two_equals_one_process(setup):
    root, anchor = setup
    one, two = DeepSpeedConfig(), DeepSpeedConfig(world_size=2)
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
