"""Bad input as a terminal shows it: the installed ``lalora`` script in a subprocess, stdout and stderr
read together (what Prefect's own log handlers print included). Every case exits 2 with exactly one
``lalora: error:`` line, no traceback anywhere, and nothing registered; a bug in the project exits 1
with its traceback. Config cases fail before anything is loaded; data and model cases run the flow
until the problem is met (tiny model, no pretraining)."""

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from flows.console import EXIT_BAD_INPUT, EXIT_BUG, EXIT_DIVERGED
from pipelines.lineage.record import VersionRecord
from tests.configs import ONE_DOMAIN, tiny
from tests.conftest import assert_one_line_error, run_lalora

pytestmark = pytest.mark.slow  # a real flow, DeepSpeed engine or subprocess: make test, not test-fast

FAST = ["--set", "model.pretrain.steps=0"]


def run_cli(tmp_path, text, overrides=(), out="out", extra=(), **env):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    args = ["run", str(cfg), "--out", str(tmp_path / out), *extra, *FAST]
    for o in overrides:
        args += ["--set", o]
    return run_lalora(args, tmp_path, **env)


def assert_nothing_registered(tmp_path, out="out", model="tiny-adapter"):
    db = tmp_path / out / "mlflow.db"
    if not db.exists():
        return
    uri = f"sqlite:///{db}"
    assert MlflowClient(uri, registry_uri=uri).search_model_versions(f"name = '{model}'") == []


CONFIG_CASES = [
    ("invalid-yaml", ONE_DOMAIN + "lora: [1, 2\n", [], "invalid YAML at line"),
    ("unknown-key", ONE_DOMAIN + "bogus: 1\n", [], "bogus: unknown key"),
    ("wrong-type", ONE_DOMAIN, ["training.steps=many"], "training.steps: Input should be a valid integer"),
    ("negative-lambda", ONE_DOMAIN, ["lalora.lambda=-1"], "lalora.lambda: Input should be greater than or equal to 0"),
    (
        "gamma-above-1",
        ONE_DOMAIN,
        ["lalora.accumulate.gamma=1.5"],
        "lalora.accumulate.gamma: Input should be less than",
    ),
    ("rank-0", ONE_DOMAIN, ["lora.r=0"], "lora.r: Input should be greater than 0"),
    ("infinite-lambda", ONE_DOMAIN, ["lalora.lambda=.inf"], "lalora.lambda: Input should be a finite number"),
    ("nan-lr", ONE_DOMAIN, ["training.lr=.nan"], "training.lr: Input should be a finite number"),
    ("unknown-curvature", ONE_DOMAIN, ["lalora.curvature.kind=kfaq"], "unknown kind 'kfaq'"),
    ("escaping-model-name", ONE_DOMAIN, ["tracking.registered_model=../x"], "is not a valid registered model name"),
    ("password-in-uri", ONE_DOMAIN, ["tracking.mlflow_uri=http://u:pw@h:5000"], "holds a password"),
    ("store-not-mlflow", ONE_DOMAIN, ["tracking.mlflow_uri=bogus://x"], "'bogus://x' is not an MLflow store"),
    ("boolean-steps", ONE_DOMAIN, ["training.steps=true"], "training: steps must be a number, got true"),
    ("boolean-rank", ONE_DOMAIN, ["lora.r=yes"], "lora: r must be a number, got true"),
    ("boolean-lambda", ONE_DOMAIN, ["lalora.lambda=true"], "lalora.lambda: must be a number >= 0 or 'auto', got true"),
    ("domains-not-a-list", ONE_DOMAIN, ["domains=5"], "domains: must be a list of domains, got int 5"),
    ("probes-not-a-list", ONE_DOMAIN, ["probes=3"], "probes: must be a list of domains, got int 3"),
    (
        "home-of-no-user",
        ONE_DOMAIN,
        ["model.path=~nosuchuser/m"],
        "model.path ~nosuchuser/m: ~nosuchuser names no user's home directory here",
    ),
]


