"""The ephemeral Prefect API of a local run is this process's own, even where another server answers on the port
it was about to take (two runs starting together on one host)."""

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT, child_env

pytestmark = pytest.mark.slow  # Prefect servers start: make test, not test-fast

SCRIPT = textwrap.dedent(
    """
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import pipelines.runtime.distributed as distributed
    from flows.console import prepare_environment, start_local_api

    prepare_environment()


    class Other(BaseHTTPRequestHandler):  # another run's server: healthy to every GET, nothing else
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args):
            pass


    other = HTTPServer(("127.0.0.1", 0), Other)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    taken = other.server_address[1]
    real, first = distributed.free_port, [taken]
    distributed.free_port = lambda: first.pop() if first else real()  # the port is taken just after it was chosen
    server = start_local_api()

    from prefect import flow


    @flow
    def one():
        return 1


    print("taken", taken, "ours", server.port, "flow", one())
    """
)


def test_a_run_starts_its_own_prefect_api_where_another_answers_on_its_port(tmp_path):
    env = child_env(PREFECT_HOME=str(tmp_path / "prefect"))
    env.pop("PREFECT_API_URL", None)
    (tmp_path / "prefect").mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    words = proc.stdout.split()
    taken, ours = int(words[words.index("taken") + 1]), int(words[words.index("ours") + 1])
    assert ours != taken and words[-1] == "1", proc.stdout  # the flow ran against this process's own server


def test_a_named_prefect_server_is_left_to_prefect(monkeypatch):
    from flows.console import start_local_api

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert start_local_api() is None
