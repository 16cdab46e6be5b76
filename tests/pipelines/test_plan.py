"""The pure part of resuming: which settings define a stage, the plan against the record, forks,
the catalogue, and the promotion gate."""

import pytest

from pipelines.config import LineageConfig, PromotionConfig, load_config
from pipelines.lineage.plan import LineageConflict, Recorded, config_diff, fork_point, plan, stage_config, stage_keys
from pipelines.lineage.record import VersionRecord
from pipelines.stages.gate import gate


def cfg(**changes):
    data = {"domains": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}
    for key, value in changes.items():
        node = data
        *path, last = key.split("__")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    return LineageConfig.model_validate(data)


FP = {"source": "s0", "a": "a0", "b": "b0", "c": "c0"}


def _recorded(version, stage, domain, config_sha256, data_sha256):
    return Recorded(
        str(version),
        VersionRecord(
            "m",
            stage,
            domain,
            config_sha256,
            data_sha256,
            adapter_uri="runs:/a",
            rows_uri="runs:/r",
            config_uri="runs:/c",
            base_uri="runs:/b",
        ),
    )


def record(keys, upto):
    return [_recorded(k.stage, k.stage, k.domain, k.config_sha256, k.data_sha256) for k in keys[:upto]]


def test_a_stage_is_defined_by_what_changes_its_result_only():
    base = stage_keys(cfg(), FP)
    assert len({k.config_sha256 for k in base}) == 3
    assert (
        stage_keys(
            cfg(training__log_every=1, training__checkpoint_every=7, deepspeed__world_size=3, training__batch_size=63),
            FP,
        )[0]
        != base[0]
    )  # batch size matters
    same = stage_keys(
        cfg(
            training__log_every=1,
            training__checkpoint_every=7,
            deepspeed__world_size=2,
            evaluation__max_new_tokens=3,
            promotion__min_bwt=0.0,
            name="other",
        ),
        FP,
    )
    assert same == base
    later = stage_keys(cfg(domains=[{"name": "a"}, {"name": "b"}, {"name": "c", "eval_size": 7}]), FP)
    assert later[:2] == base[:2] and later[2] != base[2]
    assert stage_keys(cfg(), {**FP, "b": "b1"})[:1] == base[:1]
    assert stage_keys(cfg(), {**FP, "b": "b1"})[1].data_sha256 != base[1].data_sha256


def test_local_data_is_identified_by_content_not_path():
    one = cfg(domains=[{"name": "a", "data": {"kind": "local", "path": "/x/a.jsonl"}}])
    two = cfg(domains=[{"name": "a", "data": {"kind": "local", "path": "/elsewhere/a.jsonl"}}])
    assert stage_config(one, 1) == stage_config(two, 1)


def test_a_checked_base_is_identified_by_its_weights_not_its_path(tmp_path):
    sha, other = "a" * 64, "b" * 64
    here = cfg(model__path="/here/demo-base", model__sha256=sha)
    assert stage_keys(here, FP) == stage_keys(cfg(model__path="/there/demo-base", model__sha256=sha), FP)
    assert stage_keys(here, FP)[0] != stage_keys(cfg(model__path="/here/demo-base", model__sha256=other), FP)[0]
    assert "sha256" not in stage_config(cfg(model__path="/x"), 1)["model"]  # hashes recorded before the setting hold
    assert stage_config(cfg(model__path="/x"), 1) != stage_config(cfg(model__path="/y"), 1)  # unchecked: the path
    # a directory beside the config is read from there, wherever the command runs; a hub id stays as written
    (tmp_path / "demo-base").mkdir()
    (tmp_path / "c.yaml").write_text("model: {path: demo-base}\ndomains: [{name: a}]\n")
    assert load_config(tmp_path / "c.yaml").model.path == str(tmp_path / "demo-base")
    hub = load_config(tmp_path / "c.yaml", ["model.path=HuggingFaceTB/SmolLM2-135M"])
    assert hub.model.path == "HuggingFaceTB/SmolLM2-135M"


