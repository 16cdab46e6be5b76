"""Replay: the batches hold the configured share of earlier rows, only from the named sources' training
splits (never an evaluation row), the setting is part of a stage's identity, and a resumed stage is exact."""

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.config import LineageConfig, ReplayConfig
from pipelines.data.replay import mixed_batches, replay_pool, replay_rows, replay_sources
from pipelines.data.sources import load_domain
from pipelines.data.tokens import Encoded
from pipelines.lineage.plan import sha256_json, stage_config, stage_keys
from tests.conftest import LossSteps

CFG = {
    "source": {"name": "src", "data": {"kind": "generator", "op": "copy", "size": 60}, "eval_size": 10},
    "domains": [
        {"name": "one", "data": {"kind": "generator", "op": "reverse", "size": 60}, "eval_size": 10},
        {"name": "two", "data": {"kind": "generator", "op": "increment", "size": 60}, "eval_size": 10},
        {
            "name": "three",
            "data": {"kind": "generator", "op": "next", "alphabet": "abcdefghij", "size": 60},
            "eval_size": 10,
        },
    ],
    "training": {"batch_size": 8},
}


def _cfg(**replay):
    return LineageConfig.model_validate({**CFG, "training": {"batch_size": 8, "replay": replay}})


def _key(row):
    return (row["prompt"], row["answer"])


@pytest.mark.parametrize("fraction,k", [(0.25, 2), (0.5, 4), (0.01, 1), (0.99, 7)])
def test_every_batch_holds_the_configured_share_of_replayed_rows(fraction, k):
    new = [Encoded([1, 5, 5], [-100, 5, 5]) for _ in range(30)]
    old = [Encoded([1, 6, 6, 6], [-100, 6, 6, 6]) for _ in range(11)]
    assert replay_rows(8, fraction) == k
    seen = 0
    for batch in itertools.islice(mixed_batches(new, old, 8, fraction, 0, seed=1, replay_seed=2), 40):
        ids = batch["input_ids"]
        assert ids.shape[0] == 8
        assert int((ids[:, 1] == 6).sum()) == k  # replayed rows, every batch
        seen += int((ids[:, 1] == 6).sum())
    assert seen / (40 * 8) == pytest.approx(k / 8)


def test_no_replay_is_the_plain_batches():
    new = [Encoded([1, i % 7 + 3], [-100, 3]) for i in range(20)]
    from pipelines.data.tokens import train_batches

    old = [Encoded([1, 6, 6, 6], [-100, 6, 6, 6]) for _ in range(11)]
    plain = list(itertools.islice(train_batches(new, 4, 0, 3), 6))
    for pool, fraction in (([], 0.5), (old, 0.0)):  # nothing to replay, or a share of nothing
        mixed = list(itertools.islice(mixed_batches(new, pool, 4, fraction, 0, 3, 9), 6))
        assert len(plain) == len(mixed) == 6
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(plain, mixed, strict=True))


def test_the_pool_holds_only_the_named_training_splits_never_an_evaluation_row(tmp_path):
    cfg = _cfg(fraction=0.25)
    splits = {d.name: load_domain(d, tmp_path) for d in cfg.all_domains}
    evaluation = {_key(r) for s in splits.values() for r in s.eval}

    def pool(replay, stage=3):
        sources = replay_sources(replay, cfg.source, cfg.domains[: stage - 1])
        return replay_pool(replay, sources, tmp_path)

    both = pool(cfg.training.replay)
    assert both.counts == {"src": 50, "one": 50, "two": 50}  # the source, then stages 1 and 2 before stage 3
    keys = {_key(r) for r in both.rows}
    assert keys <= {_key(r) for n in ("src", "one", "two") for r in splits[n].train}
    assert not keys & evaluation and not keys & {_key(r) for r in splits["three"].train}
    only = pool(ReplayConfig(fraction=0.25, sources=["domains"], max_per_domain=7), stage=2)
    assert only.counts == {"one": 7} and [_key(r) for r in only.rows] == [_key(r) for r in splits["one"].train[:7]]
    assert pool(ReplayConfig(fraction=0.25, sources=["source"]), stage=1).counts == {"src": 50}
    named = ReplayConfig(
        fraction=0.25, sources=[], data=[{"name": "general", "data": {"kind": "generator", "op": "rotate", "size": 30}}]
    )
    assert pool(named).counts == {"general": 30}


