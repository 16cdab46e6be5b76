"""What `lalora run` prints last names a UI that shows the store in use."""

from pathlib import Path

from flows.cli import ui_hint


def test_a_tracking_server_is_named_by_its_own_url():
    hint = ui_hint("http://127.0.0.1:5055", Path("runs/demo"))
    assert hint == "MLflow UI:  http://127.0.0.1:5055   (the tracking server's own UI)"
    assert "--backend-store-uri" not in hint


def test_the_default_local_store_suggests_lalora_ui(tmp_path):
    uri = f"sqlite:///{(tmp_path / 'out' / 'mlflow.db').resolve()}"
    hint = ui_hint(uri, tmp_path / "out")
    assert hint.startswith(f"MLflow UI:  lalora ui --out {tmp_path / 'out'}") and uri in hint


def test_another_local_store_is_shown_with_mlflow_ui(tmp_path):
    hint = ui_hint("sqlite:////elsewhere/mlflow.db", tmp_path / "out")
    assert hint == "MLflow UI:  mlflow ui --backend-store-uri sqlite:////elsewhere/mlflow.db --host 127.0.0.1"
