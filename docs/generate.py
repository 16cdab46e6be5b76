"""Writes the docs' generated reference pages: docs/reference/config.md from the config's models, and
docs/reference/cli.md from the ``lalora`` parser (pipelines.config.reference makes both). ``make docs`` runs it
before ``mkdocs build``; tests/docs/test_reference.py fails when a committed page differs from what it writes.

    python docs/generate.py            # write both pages
    python docs/generate.py --check    # exit 1 if either differs from the models or the parser
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the checkout's packages

from flows.cli import _parser  # noqa: E402
from pipelines.config.reference import cli_reference, config_reference  # noqa: E402

PAGES = {"reference/config.md": config_reference, "reference/cli.md": lambda: cli_reference(_parser())}


def main() -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--check", action="store_true", help="only compare: exit 1 if a page differs")
    check = args.parse_args().check
    stale = []
    for name, make in PAGES.items():
        path = ROOT / "docs" / name
        text = make()
        if path.exists() and path.read_text() == text:
            continue
        stale.append(name)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    verb = "differs from its source" if check else "written"
    for name in stale:
        print(f"docs/{name}: {verb}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
