"""Collective primitives as step schedules: their numbers and their cost on a backend.

A :class:`Schedule` says, for each step, which rank sends which chunk of the buffer to
which rank, and whether the receiver adds it to its own copy (a reduction) or replaces its
copy. Every algorithm is written once as a schedule; the same schedule is

- **executed** on real processes through torch.distributed point-to-point calls
  (:func:`execute`, gloo on CPU; the same code runs across machines under ``torchrun``),
  every addition rounded to the reduction format, in the schedule's order: the bits that
  hardware reducing in that format and order would produce;
- **costed** with an alpha-beta model per link (:func:`cost`): each step takes the link
  latency plus the largest number of bytes one rank sends in it over that rank's
  bandwidth to its peer.

Algorithms: ``ring`` (reduce-scatter then all-gather around a ring, Patarasuk and Yuan
2009), ``tree`` (binomial reduce to rank 0, then binomial broadcast), ``mesh2d`` (reduce-
scatter along each row, all-reduce down each column, all-gather along each row), and
``direct`` (every pair at once: send/recv, all-to-all).
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from hwport.errors import HwportError
from hwport.spec import BackendSpec

if TYPE_CHECKING:
    import torch

OPS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "send_recv", "all_to_all")


@dataclass(frozen=True)
class Transfer:
    """``src`` sends its chunk ``chunk`` to ``dst``; ``reduce``: ``dst`` adds it to its own
    copy (else replaces it). ``to_chunk``: where it lands at ``dst`` (default: the same)."""

    src: int
    dst: int
    chunk: int
    reduce: bool
    to_chunk: int | None = None


@dataclass(frozen=True)
class Schedule:
    """An algorithm on ``ranks`` ranks over a buffer split into ``chunks`` equal chunks."""

    op: str
    algorithm: str
    ranks: int
    chunks: int
    steps: tuple[tuple[Transfer, ...], ...] = field(default=())


def _ring_reduce_scatter(order: list[int], groups: list[list[int]]) -> list[list[Transfer]]:
    """Reduce-scatter of ``len(order)`` chunk groups around the ring ``order``: after it,
    ``order[i]`` holds the full sum of group ``(i + 1) % n``."""
    n = len(order)
    steps = []
    for k in range(n - 1):
        steps.append([Transfer(order[i], order[(i + 1) % n], c, True)
                      for i in range(n) for c in groups[(i - k) % n]])
    return steps


def _ring_all_gather(order: list[int], groups: list[list[int]], start: int = 1
                     ) -> list[list[Transfer]]:
    """All-gather around ``order`` where ``order[i]`` starts with group ``(i + start) % n``."""
    n = len(order)
    return [[Transfer(order[i], order[(i + 1) % n], c, False)
             for i in range(n) for c in groups[(i + start - k) % n]] for k in range(n - 1)]


def _binomial(n: int, chunk: int, reduce: bool) -> list[list[Transfer]]:
    """Binomial tree on ranks 0..n-1 rooted at 0: reduce (leaves first) or broadcast."""
    rounds = []
    span = 1
    while span < n:
        rounds.append([(r + span, r) for r in range(0, n, 2 * span) if r + span < n])
        span *= 2
    if reduce:
        return [[Transfer(s, d, chunk, True) for s, d in pairs] for pairs in rounds]
    return [[Transfer(d, s, chunk, False) for s, d in pairs] for pairs in reversed(rounds)]


def schedule(op: str, algorithm: str, ranks: int, shape: tuple[int, ...] = ()) -> Schedule:
    """The step schedule of ``op`` by ``algorithm`` on ``ranks`` ranks (``shape``: the mesh
    dimensions for ``mesh2d``)."""
    if op not in OPS:
        raise HwportError(f"collective {op!r}: must be one of {list(OPS)}")
    if not isinstance(ranks, int) or ranks < 1:
        raise HwportError(f"collective {op}: ranks={ranks!r} must be a positive integer")
    n = ranks
    order = list(range(n))
    steps: list[list[Transfer]]
    chunks = n
    if (op, algorithm) == ("all_reduce", "ring"):
        groups = [[c] for c in range(n)]
        steps = _ring_reduce_scatter(order, groups) + _ring_all_gather(order, groups)
    elif (op, algorithm) == ("reduce_scatter", "ring"):  # rank i ends with chunk i
        steps = _ring_reduce_scatter(order, [[(g - 1) % n] for g in range(n)])
    elif (op, algorithm) == ("all_gather", "ring"):
        steps = _ring_all_gather(order, [[c] for c in range(n)], start=0)
    elif (op, algorithm) == ("all_reduce", "tree"):
        chunks = 1
        steps = _binomial(n, 0, True) + _binomial(n, 0, False)
    elif (op, algorithm) in (("broadcast", "tree"), ("broadcast", "ring"),
                             ("broadcast", "mesh2d")):
        chunks = 1
        steps = _binomial(n, 0, False) if algorithm != "ring" else \
            [[Transfer(i, i + 1, 0, False)] for i in range(n - 1)]
    elif (op, algorithm) == ("all_reduce", "mesh2d"):
        rows, cols = _mesh(shape, n)
        row_of = [[r * cols + c for c in range(cols)] for r in range(rows)]
        col_of = [[r * cols + c for r in range(rows)] for c in range(cols)]
        # chunk p * rows + s: piece p is reduced along the rows, its sub-chunk s down a column
        pieces = [[p * rows + s for s in range(rows)] for p in range(cols)]
        steps = _together([_ring_reduce_scatter(row, pieces) for row in row_of])
        # after the rows, column c holds piece (c + 1) % cols: all-reduce it down the column
        subs = [[[((c + 1) % cols) * rows + s] for s in range(rows)] for c in range(cols)]
        steps += _together([_ring_reduce_scatter(col, subs[c]) + _ring_all_gather(col, subs[c])
                            for c, col in enumerate(col_of)])
        steps += _together([_ring_all_gather(row, pieces) for row in row_of])
    elif (op, algorithm) == ("send_recv", "direct"):
        if n != 2:
            raise HwportError(f"send_recv: ranks={n} must be 2 (one sender, one receiver)")
        chunks = 1
        steps = [[Transfer(0, 1, 0, False)]]
    elif (op, algorithm) == ("all_to_all", "direct"):
        # rank i's chunk j goes to rank j's chunk i
        steps = [[Transfer(i, j, j, False, to_chunk=i) for i in range(n) for j in range(n)
                  if i != j]]
    else:
        raise HwportError(f"collective {op}: algorithm {algorithm!r} is not defined "
                          f"for it")
    return Schedule(op, algorithm, n, chunks, tuple(tuple(s) for s in steps if s))


def _together(phases: list[list[list[Transfer]]]) -> list[list[Transfer]]:
    """Independent schedules (disjoint rows or columns) run side by side, step by step."""
    return [[t for phase in phases for t in phase[k]] for k in range(len(phases[0]))]


def _mesh(shape: tuple[int, ...], n: int) -> tuple[int, int]:
    if len(shape) == 2 and shape[0] * shape[1] == n:
        return shape[0], shape[1]
    rows = math.isqrt(n)
    while n % rows:
        rows -= 1
    return rows, n // rows


@dataclass(frozen=True)
class Cost:
    """Predicted time of one collective call and nccl-tests' bandwidth conventions."""

    op: str
    algorithm: str
    ranks: int
    nbytes: float  # the buffer per rank
    seconds: float
    steps: int

    @property
    def algbw(self) -> float:
        """Buffer bytes per second (nccl-tests ``algbw``)."""
        return self.nbytes / self.seconds if self.seconds > 0 else math.inf

    @property
    def busbw(self) -> float:
        """``algbw`` times the share of the buffer each rank must move (nccl-tests
        ``busbw``): 2(n-1)/n for all-reduce, (n-1)/n for reduce-scatter, all-gather and
        all-to-all, 1 for broadcast and send/recv."""
        n = self.ranks
        factor = {"all_reduce": 2 * (n - 1) / n, "reduce_scatter": (n - 1) / n,
                  "all_gather": (n - 1) / n, "all_to_all": (n - 1) / n}.get(self.op, 1.0)
        return self.algbw * factor


