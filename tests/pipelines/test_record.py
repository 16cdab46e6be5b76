"""The version record: one typed definition written as tags and read back, in both formats."""

import json

from pipelines.lineage.record import STATE_TAG, VersionRecord

RECORD = VersionRecord(
    "m",
    2,
    "two",
    "c" * 64,
    "d" * 64,
    adapter_uri="runs:/r2/model/artifacts/adapter",
    rows_uri="runs:/r2/lineage/rows.json",
    config_uri="runs:/r2/lineage/stage_config.json",
    base_uri="runs:/p/base",
    base_recipe="e" * 64,
    precision_uri="runs:/r2/curvature",
    precision_sha256="f" * 64,
    promoted=False,
    promotion_reason="BWT -0.300 < min_bwt -0.050",
)


def test_round_trip_through_few_readable_tags():
    tags = RECORD.to_tags()
    assert VersionRecord.from_tags(tags) == RECORD
    assert set(tags) == {
        "lalora.lineage",
        "lalora.stage",
        "lalora.domain",
        "lalora.promotion",
        "lalora.promotion_reason",
        STATE_TAG,
    }
    assert tags["lalora.stage"] == "2" and tags["lalora.promotion"] == "rejected"
    state = json.loads(tags[STATE_TAG])
    assert state["adapter_uri"] == RECORD.adapter_uri and state["format"] == 2 and len(tags[STATE_TAG]) < 5000


def test_a_fork_records_where_it_came_from():
    forked = RECORD.forked("f", "m", "2")
    assert (forked.lineage, forked.forked_from, forked.stage) == ("f", "m/2", 2)
    assert VersionRecord.from_tags(forked.to_tags()) == forked


def test_versions_registered_before_the_state_tag_read_the_same():
    """Format 1: every field its own lalora.* tag, scores and gate metrics beside them."""
    legacy = {
        "lalora.stage": "2",
        "lalora.domain": "two",
        "lalora.lineage": "m",
        "lalora.stage_config_sha256": "c" * 64,
        "lalora.data_sha256": "d" * 64,
        "lalora.adapter_uri": "runs:/r2/adapter",
        "lalora.precision_uri": "runs:/r2/curvature",
        "lalora.rows_uri": "runs:/r2/lineage/rows.json",
        "lalora.config_uri": "runs:/r2/lineage/stage_config.json",
        "lalora.base_uri": "runs:/p/base",
        "lalora.base_recipe": "e" * 64,
        "lalora.precision_sha256": "f" * 64,
        "score.two": "0.5000",
        "lalora.promotion": "promoted",
        "gate.BWT": "0.0000",
    }
    record = VersionRecord.from_tags(legacy)
    assert record.format == 1 and record.uri("adapter") == "runs:/r2/adapter" and record.promoted
    assert record.config_sha256 == "c" * 64 and record.base_recipe == "e" * 64


def test_a_version_that_records_no_stage_is_none():
    assert VersionRecord.from_tags({}) is None
    assert VersionRecord.from_tags({"lalora.stage": "1", "lalora.domain": "x"}) is None
