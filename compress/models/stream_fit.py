"""Whether a streamed run can fit at all (issue 16): the memory one block needs, from the model's skeleton and the
recipe's calibration, against the memory this process may use; a model that cannot fit even streamed is refused
before any work (InputError, exit 2) with the numbers and what to change.

The terms are docs/scale.md's memory model, in the compute dtype (float32, 4 bytes): the block's parameters, its
input statistics X^T X (one per shared input: q/k/v, o, gate/up, down), the GPTQ solve of its widest linear (about
7 (in, in) matrices and 4 copies of W, measured), the calibration activations (the block's inputs and outputs for
every window), the per-batch intermediates (MLP activations, a float64 copy of down_proj's input, attention scores),
and what the process itself holds now (anonymous resident memory: file-backed library pages are shared and
reclaimable, so they are not counted). The embeddings, and after the last block the head with its logits (float32;
the reload check holds the streamed model's and the artifact's logits of 2 windows and one batch in flight), are
materialized alone; the export then holds one shard of the artifact (export.shard_size_mb, at most 2 bytes per
parameter) and one module in float32: the peak is the largest of the three phases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from compress.errors import InputError
from compress.models import llama

FLOAT = 4  # bytes per element in the compute dtype (float32)
SOLVE_HH, SOLVE_W = 7, 4  # the GPTQ solve's working set: (in, in) matrices and (out, in) copies (docs/scale.md)
LIMIT_ENV = "COMPRESS_MEMORY_MB"  # a limit the environment sets on a run (MB), below the machine's and the cgroup's
LOGIT_COPIES = 3  # the reload check: the streamed model's logits, the artifact's, one batch of them in flight
EXPORT_BYTES = 2  # per parameter in the artifact, at most (a 16-bit export; packed linears take less)
NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2^63 - 1


@dataclass(frozen=True)
class BlockNeed:
    """Bytes a streamed run needs at its peak, by term; `total` is what is compared with the limit."""

    block: int  # one block's parameters
    statistics: int  # X^T X of its inputs
    solve: int  # the GPTQ solve of its widest linear
    activations: int  # the block's inputs and outputs for all calibration windows
    batch: int  # per-batch intermediates
    ends: int  # the embeddings, or the head with its logits (materialized alone)
    shard: int  # the export's shard buffer, with the embeddings read in float32 beside it
    process: int  # what the process holds now

    @property
    def total(self) -> int:
        blocks = self.block + self.statistics + self.solve + self.batch
        return self.process + self.activations + max(blocks, self.ends, self.shard)


def block_need(model: nn.Module, windows: int, seq_len: int, batch_size: int, logit_tokens: int,
               shard_bytes: int = 0, process: int = 0) -> BlockNeed:
    """The need of a streamed GPTQ run of `model` (a skeleton: only shapes are read) on `windows` x `seq_len` tokens
    in batches of `batch_size`, with logits of `logit_tokens` tokens held at once (LOGIT_COPIES times) and shards of
    at most `shard_bytes`; the largest block counts."""
    blocks = llama.blocks(model)
    lm = llama.as_causal_lm(model)
    vocab, hidden = lm.lm_head.weight.shape  # (vocab, hidden), on meta
    params = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    shapes = [llama.block_shape(b) for b in blocks]
    inter = max(s.intermediate_size for s in shapes)
    attn = max(s.num_attention_heads * s.head_dim for s in shapes)
    heads = max(s.num_attention_heads for s in shapes)
    linears = [m for b in blocks[:1] for m in b.modules() if isinstance(m, nn.Linear)]
    solve = max(SOLVE_HH * m.in_features**2 + SOLVE_W * m.out_features * m.in_features for m in linears)
    tokens = batch_size * seq_len
    return BlockNeed(
        block=FLOAT * params,
        statistics=FLOAT * (2 * hidden**2 + attn**2 + inter**2),
        solve=FLOAT * solve,
        activations=2 * FLOAT * windows * seq_len * hidden,
        batch=2 * FLOAT * tokens * inter + 3 * FLOAT * tokens * inter + FLOAT * batch_size * heads * seq_len**2,
        ends=FLOAT * vocab * hidden + LOGIT_COPIES * FLOAT * logit_tokens * vocab,
        shard=min(shard_bytes, EXPORT_BYTES * sum(p.numel() for p in model.parameters())) + FLOAT * vocab * hidden,
        process=process,
    )


def _status_kb(key: str) -> int:
    """A field of /proc/self/status in kB (0 where unknown)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_bytes() -> int:
    """Anonymous resident memory of this process now (Linux RssAnon; 0 elsewhere)."""
    return _status_kb("RssAnon") * 1024


def cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup in bytes (v2 memory.max, v1 memory.limit_in_bytes); None: none."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            file = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"
        elif "memory" in controllers.split(","):
            file = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"
        else:
            continue
        try:
            text = file.read_text().strip()
        except OSError:
            continue
        if text != "max" and int(text) < NO_LIMIT:
            return int(text)
    return None


def memory_limit() -> tuple[int, str]:
    """Bytes this run may use and what sets that: the smallest of COMPRESS_MEMORY_MB, the cgroup's limit, and the
    memory available now (MemAvailable) plus what this process holds. Raises InputError on a malformed
    COMPRESS_MEMORY_MB."""
    limits: list[tuple[int, str]] = []
    if (env := os.environ.get(LIMIT_ENV)) is not None:
        try:
            limits.append((int(float(env) * 2**20), f"{LIMIT_ENV}={env}"))
        except ValueError:
            raise InputError(f"{LIMIT_ENV}={env!r}: not a number of MB") from None
    if (cgroup := cgroup_limit()) is not None:
        limits.append((cgroup, "the cgroup's memory limit"))
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = int(meminfo["MemAvailable"].split()[0]) * 1024 + process_bytes()
        limits.append((available, "memory available now"))
    except (OSError, KeyError, ValueError):
        pass
    return min(limits, default=(NO_LIMIT, "no limit known"))


def check_fits(model: nn.Module, windows: int, seq_len: int, batch_size: int, logit_tokens: int, shard_bytes: int,
               where: str) -> BlockNeed:
    """Refuse (InputError naming the numbers and what to change) a streamed run of `model` that cannot fit in the
    memory limit even one block at a time; returns the need when it fits."""
    need = block_need(model, windows, seq_len, batch_size, logit_tokens, shard_bytes, process_bytes())
    limit, source = memory_limit()
    if need.total <= limit:
        return need

    def mb(n: int) -> str:
        return f"{n / 2**20:.0f} MB"

    least = block_need(model, 1, 8, 1, 8, 1, need.process).total  # one short window, the smallest shards
    advice = ("use fewer calibration windows (calibration.windows), a shorter calibration.seq_len (or "
              "evaluate.seq_len), a smaller calibration.batch_size or export.shard_size_mb")
    if least > limit:
        advice = "no calibration fits: the block itself is too large here; run where more memory is available"
    raise InputError(
        f"{where}: a streamed run needs about {mb(need.total)} ({mb(need.block)} one block in float32, "
        f"{mb(need.statistics)} input statistics, {mb(need.solve)} GPTQ solve, {mb(need.activations)} activations of "
        f"{windows} x {seq_len} calibration tokens, {mb(need.batch)} per batch of {batch_size}, {mb(need.ends)} "
        f"embeddings or head and logits, {mb(need.shard)} writing a shard, {mb(need.process)} this process), more "
        f"than the {mb(limit)} available ({source}); {advice}")