def link_bandwidth(spec: BackendSpec) -> float:
    """Bytes/s one rank can send to one peer in a step: its links together through a
    switch, one link to a neighbour in a ring, mesh or torus."""
    ic = spec.interconnect
    return ic.link_bandwidth * (ic.links if ic.topology == "switch" else 1)


def cost(sched: Schedule, nbytes: float, spec: BackendSpec) -> Cost:
    """Alpha-beta cost of ``sched`` on a ``nbytes`` buffer per rank over ``spec``'s links:
    per step, the link latency plus the most bytes one rank sends over its bandwidth."""
    ic = spec.interconnect
    beta = link_bandwidth(spec)
    chunk = nbytes / sched.chunks
    total = 0.0
    for step in sched.steps:
        sent: dict[int, float] = {}
        for t in step:
            sent[t.src] = sent.get(t.src, 0.0) + chunk
        # through a switch a rank's links are shared by all it sends; to a neighbour each
        # peer has its own link
        if ic.topology == "switch":
            worst = max(sent.values())
        else:
            per_link: dict[tuple[int, int], float] = {}
            for t in step:
                per_link[t.src, t.dst] = per_link.get((t.src, t.dst), 0.0) + chunk
            worst = max(per_link.values())
        total += ic.link_latency + worst / beta
    return Cost(sched.op, sched.algorithm, sched.ranks, nbytes, total, len(sched.steps))