def test_the_bases_extra_pretraining_data_is_part_of_every_stage(tmp_path):
    from pipelines.lineage.plan import data_fingerprints

    assert "extra_data" not in stage_config(cfg(), 1)["model"]["pretrain"]  # hashes recorded before the setting hold
    glimpse = {"name": "g", "split_seed": 1, "data": {"kind": "generator", "op": "next", "alphabet": "abc", "size": 50}}
    with_extra = cfg(model__pretrain__extra_data=[glimpse])
    fps = data_fingerprints(with_extra.all_domains[:1], str(tmp_path), with_extra.model.pretrain.extra_data)
    assert set(fps) == {"source", "pretrain:g"}
    keys = stage_keys(with_extra, FP | {"pretrain:g": fps["pretrain:g"]})
    assert all(k.config_sha256 != b.config_sha256 for k, b in zip(keys, stage_keys(cfg(), FP), strict=True))
    changed = stage_keys(with_extra, FP | {"pretrain:g": "other rows"})
    assert all(k.data_sha256 != c.data_sha256 for k, c in zip(keys, changed, strict=True))
    local = [{"name": "g", "data": {"kind": "local", "path": p}} for p in ("/x/g.jsonl", "/y/g.jsonl")]
    assert stage_config(cfg(model__pretrain__extra_data=local[:1]), 1) == stage_config(
        cfg(model__pretrain__extra_data=local[1:]), 1
    )


def test_plan_skips_finished_stages_and_runs_the_rest():
    keys = stage_keys(cfg(), FP)
    p = plan(keys, record(keys, 2), "m")
    assert [r.stage for r in p.done] == [1, 2] and [k.stage for k in p.todo] == [3] and p.resume_from == 3
    assert plan(keys, [], "m").todo == keys
    assert plan(keys, record(keys, 3), "m").todo == []


