"""Small datasets in the hub's layout and in each preset's schema, written for the tests (not copied)."""

from __future__ import annotations

from pathlib import Path


def hub_dir(root: Path, name: str, configs: dict[str, dict[str, list[dict]]]) -> Path:
    """A dataset repository laid out like the hub's: parquet per config and split, configs in README.md.

    ``datasets.load_dataset(str(path), config, split=split)`` reads it exactly as it reads a hub id.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = root / name
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            (repo / config).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), repo / config / f"{split}-00000-of-00001.parquet")
            lines += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    (repo / "README.md").write_text("\n".join([*lines, "---", ""]))
    return repo
