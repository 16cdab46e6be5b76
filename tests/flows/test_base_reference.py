"""A version's base reference is a typed value; its JSON in model_config is what versions already recorded."""

import pytest

from flows.generator import ArtifactBase, HubBase, base_reference, resolve_base


def test_the_references_json_is_the_recorded_shape_and_reads_back():
    hub = HubBase(id="HuggingFaceTB/SmolLM2-135M", revision="abc123")
    art = ArtifactBase(uri="runs:/r1/base", location="file:///store/1/r1/artifacts/base")
    assert hub.as_json() == {"kind": "hub", "id": "HuggingFaceTB/SmolLM2-135M", "revision": "abc123"}
    assert art.as_json() == {
        "kind": "artifact",
        "uri": "runs:/r1/base",
        "location": "file:///store/1/r1/artifacts/base",
    }
    assert base_reference(hub.as_json()) == hub and base_reference(art.as_json()) == art
    assert resolve_base(hub) == ("HuggingFaceTB/SmolLM2-135M", "abc123")  # a hub id resolves without a download


def test_an_unknown_reference_is_named():
    with pytest.raises(ValueError, match="unknown base reference"):
        base_reference({"kind": "s3", "bucket": "b"})
