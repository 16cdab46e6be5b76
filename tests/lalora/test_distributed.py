"""Under torch.distributed the per-rank sums are all-reduced: two ranks equal one process."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from lalora import build_estimator
from tests.conftest import padded_batch, tiny_lora_model


def _rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = tiny_lora_model(seed=2)
        batches = [padded_batch(seed=s) for s in (10, 11, 12, 13)][rank::2]  # each rank its own half
        est = build_estimator("diag").estimate(model, batches)
        torch.save({"n": est.n_samples, "state": est.precision.to_state_dict()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_the_single_process_result(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    single = build_estimator("diag").estimate(tiny_lora_model(seed=2), [padded_batch(seed=s) for s in (10, 11, 12, 13)])
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["n"] == single.n_samples == 16
        for name, value in single.precision.to_state_dict().items():
            assert_close(got["state"][name], value, rtol=1e-5, atol=1e-9)
