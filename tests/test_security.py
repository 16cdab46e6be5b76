"""Untrusted artifacts and secrets: no pickle in any load path, servers on 127.0.0.1, secrets never logged
as params, configured names never escape the output directory."""

import re
import socket
from pathlib import Path

import pytest

from pipelines.config import ConfigError, load_config
from pipelines.safety import REDACTED, PathEscape, contained, redact_params
from pipelines.workspace import Workspace

ROOT = Path(__file__).parents[1]
SOURCES = sorted(
    p for d in ("lalora", "pipelines", "flows", "studies", "benchmarks", "tests") for p in (ROOT / d).rglob("*.py")
)


def _calls(text: str, name: str) -> list[str]:
    """Each ``name(...)`` call's text up to its closing parenthesis (nested ones followed)."""
    out = []
    for m in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.start() : i])
    return out


def test_no_pickle_in_any_load_path():
    assert len(SOURCES) > 40
    bad = []
    for path in SOURCES:
        if path == Path(__file__):
            continue
        text = path.read_text()
        rel = path.relative_to(ROOT)
        if re.search(r"^\s*(import|from)\s+(pickle|cPickle|dill|cloudpickle|joblib|shelve)\b", text, re.M):
            bad.append(f"{rel}: imports a pickle module")
        for call in _calls(text, "torch.load"):
            if "weights_only=True" not in call:
                bad.append(f"{rel}: {call} without weights_only=True")
        bad += [f"{rel}: {c}" for c in _calls(text, "np.load") + _calls(text, "numpy.load") if "allow_pickle=True" in c]
        bad += [f"{rel}: read_pickle" for _ in re.finditer(r"read_pickle\(", text)]
        if re.search(r"weights_only\s*=\s*False|use_safetensors\s*=\s*False|safe_serialization\s*=\s*False", text):
            bad.append(f"{rel}: opts out of safe loading or saving")
    assert not bad, bad


def test_model_loading_insists_on_safetensors(tmp_path):
    from pipelines.runtime.models import load_adapter

    text = (ROOT / "pipelines" / "runtime" / "models.py").read_text()
    assert "use_safetensors=True" in text
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04pickled")
    with pytest.raises(ValueError, match=r"no adapter_model.safetensors; pickled adapters are not loaded"):
        load_adapter(None, tmp_path)


def test_servers_bind_to_localhost(monkeypatch):
    """Every host a server or rendezvous is given in the code is 127.0.0.1; 0.0.0.0 appears nowhere."""
    hosts = []
    for path in SOURCES:
        if path == Path(__file__):
            continue
        text = path.read_text()
        assert "0.0.0.0" not in text, path
        hosts += re.findall(r"--host(?![\w-])\"?,?\s*\"?([\w.]+)", text)  # --host, not --hostfile
        # MASTER_ADDR's value in a dict, a call or a keyword ("MASTER_ADDR": "h", setdefault("MASTER_ADDR", "h"),
        # MASTER_ADDR="h"); a tuple of variable names ("MASTER_ADDR", "RANK") gives no host
        found = re.findall(r"MASTER_ADDR\"?\s*[:,=]\s*\"([\w.]+)\"", text)
        hosts += [h for h in found if not re.fullmatch(r"[A-Z_]+", h)]
    assert hosts and set(hosts) == {"127.0.0.1"}, hosts
    from pipelines.runtime.distributed import free_port

    bound = []
    real = socket.socket.bind

    def bind(sock, address):
        bound.append(address[0])
        return real(sock, address)

    monkeypatch.setattr(socket.socket, "bind", bind)
    assert free_port() > 0
    assert bound == ["127.0.0.1"]  # the rendezvous port probe binds the loopback interface only


def test_secret_params_are_redacted():
    env = {"MLFLOW_TRACKING_PASSWORD": "hunter2-pw", "HF_TOKEN": "hf_abcdef", "HOME": "/root", "DEBUG": "1"}
    params = {
        "lalora.lambda": 5.0,
        "hf_token": "hf_abcdef",
        "tracking.password": "x",
        "aws.secret_access_key": "k",
        "tracking.api_key": "k2",
        "note": "pw is hunter2-pw",
        "tracking.mlflow_uri": "https://u:pw@host:5000/x",
        "domains.0.name": "math",
        "training.steps": 1,
        "home": "/root",
        "monkey": "banana",
    }
    out = redact_params(params, env)
    for key in ("hf_token", "tracking.password", "aws.secret_access_key", "tracking.api_key"):
        assert out[key] == REDACTED
    assert out["note"] == f"pw is {REDACTED}"
    assert out["tracking.mlflow_uri"] == f"https://u:{REDACTED}@host:5000/x"
    assert {k: out[k] for k in ("lalora.lambda", "domains.0.name", "training.steps", "home", "monkey")} == {
        "lalora.lambda": 5.0,
        "domains.0.name": "math",
        "training.steps": 1,
        "home": "/root",
        "monkey": "banana",
    }
    assert not any(s in str(v) for v in out.values() for s in ("hunter2-pw", "hf_abcdef", ":pw@"))


def test_the_mlflow_tracker_never_stores_a_secret(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from flows.runs import default_tracking_uri, start_run

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-value")
    uri = default_tracking_uri(tmp_path)
    run = start_run(uri, "sec", tmp_path / "art", "r")
    run.tracker().log_params({"model": {"path": "org/m"}, "token": "abc", "extra": {"note": "s3cret-value!"}})
    params = MlflowClient(uri).get_run(run.run_id).data.params
    assert params == {"model.path": "org/m", "token": REDACTED, "extra.note": f"{REDACTED}!"}


def test_config_refuses_a_password_in_the_tracking_uri(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("domains: [{name: d1}]\ntracking: {mlflow_uri: 'https://me:pw@mlflow.example:5000'}\n")
    with pytest.raises(
        ConfigError, match=r"tracking.mlflow_uri: holds a password; secrets come only from the environment"
    ):
        load_config(cfg)


@pytest.mark.parametrize("parts", [("..", "x"), ("stages", "../../etc"), ("/etc/passwd",), ("a/../../b",)])
def test_paths_from_config_values_cannot_leave_the_output_dir(tmp_path, parts):
    with pytest.raises(PathEscape, match="leaves the output directory"):
        contained(tmp_path / "out", *parts)
    assert contained(tmp_path / "out", "stages", "01-a") == (tmp_path / "out" / "stages" / "01-a").resolve()


def test_workspace_and_config_refuse_escaping_names(tmp_path):
    with pytest.raises(PathEscape):
        Workspace(tmp_path).stage(1, "x/../../../etc")
    link = tmp_path / "stages"
    link.symlink_to("/tmp")  # a link inside the output dir does not carry a stage out of it
    with pytest.raises(PathEscape):
        Workspace(tmp_path).stage(1, "a")
    cfg = tmp_path / "c.yaml"
    for field, value in (
        ("domains.0.name", "../up"),
        ("source.name", "/abs"),
        ("tracking.registered_model", "../m"),
        ("tracking.registered_model", "a/b"),
    ):
        cfg.write_text("domains: [{name: d1}]\n")
        with pytest.raises(ConfigError, match=f"{re.escape(field)}: .*is not a valid"):
            load_config(cfg, [f"{field}={value}"])