@pytest.mark.parametrize("text,overrides,fragment", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_refused_before_anything_runs(tmp_path, text, overrides, fragment):
    code, output = run_cli(tmp_path, text, overrides)
    assert code == EXIT_BAD_INPUT
    assert len(output.strip().splitlines()) == 1, output
    assert_one_line_error(output, fragment)
    assert not (tmp_path / "out").exists()


def _jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path.name


def _local(path, **fields):
    """The tiny lineage with its one domain read from a local file."""
    return tiny({"name": "one", "data": {"kind": "local", "path": path}, "eval_size": 4, **fields})


def _model_dir(path: Path, config: dict) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


def _data_case(tmp_path, kind):
    if kind == "missing-file":
        return _local("nope.jsonl"), [], "domains.0.data.path: "
    if kind == "empty-file":
        (tmp_path / "empty.jsonl").write_text("")
        return _local("empty.jsonl"), [], "domain one: data file"
    if kind == "missing-columns":
        name = _jsonl(tmp_path / "q.jsonl", [{"question": "a", "solution": "b"}] * 20)
        return (
            _local(name, prompt_field="question", answer_field="answer"),
            [],
            "column(s) answer not in the data (columns: question, solution)",
        )
    if kind == "missing-split":
        repo = tmp_path / "hub"
        repo.mkdir()
        _jsonl(repo / "train.jsonl", [{"prompt": "a=", "answer": "a"}] * 20)
        text = tiny({"name": "one", "data": {"kind": "hub", "id": str(repo), "split": "validation"}, "eval_size": 4})
        return text, [], "domain one: cannot load dataset"
    if kind == "overlong-error":
        name = _jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * 40 + "=", "answer": "y" * 10}] * 20)
        return (
            _local(name),
            ["training.overlong=error"],
            "domain one: training example 0 is 53 tokens, over training.max_length=32",
        )
    if kind == "no-matching-targets":
        return ONE_DOMAIN, ["lora.target_modules=[qkv]"], "lora.target_modules ['qkv'] match no module"
    if kind == "model-path-missing":
        return ONE_DOMAIN, [f"model.path={tmp_path / 'no-such-model'}"], "no-such-model: no such directory"
    if kind == "model-path-without-config":
        (tmp_path / "not-a-model").mkdir()
        return ONE_DOMAIN, [f"model.path={tmp_path / 'not-a-model'}"], "not-a-model: holds no config.json"
    if kind == "model-not-a-causal-lm":
        vit = _model_dir(tmp_path / "vit", {"model_type": "vit"})
        return ONE_DOMAIN, [f"model.path={vit}"], "its config.json describes a 'vit' model, which is not a causal"
    if kind == "model-config-unbuildable":
        sizes = {"hidden_size": -4, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8}
        bad = _model_dir(tmp_path / "bad", {"model_type": "llama", "vocab_size": 10, **sizes})
        return ONE_DOMAIN, [f"model.path={bad}"], "its config.json cannot build a model: "
    if kind == "model-sha256-mismatch":  # the base is not the one the config names
        base = _local_base(tmp_path / "base")
        return ONE_DOMAIN, [f"model.path={base}", f"model.sha256={'f' * 64}"], f"not the configured {'f' * 64}"
    raise AssertionError(kind)


DATA_CASES = [
    "missing-file",
    "empty-file",
    "missing-columns",
    "missing-split",
    "overlong-error",
    "no-matching-targets",
    "model-path-missing",
    "model-path-without-config",
    "model-not-a-causal-lm",
    "model-config-unbuildable",
    "model-sha256-mismatch",
]


def test_a_config_that_is_not_utf8_text_is_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(ONE_DOMAIN.encode() + b"# \xff\n")
    code, output = run_lalora(["run", str(cfg), "--out", str(tmp_path / "out")], tmp_path)
    assert code == EXIT_BAD_INPUT, output[-3000:]
    assert_one_line_error(output, f"{cfg}: not UTF-8 text (byte 0xff at offset {len(ONE_DOMAIN) + 2})")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["run", "{cfg}", "--out", "{out}"],
        ["sweep", "{cfg}", "--lambda", "0", "--curvature", "diag", "--out", "{out}"],
        ["base", "{cfg}", "--out", "{out}"],
        ["schema", "--out", "{out}/s.json"],
    ],
    ids=["run", "sweep", "base", "schema"],
)
def test_an_out_under_a_file_is_refused_before_any_work(tmp_path, command):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(ONE_DOMAIN)
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    args = [a.format(cfg=cfg, out=keep / "out") for a in command]
    code, output = run_lalora(args, tmp_path)
    assert code == EXIT_BAD_INPUT, output[-3000:]
    assert_one_line_error(output, f"{keep} is a file, so nothing can be made under it")
    assert keep.read_text() == "mine"


@pytest.mark.parametrize("kind", DATA_CASES)
def test_bad_data_or_model_fails_in_one_line_and_registers_nothing(tmp_path, kind):
    text, overrides, fragment = _data_case(tmp_path, kind)
    code, output = run_cli(tmp_path, text, overrides)
    assert code == EXIT_BAD_INPUT, output[-3000:]
    assert_one_line_error(output, fragment)
    assert_nothing_registered(tmp_path)


