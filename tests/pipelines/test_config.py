from pathlib import Path

import pytest

from flows.cli import main
from pipelines.config import ConfigError, LineageConfig, load_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_says_how_to_run_it(path):
    cfg = load_config(path)
    assert isinstance(cfg, LineageConfig) and cfg.domains
    _schema, run = path.read_text().splitlines()[:2]  # the editor's schema line (tests/pipelines/test_schema.py), then
    assert run.startswith("# Run: lalora run configs/"), run  # the command that runs it


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


MINIMAL = "domains:\n  - name: d1\n"


def test_minimal_config_has_working_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.lalora.lam == 10.0 and cfg.lalora.curvature.kind == "diag" and cfg.source.name == "source"
    assert [d.name for d in cfg.all_domains] == ["source", "d1"]


def test_overrides_reach_any_field_including_list_items(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL),
        ["lalora.lambda=0", "training.steps=50", "domains.0.eval_size=7", "lalora.curvature={kind: identity}"],
    )
    assert cfg.lalora.lam == 0 and cfg.training.steps == 50 and cfg.domains[0].eval_size == 7
    assert cfg.lalora.curvature.kind == "identity"


@pytest.mark.parametrize(
    "text,overrides,expected",
    [
        (MINIMAL + "lora: {rr: 3}\n", [], "lora.rr: unknown key"),
        (MINIMAL, ["lalora.lambda=-1"], "lalora.lambda: Input should be greater than or equal to 0"),
        (MINIMAL, ["lora.r=0"], "lora.r: Input should be greater than 0"),
        (MINIMAL, ["lalora.accumulate.gamma=1.5"], "lalora.accumulate.gamma: Input should be less than or equal to 1"),
        (
            MINIMAL,
            ["lalora.curvature.kind=kfaq"],
            "lalora.curvature: unknown kind 'kfaq'; expected one of 'diag', 'kfac', 'kfac-tri', 'identity'",
        ),
        (MINIMAL, ["deepspeed.zero_stage=4"], "deepspeed.zero_stage: must be one of 0, 1, 2 or 3"),
        (MINIMAL, ["tracking.latest_alias=latest"], "alias 'latest' is reserved by MLflow"),
        (MINIMAL, ["training.steps=many"], "training.steps: Input should be a valid integer"),
        (
            MINIMAL,
            ["lalora.accumulate.mode=forever"],
            "lalora.accumulate.mode: must be one of 'sum', 'online' or 'replace'",
        ),
        ("domains:\n  - name: a\n  - name: a\n", [], "domain names must be unique"),
        ("domains:\n  - name: ../etc\n", [], "is not a valid domain name"),
        ("domains: []\n", [], "domains: List should have at least 1 item"),
        ("lora: [1, 2\n", [], "invalid YAML at line"),
        ("- 1\n", [], "top level must be a mapping"),
        (
            MINIMAL,
            ["domains.0.scoring=multiple_choice"],
            "domains.0: scoring multiple_choice needs choices: use preset",
        ),
        (MINIMAL, ["domains.0.scoring={kind: generate, extractor: regex}"], "extractor regex needs a pattern"),
        (
            MINIMAL,
            ["domains.0.scoring={kind: generate, extractor: regex, pattern: '(a'}"],
            "is not a valid regular expression",
        ),
        (
            MINIMAL,
            ["domains.0.scoring={kind: rank}"],
            "domains.0.scoring: unknown kind 'rank'; expected one of 'generate'",
        ),
        (
            MINIMAL,
            ["domains.0.preset=arc", "domains.0.prompt_field=q"],
            "preset 'arc' fixes the fields; drop prompt_field",
        ),
        (MINIMAL, ["domains.0.preset=gsm9k"], "domains.0.preset: must be one of 'gsm8k', 'metamathqa', 'hellaswag'"),
        (MINIMAL, ["domains.0.choices_field=options"], "choices_field and label_field go together"),
        (MINIMAL + "probes:\n  - name: d1\n", [], "domain names must be unique (source included); repeated: d1"),
    ],
)
def test_bad_configs_name_the_field_and_the_fix(tmp_path, text, overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), overrides)
    assert any(expected in line for line in e.value.errors), e.value.errors


def test_every_error_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, MINIMAL), ["lora.r=0", "lalora.lambda=-2", "training.lr=0"])
    assert len(e.value.errors) == 3


def test_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(write(tmp_path, MINIMAL), ["lalora.lambda"])