def thakur_all_reduce(nbytes: float, ranks: int, alpha: float, beta: float,
                      gamma: float = 0.0) -> float:
    """Thakur, Rabenseifner and Gropp 2005, ring all-reduce: 2(p-1) alpha + 2(p-1)/p n
    beta + (p-1)/p n gamma, with beta and gamma in seconds per byte."""
    p = ranks
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * nbytes * beta + (p - 1) / p * nbytes * gamma


# -- execution on torch.distributed ---------------------------------------------------------

def execute(sched: Schedule, buffer: torch.Tensor, fmt: str, rank: int,
            group: Any = None) -> torch.Tensor:
    """Run ``sched`` on this rank's ``buffer`` (float32 holding values of ``fmt``) with
    torch.distributed point-to-point calls; every reduction is rounded to ``fmt`` to
    nearest, in the schedule's order. Returns the buffer (updated in place)."""
    import torch
    import torch.distributed as dist

    from hwport.rounding import quantize

    flat = buffer.view(-1)
    parts = list(torch.tensor_split(flat, sched.chunks))
    for step in sched.steps:
        outgoing = [t for t in step if t.src == rank]
        incoming = sorted((t for t in step if t.dst == rank), key=lambda t: (t.src, t.chunk))
        sends = [parts[t.chunk].clone() for t in outgoing]  # values before this step
        recvs = [torch.empty_like(parts[t.to_chunk if t.to_chunk is not None else t.chunk])
                 for t in incoming]
        ops = [dist.P2POp(dist.isend, x, t.dst, group) for x, t in zip(sends, outgoing,
                                                                         strict=True)]
        ops += [dist.P2POp(dist.irecv, x, t.src, group) for x, t in zip(recvs, incoming,
                                                                          strict=True)]
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        for t, x in zip(incoming, recvs, strict=True):
            target = parts[t.to_chunk if t.to_chunk is not None else t.chunk]
            if t.reduce:
                target.copy_(quantize(target + x, fmt))
            else:
                target.copy_(x)
    return buffer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, world: int, port: int, timeout: float, fn: Callable[..., Any],
            args: tuple[Any, ...], out: str, group: bool) -> None:
    import torch
    import torch.distributed as dist

    if not group:  # one process of its own (JAX: its devices are set before they start)
        torch.save(fn(*args), os.path.join(out, f"rank{rank}.pt"))
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout))
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def launch(world: int, fn: Callable[..., Any], *args: Any, timeout: float = 120.0,
           group: bool = True) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` fresh processes joined in a gloo process
    group on this machine; returns each rank's result. A rank that raises ends the run
    with that rank's error; one that hangs past ``timeout`` seconds ends it too.
    ``group=False``: ``fn(*args)`` on one fresh process, in no group (``world`` must be 1)."""
    import tempfile

    import torch
    from torch.multiprocessing.spawn import (
        ProcessExitedException,
        ProcessRaisedException,
        start_processes,
    )

    if not isinstance(world, int) or world < 1 or (world != 1 and not group):
        raise HwportError(f"world size {world!r}: must be a positive integer "
                          "(1 without a group)")
    with tempfile.TemporaryDirectory(prefix="hwport-ranks-") as out:
        ctx = start_processes(  # type: ignore[no-untyped-call]
            _worker, args=(world, _free_port(), timeout, fn, args, out, group), nprocs=world,
            join=False, start_method="spawn")
        deadline = time.monotonic() + timeout + 60
        try:
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise HwportError(f"collective run of {world} ranks did not finish within "
                                      f"{timeout:.0f} s: a rank hung")
        except ProcessRaisedException as e:
            raise HwportError(f"rank {e.error_index} failed: {str(e).strip().splitlines()[-1]}"
                              ) from None
        except ProcessExitedException as e:
            raise HwportError(f"rank {e.error_index} exited with code {e.exit_code}") from None
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.terminate()
        # written by this run's own processes into a private directory: plain pickles
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False)
                for r in range(world)]


# -- measurement: a real run's numbers against the exact result ----------------------------

def _inputs(seed: int, rank: int, elements: int, fmt: str) -> torch.Tensor:
    import torch

    from hwport.rounding import quantize

    g = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    return quantize(torch.randn(elements, generator=g), fmt)


def _job(rank: int, world: int, op: str, algorithm: str, fmt: str, elements: int,
         seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    sched = schedule(op, algorithm, world, shape)
    return execute(sched, _inputs(seed, rank, elements, fmt), fmt, rank)


def exact(op: str, inputs: list[torch.Tensor], chunks: int) -> list[torch.Tensor]:
    """What each rank should end with, computed exactly (float64) from every rank's input:
    for reductions, the chunks a rank owns afterwards (all of them for all-reduce)."""
    import torch
    total = torch.stack([x.double() for x in inputs]).sum(0)
    n = len(inputs)
    if op == "all_reduce":
        return [total] * n
    if op == "reduce_scatter":
        return [torch.tensor_split(total, chunks)[r] for r in range(n)]
    if op == "all_gather":
        whole = torch.cat([torch.tensor_split(x.double(), chunks)[r]
                           for r, x in enumerate(inputs)])
        return [whole] * n
    if op == "broadcast":
        return [inputs[0].double()] * n
    if op == "send_recv":
        return [inputs[0].double(), inputs[0].double()]
    # all_to_all: rank r's chunk j is rank j's chunk r
    return [torch.cat([torch.tensor_split(inputs[j].double(), chunks)[r] for j in range(n)])
            for r in range(n)]


@dataclass(frozen=True)
class Measured:
    """A real run's numbers against the exact result: the largest error relative to the
    largest exact magnitude, and the mean absolute error relative to the exact RMS."""

    max_relative: float
    rms_relative: float
    ranks_agree: bool  # every rank that should hold the same values does


def measure(op: str, algorithm: str, world: int, elements: int, fmt: str, seed: int = 0,
            shape: tuple[int, ...] = (), timeout: float = 120.0) -> Measured:
    """Run the collective for real on ``world`` processes (gloo) on random inputs in
    ``fmt`` and compare each rank's result with the exact one."""
    import torch
    sched = schedule(op, algorithm, world, shape)
    outs = launch(world, _job, op, algorithm, fmt, elements, seed, shape, timeout=timeout)
    inputs = [_inputs(seed, r, elements, fmt) for r in range(world)]
    want = exact(op, inputs, sched.chunks)
    got = []
    for r, out in enumerate(outs):
        if op == "reduce_scatter":
            got.append(torch.tensor_split(out.double(), sched.chunks)[r])
        else:
            got.append(out.double())
    same = op not in ("all_reduce", "all_gather", "broadcast") or all(
        torch.equal(got[0], g) for g in got)
    return Measured(*relative_error(torch.cat(got).numpy(), torch.cat(want).numpy()), same)


def relative_error(got: Any, exact: Any) -> tuple[float, float]:
    """``got``'s error against ``exact`` (numpy arrays, compared in float64): the largest
    error over the largest exact magnitude, and the mean error over the exact RMS."""
    import numpy as np

    got, exact = np.asarray(got, np.float64), np.asarray(exact, np.float64)
    diff = np.abs(got - exact)
    top = float(np.abs(exact).max(initial=0.0)) or 1.0
    rms = float(np.sqrt(np.mean(exact ** 2))) if exact.size else 0.0
    return float(diff.max(initial=0.0)) / top, float(diff.mean()) / (rms or 1.0)
