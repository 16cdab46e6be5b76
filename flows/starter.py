"""``lalora init DIR``: the demo's config (``configs/demo.yaml``, comments and all) and its base model
(``configs/demo-base``, which the config names as ``model.path: demo-base``) as a starting point, with the
config's JSON Schema beside it (``lalora.schema.json``, which the config's first line names for editors).

Both ship inside the package as ``flows/demo.yaml`` and ``flows/demo-base``: links to the checkout's files (one
source of truth), which the wheel build copies, so an installed ``lalora`` has them without a checkout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pipelines.errors import BadInput

PACKAGED_DEMO = "demo.yaml"
PACKAGED_BASE = "demo-base"
STARTER_NAME = "lalora.yaml"
SCHEMA_NAME = "lalora.schema.json"


def demo_config_text() -> str:
    """The demo config as the installed package holds it."""
    return resources.files("flows").joinpath(PACKAGED_DEMO).read_text()


def starter_text(config: Path, out: Path) -> str:
    """The demo config whose opening comment (the command that runs it) names ``config`` and ``out``, not the
    checkout's ``configs/demo.yaml`` and ``make demo``, and whose schema line names the schema written beside
    it; every other line as shipped."""
    lines = demo_config_text().splitlines(keepends=True)
    header = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    for i in range(header):
        line = re.sub(r"(# yaml-language-server: \$schema=)\S+", rf"\g<1>{SCHEMA_NAME}", lines[i])
        line = re.sub(r"\s+\(or: make demo\)", "", line)
        lines[i] = line.replace("configs/demo.yaml", str(config)).replace("--out runs/", f"--out {out}/")
    return "".join(lines)


@dataclass(frozen=True)
class Starter:
    config: Path
    out: Path

    def commands(self) -> list[str]:
        return [f"lalora validate {self.config}", f"lalora run {self.config} --out {self.out / 'demo'}"]


def write_starter(directory: Path, force: bool = False) -> Starter:
    """``directory/lalora.yaml``, its schema and ``directory/demo-base`` (the directory created); BadInput if any of
    them exists and ``force`` is not given."""
    starter = Starter(directory / STARTER_NAME, directory / "runs")
    if directory.exists() and not directory.is_dir():
        raise BadInput(f"{directory}: exists and is not a directory")
    present = [p for p in (starter.config, directory / SCHEMA_NAME, directory / PACKAGED_BASE) if p.exists()]
    if present and not force:
        raise BadInput(f"{present[0]} already exists (pass --force to overwrite the starter's files)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        starter.config.write_text(starter_text(starter.config, starter.out))
        from pipelines.config import config_schema

        (directory / SCHEMA_NAME).write_text(config_schema())
        base = directory / PACKAGED_BASE
        base.mkdir(exist_ok=True)
        for item in resources.files("flows").joinpath(PACKAGED_BASE).iterdir():
            (base / item.name).write_bytes(item.read_bytes())
    except OSError as e:
        raise BadInput(f"{directory}: cannot write the starter into it ({e.strerror or e})") from None
    return starter