def test_a_dataset_on_an_unreachable_hub_fails_in_one_line_and_registers_nothing(tmp_path):
    """The hub refuses connections (HF_ENDPOINT on a closed loopback port): after the hub client's own retries
    (which it reports as it goes), one line naming the dataset."""
    from pipelines.runtime.distributed import free_port

    hub = {"name": "one", "data": {"kind": "hub", "id": "no-such-owner/no-such-dataset", "split": "test"}}
    endpoint = f"http://127.0.0.1:{free_port()}"
    code, output = run_cli(
        tmp_path, tiny({**hub, "eval_size": 4}), HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0"
    )
    assert code == EXIT_BAD_INPUT, output[-3000:]
    assert_one_line_error(output, "domain one: cannot load dataset 'no-such-owner/no-such-dataset' split 'test'")
    assert "Couldn't reach 'no-such-owner/no-such-dataset' on the Hub" in output.strip().splitlines()[-1]
    assert_nothing_registered(tmp_path)


@pytest.mark.parametrize(
    "kind",
    ["missing-file", "no-matching-targets", "model-path-missing", "model-path-without-config", "model-sha256-mismatch"],
)
def test_validate_refuses_what_is_known_without_training(tmp_path, kind):
    """Each in one line, exit 2, without loading weights or data (a hub model is not needed either)."""
    import time

    text, overrides, fragment = _data_case(tmp_path, kind)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    t0 = time.perf_counter()
    code, output = run_lalora(["validate", str(cfg), *[a for o in overrides for a in ("--set", o)]], tmp_path)
    assert code == EXIT_BAD_INPUT, output
    assert "Traceback" not in output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{cfg}: ") and fragment in lines[0], lines
    assert time.perf_counter() - t0 < 30  # imports only: it loads no weights and trains nothing


def test_validate_is_quick_on_the_demo_config(tmp_path):
    import time

    t0 = time.perf_counter()
    code, output = run_lalora(["validate", "configs/demo.yaml"], tmp_path)
    assert code == 0 and output.startswith("configs/demo.yaml: OK (3 stages"), output
    assert "configs/demo.yaml: parameters per rank: base 0.53 MiB, LoRA 0.090 MiB whole on every rank (ZeRO-0" in output
    assert time.perf_counter() - t0 < 30


def test_validate_takes_zero3_and_counts_the_partitioned_base_per_rank(tmp_path):
    zero3 = ["validate", "configs/demo.yaml", "--set", "deepspeed.zero_stage=3", "--set", "deepspeed.world_size=2"]
    code, output = run_lalora([*zero3, "--set", "deepspeed.persistence_threshold=0"], tmp_path)
    assert code == 0 and output.startswith("configs/demo.yaml: OK (3 stages"), output
    assert (
        "parameters per rank: base 0.26 MiB (ZeRO-3 over 2 ranks: 0.53 MiB whole), LoRA 0.090 MiB whole on every "
        "rank (ZeRO-3, float32)"
    ) in output, output
    # DeepSpeed's default threshold (100,000 elements) keeps every matrix of the demo's base whole, as plain ZeRO-3
    code, output = run_lalora(zero3, tmp_path)
    assert code == 0 and "parameters per rank: base 0.53 MiB (ZeRO-3 over 2 ranks: 0.53 MiB whole)" in output, output


def test_validate_states_a_lambda_auto_budget_in_validation_rows(tmp_path):
    code, output = run_lalora(
        ["validate", "configs/demo-auto.yaml", "--set", "lalora.auto.max_forgetting=0.01"], tmp_path
    )
    assert code == 0 and output.startswith("configs/demo-auto.yaml: OK"), output
    assert (
        "configs/demo-auto.yaml: lambda auto: the forgetting budget 0.01 in validation rows: source 1 of 100, "
        "next-aj 1 of 100, increment-digits 1 of 100, rotate-kt 1 of 100; one row is over half the budget"
    ) in output, output


def test_overlong_sequences_are_truncated_by_default(tmp_path):
    from pipelines.data.sources import DataError
    from pipelines.data.tokens import encode
    from pipelines.runtime.models import char_tokenizer

    tok = char_tokenizer()
    rows = [{"prompt": "x" * 40 + "=", "answer": "yy"}]
    assert len(encode(tok, rows, 32)[0].input_ids) == 32
    with pytest.raises(DataError, match=r"example 0 is 45 tokens, over training.max_length=32"):
        encode(tok, rows, 32, "error")


def _local_base(path: Path, *, eos: bool = True, nan: bool = False) -> str:
    from pipelines.config import TinyModelConfig
    from pipelines.runtime.models import build_tiny_llama, char_tokenizer

    tok = char_tokenizer()
    model = build_tiny_llama(
        TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_positions=32), tok, 0
    )
    if nan:
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    if not eos:
        tok.eos_token = None
        tok.pad_token = None
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_tokenizer_without_pad_or_eos(tmp_path):
    """No pad token: padding falls back to EOS (always masked), which the default tiny runs already do;
    no EOS either: answers could never end, so the run stops in one line."""
    from pipelines.data.tokens import special_ids
    from pipelines.runtime.models import char_tokenizer

    tok = char_tokenizer()
    tok.pad_token = None
    assert special_ids(tok)[2] == tok.eos_token_id
    base = _local_base(tmp_path / "base", eos=False)
    code, output = run_cli(tmp_path, ONE_DOMAIN, [f"model.path={base}"])
    assert code == EXIT_BAD_INPUT
    assert_one_line_error(output, "the tokenizer has no EOS token")
    assert_nothing_registered(tmp_path)


