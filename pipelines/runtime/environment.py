"""What can change a run's numbers besides its config, recorded with every run (metrics.json and the MLflow
lineage run): the versions of the numeric libraries, torch's CPU kernel path (``ATEN_CPU_CAPABILITY``: AVX-512
and AVX2 kernels round differently, and a tiny base's pretraining amplifies it), the thread count, the device
and the dtype. Two runs that differ can then be explained from their records."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("torch", "transformers", "peft", "deepspeed")


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def numerics(dtype: str) -> dict[str, str]:
    """This process's numeric environment, as strings (MLflow params); call it where the run's threads are set."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    return {
        **{p: _version(p) for p in PACKAGES},
        "python": platform.python_version(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": str(torch.get_num_threads()),
        "device": device,
        "dtype": dtype,
    }
