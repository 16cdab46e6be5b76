"""What ``lalora env`` prints for a bug report: this package's version, Python, the platform, the
libraries a run depends on, and what torch sees of the machine (as ``transformers env`` does)."""

from __future__ import annotations

import platform
import sys

from flows import DISTRIBUTION, version

LIBRARIES = ("torch", "transformers", "peft", "deepspeed", "prefect", "mlflow", "datasets", "pydantic")
"""The installed distributions a report names, read from their metadata (nothing imported)."""


def installed_version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed(distribution)
    except PackageNotFoundError:
        return "not installed"


def _torch_lines() -> list[tuple[str, str]]:
    """torch's CPU capability and CUDA; the one import of the report (a broken torch is reported, not raised)."""
    try:
        import torch
    except ImportError:
        return [("torch CPU capability", "n/a (torch not installed)"), ("CUDA available", "n/a (torch not installed)")]
    except Exception as e:  # a broken install is what the report is for
        why = f"n/a (import torch failed: {e.__class__.__name__}: {e})"
        return [("torch CPU capability", why), ("CUDA available", why)]
    capability = torch.backends.cpu.get_cpu_capability()
    if not torch.cuda.is_available():
        return [("torch CPU capability", capability), ("CUDA available", "False")]
    n = torch.cuda.device_count()
    names = ", ".join(sorted({torch.cuda.get_device_name(i) for i in range(n)}))
    return [
        ("torch CPU capability", capability),
        ("CUDA available", f"True (CUDA {torch.version.cuda}, {n} device{'s' if n != 1 else ''}: {names})"),
    ]


def environment() -> list[tuple[str, str]]:
    """(name, value) pairs, in the order they are printed."""
    return [
        (DISTRIBUTION, version()),
        ("Python", f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})"),
        ("platform", platform.platform()),
        *((name, installed_version(name)) for name in LIBRARIES),
        *_torch_lines(),
    ]


def environment_lines() -> list[str]:
    """One ``- name: value`` line each: a Markdown list when pasted into an issue."""
    return [f"- {name}: {value}" for name, value in environment()]