def test_nan_in_the_precision_stops_the_stage(tmp_path):
    base = _local_base(tmp_path / "base", nan=True)
    code, output = run_cli(tmp_path, ONE_DOMAIN, [f"model.path={base}"])
    assert code == EXIT_DIVERGED
    assert_one_line_error(output, "non-finite value(s) (NaN or inf); the curvature diverged")
    assert_nothing_registered(tmp_path)
    assert not (tmp_path / "out" / "stages" / "01-one" / "precision" / "precision.json").exists()


def test_divergence_registers_nothing_and_moves_no_alias(tmp_path):
    code, output = run_cli(tmp_path, ONE_DOMAIN)
    assert code == 0, output[-3000:]
    uri = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    before = [str(v.version) for v in client.search_model_versions("name = 'tiny-adapter'")]
    assert before == ["1"]
    nan_base = _local_base(tmp_path / "nan-base", nan=True)
    # A changed stage 1 must be a fork of the lineage (the resume logic refuses it otherwise);
    # the fork's diverging stage registers nothing, and the original lineage is untouched.
    for i, (overrides, fragment) in enumerate(
        (
            (["lalora.lambda=1e300"], "non-finite penalty at step 0"),
            ([f"model.path={nan_base}", "lalora.lambda=0"], "non-finite loss at step 0"),
        )
    ):
        code, output = run_cli(tmp_path, ONE_DOMAIN, overrides, extra=["--fork", f"diverged-{i}"])
        assert code == EXIT_DIVERGED, output[-3000:]
        assert_one_line_error(output, fragment)
        assert [str(v.version) for v in client.search_model_versions("name = 'tiny-adapter'")] == before
        assert str(client.get_model_version_by_alias("tiny-adapter", "newest").version) == "1"
        assert client.search_model_versions(f"name = 'diverged-{i}'") == []


def test_a_damaged_recorded_precision_is_refused_naming_the_version(tmp_path):
    """Appending a domain from another machine fetches the recorded precision; when its file no longer
    matches its checksum, the run refuses in one line naming the version and its runs:/ URI (not the
    local cache copy), and nothing is registered or overwritten."""
    code, output = run_cli(tmp_path, ONE_DOMAIN)
    assert code == 0, output[-3000:]
    uri = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    (version,) = client.search_model_versions("name = 'tiny-adapter'")
    precision_uri = VersionRecord.from_tags(version.tags).precision_uri
    run_id = precision_uri.removeprefix("runs:/").split("/")[0]
    artifacts = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    stored = artifacts / "curvature" / "precision.safetensors"
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))
    appended = tiny("one", "two")
    code, output = run_cli(tmp_path, appended, [f"tracking.mlflow_uri={uri}"], out="elsewhere")
    assert code == EXIT_BAD_INPUT, output[-3000:]
    assert_one_line_error(
        output,
        f"version 1 of tiny-adapter (stage 1, one): curvature checkpoint {precision_uri}/"
        "precision.safetensors fails its checksum",
    )
    assert "elsewhere/registry" not in output and "delete version 1 so stage 1 runs again" in output
    assert [str(v.version) for v in client.search_model_versions("name = 'tiny-adapter'")] == ["1"]
    assert bytes(data) == stored.read_bytes()  # the record is left as it is


def test_a_bug_in_the_project_exits_1_with_its_traceback(tmp_path):
    """A ValueError raised inside a stage is not the user's mistake: exit 1, the traceback, no 'lalora: error:'."""
    hook = tmp_path / "inject"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import pipelines.stages.finetune as f\n"
        "def broken(*args, **kwargs):\n"
        "    raise ValueError('injected bug')\n"
        "f.finetune = broken\n"
    )
    from tests.conftest import ROOT

    code, output = run_cli(tmp_path, ONE_DOMAIN, PYTHONPATH=f"{hook}:{ROOT}")
    assert code == EXIT_BUG, output[-3000:]
    assert "Traceback (most recent call last)" in output and "ValueError: injected bug" in output
    assert "lalora: error:" not in output
    assert output.count("Traceback (most recent call last)") == 1  # reported once, not once per Prefect handler
    assert "lalora: internal error: ValueError: injected bug" in output
    assert_nothing_registered(tmp_path)
