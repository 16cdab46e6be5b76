"""A crash at any point of a write leaves the old state or the new one: SIGKILL a real writer at random moments."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from lalora import CheckpointError, DiagPrecision, Prior, load_precision, save_precision
from lalora.checkpoint import META, TENSORS, NonFinitePrecision

ROOT = Path(__file__).parents[2]
KILLS = int(os.environ.get("LALORA_ATOMIC_KILLS", "12"))

# Alternates two versions of a curvature checkpoint, an adapter-like directory and a JSON file, forever.
WRITER = """
import sys, torch
from pathlib import Path
from lalora import DiagPrecision, Prior, save_precision
from pipelines.workspace import write_dir_atomic, write_json_atomic
root = Path(sys.argv[1])
def prec(v):
    return DiagPrecision({f"m{i}.lora_A": torch.full((64, 256), float(v)) for i in range(8)})
def fill(v):
    def write(d):
        d.mkdir()
        for i in range(20):
            (d / f"part{i}").write_text(str(v) * 20000)
    return write
i = 0
print("ready", flush=True)
while True:
    v = i % 2
    save_precision(root / "ckpt", prec(v), fisher_type="empirical", n_samples=v + 1, prior=Prior(1.0, 1.0))
    write_dir_atomic(root / "adapter", fill(v))
    write_json_atomic(root / "m.json", {"v": v, "pad": "x" * 100000})
    i += 1
"""


def _check(root: Path) -> None:
    if (root / "ckpt" / META).exists():
        prec, meta = load_precision(root / "ckpt")  # rolls forward a commit interrupted between the renames
        v = meta.n_samples - 1
        assert_close(prec.values["m0.lora_A"], torch.full((64, 256), float(v)), rtol=0, atol=0)
        assert all(float(t.flatten()[0]) == v for t in prec.values.values())
    if (root / "adapter").exists():
        contents = {(root / "adapter" / f"part{i}").read_text() for i in range(20)}
        assert contents in ({"0" * 20000}, {"1" * 20000})
    if (root / "m.json").exists():
        assert json.loads((root / "m.json").read_text())["v"] in (0, 1)


def test_sigkill_at_random_points_never_leaves_a_half_written_artifact(tmp_path):
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(KILLS):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 1.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _check(tmp_path)
    assert (tmp_path / "ckpt" / META).exists(), "the writer never finished a checkpoint: raise the sleep"


def test_commit_interrupted_between_the_renames_rolls_forward(tmp_path):
    save_precision(
        tmp_path,
        DiagPrecision({"m.lora_A": torch.zeros(2, 3)}),
        fisher_type="empirical",
        n_samples=1,
        prior=Prior(1.0, 1.0),
    )
    old = (tmp_path / TENSORS).read_bytes()
    save_precision(
        tmp_path,
        DiagPrecision({"m.lora_A": torch.ones(2, 3)}),
        fisher_type="empirical",
        n_samples=2,
        prior=Prior(1.0, 1.0),
    )
    # the state a crash after the JSON's rename leaves: new JSON, old tensors, new tensors pending
    os.replace(tmp_path / TENSORS, tmp_path / f".{TENSORS}.tmp-999")
    (tmp_path / TENSORS).write_bytes(old)
    prec, meta = load_precision(tmp_path)
    assert meta.n_samples == 2 and float(prec.values["m.lora_A"].sum()) == 6.0
    assert not list(tmp_path.glob(".*tmp*"))


def test_pending_file_that_does_not_match_is_not_used(tmp_path):
    save_precision(
        tmp_path,
        DiagPrecision({"m.lora_A": torch.ones(2, 3)}),
        fisher_type="empirical",
        n_samples=2,
        prior=Prior(1.0, 1.0),
    )
    (tmp_path / f".{TENSORS}.tmp-1").write_bytes((tmp_path / TENSORS).read_bytes()[:-4] + b"\x00\x00\x80\x7f")
    data = bytearray((tmp_path / TENSORS).read_bytes())
    data[-1] ^= 0x01
    (tmp_path / TENSORS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_precision(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_precision_is_never_saved_or_loaded(tmp_path, bad):
    values = torch.ones(2, 3)
    values[1, 2] = bad
    with pytest.raises(NonFinitePrecision, match=r"m.lora_A has 1 non-finite value"):
        save_precision(
            tmp_path / "new",
            DiagPrecision({"m.lora_A": values}),
            fisher_type="empirical",
            n_samples=1,
            prior=Prior(1.0, 1.0),
        )
    assert not (tmp_path / "new" / META).exists() and not list((tmp_path / "new").glob("*"))
    # written by something else (checksum valid): still refused on load
    from safetensors.torch import save_file

    from lalora.checkpoint import file_sha256

    save_precision(
        tmp_path,
        DiagPrecision({"m.lora_A": torch.ones(2, 3)}),
        fisher_type="empirical",
        n_samples=1,
        prior=Prior(1.0, 1.0),
    )
    save_file({"m.lora_A": values}, str(tmp_path / TENSORS), metadata={"structure": "diag"})
    meta = json.loads((tmp_path / META).read_text())
    meta["sha256"] = file_sha256(tmp_path / TENSORS)
    (tmp_path / META).write_text(json.dumps(meta))
    with pytest.raises(NonFinitePrecision, match="non-finite"):
        load_precision(tmp_path)