@pytest.mark.parametrize(
    "changed, message",
    [
        ({"training__lr": 0.5}, "the config of finished stage 1 (a, version 1) changed"),
        ({"domains": [{"name": "a"}, {"name": "x"}, {"name": "c"}]}, "stage 2 of m was domain 'b'"),
        ({"domains": [{"name": "a"}]}, "m has finished stage 2 (b, version 2) but the config lists only 1"),
    ],
)
def test_a_changed_finished_stage_is_a_conflict(changed, message):
    recorded = record(stage_keys(cfg(), FP), 2)
    with pytest.raises(LineageConflict, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan(stage_keys(cfg(**changed), {**FP, "x": "x0"}), recorded, "m")
    with pytest.raises(LineageConflict, match="the data of finished stage 2"):
        plan(stage_keys(cfg(), {**FP, "b": "b1"}), recorded, "m")


def test_fork_keeps_the_stages_before_the_first_change():
    recorded = record(stage_keys(cfg(), FP), 3)
    changed = stage_keys(cfg(domains=[{"name": "a"}, {"name": "b", "eval_size": 5}, {"name": "c"}]), FP)
    assert [r.stage for r in fork_point(changed, recorded, "m")] == [1]
    assert [r.stage for r in fork_point(stage_keys(cfg(), FP), recorded, "m")] == [1, 2, 3]


def test_config_diff_names_the_changed_settings():
    old = stage_config(cfg(), 2)
    new = stage_config(cfg(training__lr=0.5), 2)
    assert config_diff(old, new) == ["training.lr: 0.002 -> 0.5"]


def test_catalogue_domains_are_appended_and_reread(tmp_path):
    (tmp_path / "c.yaml").write_text("catalogue: cat.yaml\ndomains: [{name: a}]\n")
    (tmp_path / "cat.yaml").write_text("- {name: b, data: {kind: local, path: b.jsonl}}\n")
    got = load_config(tmp_path / "c.yaml")
    assert [d.name for d in got.domains] == ["a", "b"]
    assert got.domains[1].data.path == str(tmp_path / "b.jsonl")
    (tmp_path / "cat.yaml").write_text("domains:\n- {name: b}\n- {name: c}\n")
    assert [d.name for d in load_config(tmp_path / "c.yaml").domains] == ["a", "b", "c"]


R = [[0.9, 0.0, 0.0], [0.5, 0.8, 0.1], [0.4, 0.6, 0.9]]


def test_gate_passes_when_every_condition_holds():
    result = gate(["src", "a", "b"], R, PromotionConfig(min_bwt=-0.5, max_forgetting=0.5, min_learning=0.5))
    assert result.promoted and result.reasons == []
    assert result.metrics["learning"] == pytest.approx(0.8)
    assert result.metrics["BWT"] == pytest.approx(((0.4 - 0.9) + (0.6 - 0.8)) / 2)


def test_gate_refuses_with_every_failed_condition_as_the_reason():
    result = gate(["src", "a", "b"], R, PromotionConfig(min_bwt=-0.1, max_forgetting=0.3, min_learning=0.85))
    assert not result.promoted
    assert result.reasons == [
        "BWT -0.350 < min_bwt -0.100",
        "forgetting of src 0.500 > max_forgetting 0.300",
        "learning on b +0.800 < min_learning +0.850",
    ]
    assert gate(["src", "a", "b"], R, PromotionConfig()).promoted  # no conditions: always promoted


def test_a_limit_met_exactly_is_met_despite_floating_point():
    """Accuracy over 50 rows moves in steps of 0.02, and 0.80 - 0.78 is 0.020000000000000018: that forgetting is
    within a budget of 0.02 (the gate's and lambda auto's), and a learning of exactly the floor meets it."""
    R = [[0.80, 0.0], [0.78, 0.3]]
    assert R[0][0] - R[1][0] > 0.02  # what a plain comparison refused
    assert gate(["src", "a"], R, PromotionConfig(max_forgetting=0.02, min_learning=0.3)).promoted
    assert not gate(["src", "a"], R, PromotionConfig(max_forgetting=0.0199)).promoted
    from pipelines.lineage.auto import Trial

    assert Trial(1, 3.0, 10, 0.3, {"src": R[0][0] - R[1][0]}, 1.0, "/a").feasible(0.02)


def test_gate_reads_probe_columns_and_lower_is_better_scores():
    # columns: src (accuracy), a (NLL: lower is better), probe (accuracy)
    R = [[0.9, 3.0, 0.7], [0.8, 2.0, 0.4]]
    result = gate(["src", "a", "probe"], R, PromotionConfig(max_forgetting=0.2, min_learning=0.5), [True, False, True])
    assert result.metrics["learning"] == pytest.approx(1.0)  # the NLL fell by 1.0: learning is positive
    assert not result.promoted and result.reasons == ["forgetting of probe 0.300 > max_forgetting 0.200"]


def test_the_fields_that_mark_themselves_outside_a_stages_identity_are_the_ones_the_hash_leaves_out():
    """The marks are on the fields (NOT_IDENTITY, WHEN_SET in their schema); plan reads the sections it hashes.
    A mark on a field of any other model would be silently ignored: none is there."""
    import pipelines.config as config_pkg
    from pipelines.config.base import Model
    from pipelines.lineage import plan as plan_module

    def models(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from models(sub)

    marked = {
        (cls.__name__, f.alias or name, f.json_schema_extra["identity"])
        for cls in set(models(Model))
        for name, f in cls.model_fields.items()
        if isinstance(f.json_schema_extra, dict) and "identity" in f.json_schema_extra
    }
    read = (
        {(config_pkg.TrainingConfig.__name__, n, False) for n in plan_module._IRRELEVANT["training"]}
        | {(config_pkg.DeepSpeedConfig.__name__, n, False) for n in plan_module._IRRELEVANT["deepspeed"]}
        | {(config_pkg.LaLoRAConfig.__name__, n, False) for n in plan_module._IRRELEVANT["lalora"]}
        | {(config_pkg.DomainConfig.__name__, n, "when set") for n in plan_module._UNSET_UNSEEN}
    )
    assert marked == read
    assert ("TrainingConfig", "loss_chunk", False) in marked and ("DomainConfig", "lambda", "when set") in marked
