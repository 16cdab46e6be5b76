"""Under torch.distributed the per-rank sums are all-reduced: two ranks equal one process."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from lalora import build_estimator
from tests.conftest import padded_batch, tiny_lora_model, wide_lora_model

BATCHES = (10, 11, 12, 13)


def _estimate(kind, batches):
    """diag on the tiny model; kfac on the wide one, whose sums keep their rows in one process (at most 68 rows; n 144
    and 320; q and v share one) and are folded into the dense sums before the ranks' all-reduce."""
    if kind == "diag":
        return build_estimator("diag").estimate(tiny_lora_model(seed=2), batches)
    return build_estimator("kfac", top_k=8).estimate(wide_lora_model(seed=2), batches)


def _dense(prec):
    """Every block's factors as dense matrices (a compressed factor's eigenvectors are known up to sign)."""
    if not hasattr(prec, "blocks"):
        return prec.to_state_dict()
    return {f"{n}.{side}": getattr(t, side).to_dense() for n, (t,) in prec.blocks.items() for side in ("s", "g")}


def _rank(rank: int, port: int, out_dir: str, kind: str, seeds: tuple[int, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        est = _estimate(kind, [padded_batch(seed=s) for s in seeds][rank::2])  # each rank its own half
        torch.save({"n": est.n_samples, "state": _dense(est.precision)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "kind, seeds",
    [("diag", BATCHES), ("kfac", BATCHES), pytest.param("kfac", BATCHES[:1], id="kfac-a-rank-without-batches")],
)
def test_two_gloo_ranks_equal_the_single_process_result(tmp_path, kind, seeds):
    """With one batch, rank 1 runs none (fewer batches than ranks): it holds no sums and joins the all-reduce with
    zeros for every sum rank 0 has, shared ones alike."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path), kind, seeds), nprocs=2, join=True)
    single = _estimate(kind, [padded_batch(seed=s) for s in seeds])
    want = _dense(single.precision)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["n"] == single.n_samples == 4 * len(seeds)
        assert got["state"].keys() == want.keys()
        for name, value in want.items():
            assert_close(got["state"][name], value, rtol=1e-4, atol=1e-6 * float(value.abs().max()))
