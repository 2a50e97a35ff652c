"""Several processes over torch.distributed (`torchrun --nproc-per-node N compress run ...`): the process group's
setup and teardown, this process's rank, and the few collectives the run needs, each written so that every rank ends
with bit for bit what one process computes. No launcher or transport of our own: torchrun starts the processes and
sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; gloo carries CPU tensors, nccl CUDA ones.

Failures: a collective that fails (a rank died, or did not answer within the group's timeout) becomes a
CompressError naming this rank, so every surviving rank exits 1 with that message instead of hanging; an error
raised by the rank that computes a share (`spread`, `on_main`) is sent to every rank and raised there too."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from compress.errors import CompressError, InputError

T = TypeVar("T")
R = TypeVar("R")

TIMEOUT_ENV = "COMPRESS_DIST_TIMEOUT_S"  # seconds a rank waits for the others in one collective
DEFAULT_TIMEOUT_S = 1800.0  # above the longest step one rank does alone (the dense evaluation, a block's solves)


def active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of processes computing the run, 1 without a process group."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on the rank that writes the artifact, the report and the journal (rank 0; the only one without torchrun)."""
    return rank() == 0


def _timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        raise InputError(f"{TIMEOUT_ENV}={raw!r}: not a number of seconds") from None
    if not value > 0:
        raise InputError(f"{TIMEOUT_ENV}={raw!r}: must be above 0 seconds")
    return value


@contextmanager
def session() -> Iterator[None]:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment) for the duration, and leave it
    after; a no-op in one process, or when the caller already initialized a group (it then stays theirs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        yield
        return
    if not dist.is_available():
        raise InputError(f"WORLD_SIZE={world}: this build of torch has no torch.distributed; run one process")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timedelta(seconds=_timeout_s()))
    except (RuntimeError, ValueError) as err:
        raise CompressError(f"joining the process group (WORLD_SIZE={world}, RANK={os.environ.get('RANK')}) "
                            f"failed: {_first_line(err)}") from None
    try:
        yield
    finally:
        dist.destroy_process_group()


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


@contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn a failed collective into a CompressError that says which rank stopped waiting and how to continue."""
    try:
        yield
    except RuntimeError as err:  # torch.distributed.DistError and gloo's errors are RuntimeErrors
        raise CompressError(
            f"rank {rank()} of {world_size()}: {what} failed: another rank stopped or did not answer within "
            f"{_timeout_s():.0f} s ({_first_line(err)}); the run is stopped and no artifact was written; "
            "continue it with --resume") from None


def _broadcast(value: Any, src: int, what: str) -> Any:
    box = [value]
    with _collective(what):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def _outcome(fn: Callable[[], R]) -> tuple[bool, Any]:
    """(True, result) or (False, the exception fn raised), so that an error can travel to the other ranks."""
    try:
        return True, fn()
    except Exception as err:  # raised again on every rank by _unwrap
        return False, err


def _unwrap(outcome: tuple[bool, Any]) -> Any:
    ok, value = outcome
    if not ok:
        raise value
    return value


def on_main(fn: Callable[[], R], what: str) -> R:
    """fn() computed on rank 0 only (a write, a check of files), its result or its error on every rank."""
    if not active():
        return fn()
    return _unwrap(_broadcast(_outcome(fn) if is_main() else None, 0, what))


def spread(items: Sequence[T], solve: Callable[[T], R], what: str) -> list[R]:
    """[solve(item) for item in items], item k solved on rank k % world_size and sent to every rank (results are
    pickled, tensors included); an error raised by a solve is raised on every rank."""
    if not active():
        return [solve(item) for item in items]
    me, world = rank(), world_size()
    mine = {k: _outcome(functools.partial(solve, item)) for k, item in enumerate(items) if k % world == me}
    return [_unwrap(_broadcast(mine.get(k), k % world, f"{what} (item {k})")) for k in range(len(items))]


class SpreadExecutor:
    """A search's executor (compress.search.executor.Executor) over the ranks: `spread`, so every rank gets every
    candidate's score, each computed by one rank on its own copy of the model; in order, as one process scores them."""

    def __init__(self, what: str) -> None:
        self.what = what

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        return spread(items, fn, self.what)


def share(n_batches: int) -> range:
    """The batch indices this rank runs, of batches 0..n_batches-1: every world_size-th from its rank (round robin,
    so that step j of every rank together covers batches j*world .. j*world + world - 1, in order)."""
    return range(rank(), n_batches, world_size())


def sum_in_batch_order(parts: Sequence[torch.Tensor], n_batches: int, like: torch.Tensor, what: str) -> torch.Tensor:
    """zeros_like(like) + c_0 + c_1 + ... + c_{n_batches-1}, the per-batch contributions added in batch order, where
    this rank holds `parts` = its share's contributions (share(n_batches), in order): the same float additions in
    the same order as one process summing all batches, so the result is bit for bit one process's, on every rank.
    Gathers one contribution per rank at a time, so at most world_size contributions are held beyond `parts`."""
    total = torch.zeros_like(like)
    world = world_size()
    if len(parts) != len(share(n_batches)):
        raise ValueError(f"{what}: {len(parts)} contributions for {len(share(n_batches))} batches of this rank")
    for step in range((n_batches + world - 1) // world):
        local = parts[step] if step < len(parts) else torch.zeros_like(like)  # a rank past the last batch sends 0
        gathered = [torch.empty_like(like) for _ in range(world)]
        with _collective(what):
            dist.all_gather(gathered, local.contiguous())
        for r, contribution in enumerate(gathered):
            if step * world + r < n_batches:
                total += contribution
    return total


def sum_ints(value: int, what: str) -> int:
    """The sum of `value` over all ranks (exact: integers)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    with _collective(what):
        dist.all_reduce(t)
    return int(t.item())
