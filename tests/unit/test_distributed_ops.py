"""compress.distributed's collectives on 2 gloo processes (torch.multiprocessing.spawn, one thread each): sums in one
process's batch order bit for bit (on contributions whose float32 sum depends on the order), the block engine's
data-parallel input statistics equal to one process's bit for bit, and an error raised on one rank raised on all."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from compress.errors import CompressError

WORLD = 2
N_BATCHES = 5  # uneven: rank 0 runs batches 0, 2, 4 and rank 1 batches 1, 3


def _contribution(b: int) -> torch.Tensor:
    """Batch b's (64,) float32 contribution: magnitudes from 1e-4 to 1e4, so the sum's rounding depends on the order."""
    g = torch.Generator().manual_seed(b)
    return torch.randn(64, generator=g) * 10.0 ** torch.randint(-4, 5, (64,), generator=g)


def _in_order(parts: list[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros_like(parts[0])
    for p in parts:
        total += p
    return total


def _stats(data_parallel: bool) -> dict[str, tuple]:
    """Every linear's input statistics in a seeded 2-block model over 9 windows in batches of 2 (5 batches)."""
    from transformers import AutoModelForCausalLM

    from calibration.capture import for_each_block
    from compress.models import llama
    from tests.tiny import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=2)).eval()
    ids = torch.randint(0, 300, (9, 24), generator=torch.Generator().manual_seed(1))
    found: dict[str, tuple] = {}

    def watch(i, block):
        return {f"{i}.{n}": m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}

    def visit(i, _block, _inputs, _outputs, stats):
        found.update({name: (s.n, s.total, s.total_sq, s.xtx) for name, s in stats.items()})

    for_each_block(model, llama.blocks(model), ids, visit, watch, batch_size=2, want_xtx=True,
                   data_parallel=data_parallel)
    return found


def _rank(rank: int, port: int, folder: str) -> None:
    from compress import distributed

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with distributed.session():
        assert distributed.world_size() == WORLD and distributed.rank() == rank
        mine = [_contribution(b) for b in distributed.share(N_BATCHES)]
        summed = distributed.sum_in_batch_order(mine, N_BATCHES, torch.zeros(64), "test sum")
        parallel = _stats(data_parallel=True)
        alone = _stats(data_parallel=False) if rank == 0 else {}  # one process's path, nothing shared

        def solve(k: int) -> tuple[int, int]:
            if k == 3:
                raise CompressError(f"item 3 cannot be solved (on rank {distributed.rank()})")
            return k * k, distributed.rank()

        solved = distributed.spread(range(3), solve, "test spread")
        try:
            distributed.spread(range(5), solve, "test spread")
            failed = ""
        except CompressError as err:
            failed = str(err)
        on_main = distributed.on_main(lambda: distributed.rank() + 41, "test on_main")
        torch.save({"summed": summed, "parallel": parallel, "alone": alone, "solved": solved, "failed": failed,
                    "on_main": on_main}, f"{folder}/rank{rank}.pt")
    assert not dist.is_initialized()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import socket

    folder = tmp_path_factory.mktemp("ranks")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_sum_in_batch_order_is_one_process_sum_bit_for_bit(ranks):
    parts = [_contribution(b) for b in range(N_BATCHES)]
    want = _in_order(parts)
    assert not torch.equal(_in_order(parts[::-1]), want)  # the order matters for these numbers
    assert not torch.equal(_in_order(parts[0::2] + parts[1::2]), want)  # so would summing per rank first
    for r in range(WORLD):
        assert torch.equal(ranks[r]["summed"], want)


def test_data_parallel_stats_equal_one_process_bit_for_bit(ranks):
    alone = ranks[0]["alone"]
    assert len(alone) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 blocks
    for r in range(WORLD):
        parallel = ranks[r]["parallel"]
        assert parallel.keys() == alone.keys()
        for name, (n, total, total_sq, xtx) in alone.items():
            assert n == 9 * 24
            got = parallel[name]
            assert got[0] == n, name
            for want_t, got_t in zip((total, total_sq, xtx), got[1:], strict=True):
                assert got_t.dtype == want_t.dtype and torch.equal(got_t, want_t), name


def test_spread_and_on_main_give_every_rank_the_results_and_the_errors(ranks):
    for r in range(WORLD):
        assert ranks[r]["solved"] == [(0, 0), (1, 1), (4, 0)]  # item k solved on rank k % 2, received by all
        assert ranks[r]["failed"] == "item 3 cannot be solved (on rank 1)"
        assert ranks[r]["on_main"] == 41
