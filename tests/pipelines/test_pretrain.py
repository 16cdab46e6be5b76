"""The tiny base's pretraining data: the source's training split and ``model.pretrain.extra_data``."""

import pytest

from pipelines.config import DeepSpeedConfig, DomainConfig, ModelConfig, load_config
from pipelines.data.sources import load_domain
from pipelines.stages.pretrain import BaseInputs, prepare_base, pretraining_rows
from pipelines.tracker import NullTracker


def _data(name, op, alphabet, size=120, seed=0, eval_size=20):
    return DomainConfig.model_validate(
        {
            "name": name,
            "eval_size": eval_size,
            "split_seed": seed,
            "data": {"kind": "generator", "op": op, "alphabet": alphabet, "size": size},
        }
    )


SOURCE = _data("source", ["copy", "reverse"], "0123456789abcdefghij")
EXTRA = [
    _data("next-glimpse", "next", "abcdefghij", size=40, seed=1, eval_size=200),  # fewer rows than eval_size: fine
    _data("inc-glimpse", "increment", "0123456789", size=30, seed=1),
]
TINY = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32, "max_positions": 32}


def test_extra_data_is_added_whole_after_the_source_training_rows(tmp_path):
    source_only, fp0 = pretraining_rows(SOURCE, [], tmp_path)
    mixed, fp1 = pretraining_rows(SOURCE, EXTRA, tmp_path)
    assert source_only == load_domain(SOURCE, tmp_path).train
    assert fp0 == load_domain(SOURCE, tmp_path).fingerprint  # no extra data: the recipe bases had before
    # every row: no evaluation split is held out and mixed[: len(source_only)] == source_only
    assert len(mixed) == len(source_only) + 40 + 30
    assert sorted(r["prompt"].split(" ")[0] for r in mixed[len(source_only) :]) == ["increment"] * 30 + ["next"] * 40
    assert fp1 != fp0 and pretraining_rows(SOURCE, EXTRA[:1], tmp_path)[1] not in (fp0, fp1)


def test_the_base_is_pretrained_again_only_when_its_data_changes(tmp_path):
    model = ModelConfig.model_validate(
        {"tiny": TINY, "pretrain": {"steps": 2, "batch_size": 8, "extra_data": [e.model_dump() for e in EXTRA]}}
    )

    def prepare(model):
        inputs = BaseInputs(
            model=model, source=SOURCE, ds=DeepSpeedConfig(), max_length=24, seed=0, out_dir=str(tmp_path)
        )
        return prepare_base(inputs, NullTracker())

    assert prepare(model).pretrained_here
    assert not prepare(model).pretrained_here
    fewer = ModelConfig.model_validate(
        {"tiny": TINY, "pretrain": {"steps": 2, "batch_size": 8, "extra_data": [EXTRA[0].model_dump()]}}
    )
    assert prepare(fewer).pretrained_here


def test_extra_local_files_are_relative_to_the_config(tmp_path):
    (tmp_path / "glimpse.jsonl").write_text('{"prompt": "next ab=", "answer": "bc"}\n' * 30)
    (tmp_path / "c.yaml").write_text(
        "name: t\nmodel:\n  pretrain:\n    extra_data:\n      - {name: g, data: {kind: local, path: glimpse.jsonl}}\n"
        "domains:\n  - {name: d}\n"
    )
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.model.pretrain.extra_data[0].data.path == str((tmp_path / "glimpse.jsonl").resolve())


def test_extra_data_names_must_not_clash_with_the_domains(tmp_path):
    from pipelines.config import ConfigError

    (tmp_path / "c.yaml").write_text(
        "name: t\nmodel:\n  pretrain:\n    extra_data:\n      - {name: d, split_seed: 1}\n      - {name: g}\n"
        "      - {name: g}\ndomains:\n  - {name: d}\n"
    )
    with pytest.raises(ConfigError, match=r"model.pretrain.extra_data names must differ .* rename: d, g"):
        load_config(tmp_path / "c.yaml")
