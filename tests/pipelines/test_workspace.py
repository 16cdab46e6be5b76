"""pipelines.workspace: the one atomic writer and the one content hash of pipelines/ and flows/."""

import re
from pathlib import Path

import pytest

from pipelines.workspace import move_into_place, sha256_json, write_dir_atomic, write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[2]


def test_a_directory_or_file_moved_into_place_replaces_the_old_one_whole(tmp_path):
    target = tmp_path / "d"
    write_dir_atomic(target, lambda d: (d.mkdir(), (d / "a").write_text("1")))
    new = tmp_path / "new"
    new.mkdir()
    (new / "b").write_text("2")
    move_into_place(new, target)
    assert sorted(p.name for p in target.iterdir()) == ["b"] and not new.exists()
    write_text_atomic(tmp_path / "f.txt", "one")
    write_json_atomic(tmp_path / "f.txt", {"two": 2})
    assert (tmp_path / "f.txt").read_text() == '{\n  "two": 2\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.txt"]  # no temporary left beside them


def test_a_write_that_fails_leaves_the_previous_directory(tmp_path):
    target = tmp_path / "d"
    write_dir_atomic(target, lambda d: (d.mkdir(), (d / "a").write_text("1")))

    def broken(d):
        d.mkdir()
        (d / "half").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_dir_atomic(target, broken)
    assert [p.name for p in target.iterdir()] == ["a"]


def test_equal_mappings_hash_equal_and_the_recorded_data_fingerprints_keep_their_order():
    assert sha256_json({"a": 1, "b": 2}) == sha256_json({"b": 2, "a": 1})
    assert sha256_json([{"b": 2, "a": 1}], sort_keys=False) != sha256_json([{"a": 1, "b": 2}], sort_keys=False)


def test_pipelines_and_flows_write_and_hash_only_through_the_helpers():
    """No os.replace or os.rename and no hashlib outside pipelines/workspace.py (lalora/ keeps its own checkpoint
    commit: it imports nothing of pipelines/)."""
    found = []
    for package in ("pipelines", "flows"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name == "workspace.py" and path.parent.name == "pipelines":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\bos\.(replace|rename)\(|\bimport hashlib\b|\bfrom hashlib\b|\bhashlib\.", line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