def test_a_replay_setting_is_part_of_the_stages_identity():
    plain = LineageConfig.model_validate(CFG)
    assert "replay" not in stage_config(plain, 1)["training"]  # off: the hash of every lineage before replay existed
    assert sha256_json(stage_config(_cfg(), 1)) == sha256_json(stage_config(plain, 1))
    on = sha256_json(stage_config(_cfg(fraction=0.25), 2))
    assert on != sha256_json(stage_config(plain, 2))
    assert on != sha256_json(stage_config(_cfg(fraction=0.25, max_per_domain=5), 2))
    assert on != sha256_json(stage_config(_cfg(fraction=0.25, sources=["source"]), 2))
    data = {"name": "general", "data": {"kind": "generator", "op": "rotate", "size": 30}}
    fp = {"src": "s", "one": "1", "two": "2", "three": "3", "replay:general": "g"}
    a = stage_keys(_cfg(fraction=0.25, data=[data]), fp)[0].data_sha256
    assert a != stage_keys(_cfg(fraction=0.25, data=[data]), {**fp, "replay:general": "changed"})[0].data_sha256


def test_a_resumed_stage_with_replay_equals_an_uninterrupted_one(tmp_path):
    """The batches are a pure function of the seeds: stopped at a checkpoint and run again, the stage skips
    exactly what it trained and ends with the adapter of a run that never stopped."""
    from pipelines.config import TinyModelConfig
    from pipelines.runtime.models import build_tiny_llama, char_tokenizer
    from pipelines.stages.finetune import init_adapter
    from pipelines.stages.steps import FINETUNE, run_step
    from pipelines.tracker import NullTracker
    from pipelines.workspace import StepPaths

    tok = char_tokenizer()
    base = build_tiny_llama(
        TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_positions=32), tok, seed=3
    )
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    cfg = LineageConfig.model_validate(
        {
            **CFG,
            "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
            "lalora": {"lambda": 0},
            "training": {
                "steps": 8,
                "batch_size": 8,
                "lr": 5e-3,
                "log_every": 2,
                "checkpoint_every": 2,
                "replay": {"fraction": 0.25},
            },
        }
    )
    anchor = init_adapter(str(tmp_path / "base"), cfg.lora, dtype="float32", out_dir=str(tmp_path / "init"))

    class Killed(Exception):
        pass

    class KillAt(NullTracker):
        def log_metrics(self, metrics, step=None):
            if step == 4:
                raise Killed

    def paths(name):
        return StepPaths(
            str(tmp_path / "base"),
            anchor,
            None,
            str(tmp_path / "data"),
            str(tmp_path / name),
            str(tmp_path / name / "ckpt"),
        )

    with pytest.raises(Killed):
        run_step(FINETUNE, cfg, 3, paths("resumed"), KillAt())
    assert "step00000002" in (Path(paths("resumed").checkpoint) / "latest").read_text()

    logged = LossSteps()
    resumed = run_step(FINETUNE, cfg, 3, paths("resumed"), logged)
    assert logged.steps == [4, 6, 8]  # from the checkpoint at step 2: a start from scratch logs step 2 too
    straight = run_step(FINETUNE, cfg, 3, paths("straight"), NullTracker())
    a = load_file(f"{resumed.adapter}/adapter_model.safetensors")
    b = load_file(f"{straight.adapter}/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    init = load_file(f"{anchor}/adapter_model.safetensors")
    assert any(not torch.equal(a[n], init[n]) for n in a)  # it trained