def test_validate_command_exit_codes(tmp_path, capsys):
    good = write(tmp_path, MINIMAL)
    assert main(["validate", str(good)]) == 0
    assert "OK (1 stages: d1" in capsys.readouterr().out
    assert main(["validate", str(good), "--set", "lora.r=0", "--set", "lora.bogus=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith(str(good)) for line in err)
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_run_rejects_a_bad_config_before_loading_anything(tmp_path, capsys):
    bad = write(tmp_path, MINIMAL + "lalora: {lambda: -1}\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lalora: error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_scoring_defaults_follow_the_preset_and_shorthands_parse(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL + "source: {name: src, scoring: exact_match}\n"), ["domains.0.scoring=perplexity"]
    )
    assert cfg.domains[0].score.kind == "perplexity" and cfg.domains[0].score.metric == "nll"
    assert cfg.source.score.kind == "generate" and cfg.source.score.extractor == "exact"  # the demo's default
    assert load_config(write(tmp_path, MINIMAL)).domains[0].score == cfg.source.score
    mc = load_config(
        write(tmp_path, MINIMAL + "probes:\n  - {name: hs, preset: hellaswag, data: {kind: local, path: hs.jsonl}}\n")
    )
    assert mc.probes[0].score.kind == "multiple_choice" and mc.probes[0].score.metric == "acc_norm"
    assert mc.probes[0].data.path == str(tmp_path / "hs.jsonl")  # local paths resolve against the config file
    assert [d.name for d in mc.eval_domains] == ["source", "d1", "hs"] and len(mc.all_domains) == 2


def test_llama_math_config_is_the_paper_lineage_and_validates_offline(capsys):
    path = Path(__file__).parents[2] / "configs" / "llama-math.yaml"
    cfg = load_config(path)
    assert cfg.model.path.startswith("meta-llama/Llama-3.2") and cfg.lora.alpha == 2 * cfg.lora.r
    math = cfg.domains[0]
    assert math.preset == "metamathqa" and math.eval_data.preset == "gsm8k" and math.score.kind == "generate"
    assert {p.name: (p.preset, p.score.kind) for p in cfg.probes} == {
        "hellaswag": ("hellaswag", "multiple_choice"),
        "arc-challenge": ("arc", "multiple_choice"),
        "winogrande": ("winogrande", "multiple_choice"),
    }
    assert cfg.source.score.kind == "perplexity"
    assert main(["validate", str(path)]) == 0
    assert "probes: hellaswag, arc-challenge, winogrande" in capsys.readouterr().out


def test_the_curvature_section_is_built_from_the_estimators_registry():
    """Each kind declares its settings next to its estimator; the config has exactly those kinds and fields (in the
    registry's order, kind first, each with the setting's type, default and description)."""
    import dataclasses
    import typing

    from lalora import CURVATURES, build_estimator
    from lalora.curvature.settings import SETTINGS
    from pipelines.config import CURVATURE_CONFIGS

    assert list(CURVATURE_CONFIGS) == list(CURVATURES) == list(SETTINGS)
    for kind, cls in CURVATURES.items():
        assert SETTINGS[kind] is cls.settings, kind  # the torch-free table the config reads is the estimators' own
        section = CURVATURE_CONFIGS[kind]()
        settings = {f.name: f.default for f in dataclasses.fields(cls.settings)}
        assert list(section.model_dump()) == ["kind", *settings]
        assert section.model_dump() == {"kind": kind, **settings}
        hints = typing.get_type_hints(cls.settings)
        for f in dataclasses.fields(cls.settings):
            info = type(section).model_fields[f.name]
            assert info.annotation == hints[f.name], (kind, f.name)
            assert info.description == f.metadata.get("doc", ""), (kind, f.name)
        estimator = build_estimator(kind, **section.model_dump(exclude={"kind"}))
        assert type(estimator) is cls
    cfg = LineageConfig.model_validate(
        {"domains": [{"name": "a"}], "lalora": {"curvature": {"kind": "kfac", "top_k": 4}}}
    )
    assert cfg.lalora.curvature.top_k == 4 and cfg.lalora.curvature.max_terms == 4


def test_loading_a_config_imports_neither_torch_nor_transformers(tmp_path):
    """The CLI validates a config before anything heavy is imported: pipelines.config (models, YAML loading) and
    the curvature settings it reads come without torch, transformers or deepspeed, in a fresh interpreter."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = (
        "import sys\nfrom pipelines.config import load_config\n"
        f"load_config({str(root / 'configs' / 'demo.yaml')!r})\n"
        "print(','.join(m for m in ('torch', 'transformers', 'deepspeed', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"loading a config imported: {out.stdout.strip()}"


def test_lalora_samples_is_resolved_into_each_domain_when_the_config_loads(tmp_path):
    from pipelines.lineage.plan import stage_config

    text = (
        "source: {name: src}\ndomains:\n  - {name: a}\n  - {name: b, curvature_size: 7}\n"
        "probes: [{name: p}]\nlalora: {samples: 48}\n"
    )
    path = tmp_path / "c.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert [d.curvature_rows for d in cfg.eval_domains] == [48, 48, 7, 48]  # curvature_size wins where set
    assert load_config(path, ["lalora.samples=9"]).domains[0].curvature_rows == 9
    assert cfg.with_stage(1, lam=3.0).source.curvature_rows == 48  # a trial's config, validated again
    # resolved, not written: the dumps (and so the stage hashes and a launched rank's job) are what the file said
    assert "curvature_size" not in cfg.as_json()["source"]
    assert stage_config(cfg, 2)["domains"][0] == stage_config(load_config(path, ["lalora.samples=9"]), 2)["domains"][0]
    shared = cfg.domains[0]
    other = LineageConfig(source=shared, domains=[shared.model_copy(update={"name": "x"})], lalora={"samples": 5})
    assert other.source.curvature_rows == 5 and shared.curvature_rows == 48  # a shared domain is copied, not changed


def test_curvature_inputs_built_by_hand_must_agree_with_lalora_samples():
    from pipelines.config import DomainConfig, LaLoRAConfig
    from pipelines.stages.curvature import PrecisionInputs

    kw = dict(
        base="b", anchor="a", previous=None, stage=1, dtype="float32", max_length=8, seed=0, data_dir="d", out_dir="o"
    )
    lalora, domain = LaLoRAConfig(samples=16), DomainConfig(name="d")
    with pytest.raises(ValueError, match=r"^domain d gives 256 curvature rows, lalora.samples says 16: .*with_samples"):
        PrecisionInputs(lalora=lalora, domain=domain, **kw)  # a lone domain has the default, 256
    assert PrecisionInputs(lalora=lalora, domain=domain.with_samples(16), **kw).domain.curvature_rows == 16
    own = DomainConfig(name="d", curvature_size=5)  # its own size needs no resolution
    assert PrecisionInputs(lalora=lalora, domain=own, **kw).domain.curvature_rows == 5
