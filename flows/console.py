"""What a terminal shows of a command: the directories its tools need made first, the libraries
quieted, and every failure reported exactly once.

Bad input (``pipelines.errors.BadInput``, a damaged curvature checkpoint) is one line and exit
code 2; a diverged run exit code 3; a held lineage lock exit code 4; anything else is a bug in
the project: its traceback and exit code 1. Prefect logs each failed task and flow run with a
traceback through its own console handler; those copies are kept off the terminal (the Prefect
API and UI keep theirs), because the command reports the failure itself.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_BUG = 1
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_LOCKED = 4
EXIT_INTERRUPTED = 130

_TOOL_DIRS = ("PREFECT_HOME", "TORCH_EXTENSIONS_DIR")
"""Directories the environment points a tool at; each tool creates only the last level itself."""


def fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"lalora: error: {message}", file=sys.stderr)
    return code


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def prepare_environment() -> None:
    """Defaults for a local run (anything already set wins), and every tool directory created."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "lalora" / "torch_extensions"))
    for var in _TOOL_DIRS:
        if os.environ.get(var):
            Path(os.environ[var]).expanduser().mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipelines").setLevel(logging.INFO)
    logging.getLogger("flows.auto_lambda").setLevel(logging.INFO)  # each trial of a lambda search, as it ends
    for noisy in ("DeepSpeed", "deepspeed", "mlflow", "alembic", "httpx", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="deepspeed")


_RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


class _ReportedByCommand(logging.Filter):
    """Drops Prefect's console copy of a failed run (an error of a task or flow run logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.name in _RUN_LOGGERS)


def keep_run_failures_off_the_console() -> None:
    """Attach the filter to every console handler Prefect's logging set up (not its API handlers)."""
    import prefect  # noqa: F401  (configures Prefect's logging)
    from prefect.logging.handlers import APILogHandler

    loggers = [logging.getLogger(), logging.getLogger("prefect"), *map(logging.getLogger, _RUN_LOGGERS)]
    for handler in {h for lg in loggers for h in lg.handlers}:
        if not isinstance(handler, APILogHandler) and not any(
            isinstance(f, _ReportedByCommand) for f in handler.filters
        ):
            handler.addFilter(_ReportedByCommand())


def start_local_api(attempts: int = 5) -> Any | None:
    """Where no Prefect server is named (PREFECT_API_URL), start this process's ephemeral one on a port the OS
    hands out, and make sure the server that answers is this process's own before any flow uses it.

    Prefect's own start picks a random port of 8000-8999 and takes the first answer to its health check as its
    server's: two runs starting together on one host can pick the same port, and then the one whose server
    failed to bind runs its whole lineage against the other's API, and crashes when that run ends and takes its
    server with it. The server started here is the one Prefect's clients in this process use (its port-keyed
    singleton's default entry, as prefect_test_harness registers its own). None where a server is named."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    import psutil
    from prefect.server.api.server import SubprocessASGIServer

    from pipelines.runtime.distributed import free_port

    for _ in range(attempts):
        server = SubprocessASGIServer(port=free_port())
        server.start()
        process = server.server_process
        if server.port is not None and process is not None and _listens(process.pid, server.port, psutil):
            SubprocessASGIServer._instances[None] = server
            return server
        server.stop()  # another process's server answered on that port: ours never bound it
    raise RuntimeError(f"no ephemeral Prefect server of this process answered after {attempts} ports")


def _listens(pid: int, port: int, psutil: Any) -> bool:
    """Whether process ``pid`` (or a child of it) listens on 127.0.0.1:``port``."""
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        return any(
            c.status == psutil.CONN_LISTEN and c.laddr.port == port
            for p in procs
            for c in p.net_connections(kind="tcp")
        )
    except psutil.Error:
        return False


def bad_input_types() -> tuple[type[BaseException], ...]:
    from lalora.checkpoint import CheckpointError
    from pipelines.errors import BadInput

    return BadInput, CheckpointError


def report(command: Callable[[], int]) -> int:
    """Run ``command`` and turn what escapes it into its one report and exit code."""
    from flows.lock import LockHeld
    from lalora.checkpoint import NonFinitePrecision
    from pipelines.errors import DivergenceError

    try:
        return command()
    except LockHeld as e:
        return fail(str(e), EXIT_LOCKED)
    except (DivergenceError, NonFinitePrecision) as e:
        return fail(str(e), EXIT_DIVERGED)
    except bad_input_types() as e:
        return fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    except KeyboardInterrupt:
        print("lalora: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        traceback.print_exc()
        print(
            f"lalora: internal error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            "\nThis is a bug in lalora, not a problem with your input: please report it with the traceback above.",
            file=sys.stderr,
        )
        return EXIT_BUG
