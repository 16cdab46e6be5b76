import json

import pytest
import torch
from torch.testing import assert_close

from lalora import CheckpointError, DiagPrecision, Prior, load_precision, lora_parameters, save_precision


@pytest.fixture
def saved(model, tmp_path):
    g = torch.Generator().manual_seed(0)
    prec = DiagPrecision({p.name: torch.rand(p.param.shape, generator=g) for p in lora_parameters(model)})
    history = [{"stage": 1, "domain": "source", "mode": "sum", "gamma": 1.0, "n_samples": 8}]
    meta = save_precision(tmp_path, prec, fisher_type="empirical", n_samples=8, prior=Prior(0.1, 0.2), history=history)
    shapes = {p.name: tuple(p.param.shape) for p in lora_parameters(model)}
    return tmp_path, prec, meta, shapes


def test_round_trip_through_safetensors(saved):
    path, prec, meta, shapes = saved
    loaded, meta2 = load_precision(path, shapes)
    assert meta2 == meta
    assert meta2.prior_value == Prior(0.1, 0.2)
    assert meta2.history[0]["domain"] == "source"
    for name, v in prec.values.items():
        assert_close(loaded.values[name], v, rtol=0, atol=0)
    assert not list(path.glob(".*tmp*")), "temporary files left behind"


def test_flipped_byte_fails_the_checksum(saved):
    path, _, _, shapes = saved
    f = path / "precision.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_precision(path, shapes)


def test_wrong_shape_is_named(saved):
    path, _, _, shapes = saved
    name = next(iter(shapes))
    bad = dict(shapes)
    bad[name] = (shapes[name][0] * 2, shapes[name][1])
    with pytest.raises(CheckpointError, match=f"shape mismatch for {name}"):
        load_precision(path, bad)


def test_missing_name_is_named(saved):
    path, _, _, shapes = saved
    more = dict(shapes)
    more["model.layers.9.mlp.down_proj.lora_A"] = (2, 4)
    with pytest.raises(CheckpointError, match="lacks 1 LoRA matrices of the adapter"):
        load_precision(path, more)
    fewer = dict(list(shapes.items())[1:])
    with pytest.raises(CheckpointError, match="has 1 LoRA matrices the adapter lacks"):
        load_precision(path, fewer)


def test_missing_or_garbled_metadata(saved, tmp_path):
    path, _, _, shapes = saved
    with pytest.raises(CheckpointError, match=r"precision.json is missing"):
        load_precision(tmp_path / "nowhere", shapes)
    (path / "precision.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_precision(path, shapes)


def test_metadata_lists_what_the_spec_requires(saved):
    path, _, _, _ = saved
    raw = json.loads((path / "precision.json").read_text())
    for key in ("structure", "fisher_type", "n_samples", "names", "shapes", "prior", "history", "sha256"):
        assert key in raw
    assert raw["structure"] == "diag" and raw["prior"] == {"tau_A": 0.1, "tau_B": 0.2}
