"""The passes on a dask.distributed cluster: a map over groups of row blocks, a tree reduction.

Each pass of ``passes`` has its counterpart here, with the same return values, so the engine
runs unchanged (``PassContext.cluster`` selects them). A pass

1. puts its small operands on the cluster once (X, the centering shift: O(n l) through the
   scheduler, as tasks, so a lost copy is recomputed);
2. maps one task over each group of consecutive row blocks (GROUPS_PER_THREAD per thread
   the cluster has when the pass starts, so that workers that join during a run take part):
   the worker opens the store and reads the group's blocks one at a time (with the plan's
   read-ahead), so per-task memory is a single node's working set and A never travels
   through the client or the scheduler;
3. reduces the groups' partial results pairwise, a tree of depth ceil(log2(groups)): Z and
   the pass's totals (power pass), G (gram), R factors (exact), (R, B^T) pairs (final pass).

The final pass is the streaming TSQR of ``tsqr`` within each group, whose Q_i and merge
factors T_i, S_i go to a scratch directory every worker reaches; the groups' (R, B^T) pairs
are merged up the tree exactly as the streaming merge does, keeping each merge's small
factors. U = Q W is then assembled by the workers: the client walks the tree down
(P_left = T P, P_right = S P from P_root = W) to one P_g (r x k) per group, and each group's
task runs the backward sweep over its own spill. U's rows are written by the workers into the
output zarr array when there is one and the workers reach it (each task writes the chunks
that lie wholly inside its rows; the few rows of chunks shared by two groups come back to the
client, which writes them, so no chunk is written by two tasks at once); otherwise they come
back to the client, which holds U (m x k) anyway.

A task holds what one node's pass holds (its blocks in flight, n x l operands), so a worker
running t tasks at once needs t times the plan's working set, whatever the number of rows.

Every task is a pure function of (source, block range, operands), so when a worker is lost,
dask recomputes what it held and the result is unchanged. Results equal the local run's to
rounding for any number of workers: Omega depends only on the seed, and each pass's centering
shift is fixed by the first block before the map.

In-memory inputs (numpy arrays, scipy.sparse matrices) are scattered to the workers once per
run, one piece of rows per group (the groups of the run's start, then); such pieces cannot be
recomputed, so a lost worker fails a run on in-memory data (write the matrix to a store for
that). Stores (zarr, CSR zarr, .npy
files, dask arrays read from stores) are opened by the workers themselves.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import itertools
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError  # a lost dependency's, in distributed
from dataclasses import dataclass, field, replace
from typing import Any

import numba
import numpy as np
from distributed import Client, WorkerPlugin

from .centering import Centering
from .errors import ClusterError, InputError
from .interrupts import raise_if_lost
from .kernels.backend import CPUKernels, Kernels, aborted_on_error
from .kernels.cpu import BlockStats, SubBlocks, gram_block, stacked_rows
from .kernels.cuda_backend import (
    CUDAUnavailableError,
    DeviceNeed,
    cuda_available,
    gpu_kernels,
    out_of_memory_named,
)
from .passes import (
    FinalPassResult,
    PassContext,
    add_rows_to_r,
    record_pass,
)
from .plan import Plan, bytes_of_blocks, group_units
from .sources import CSRSource, DenseSource, prefetch_blocks
from .sources.csr import CSRBlock
from .sources.difference import Difference
from .sources.paths import local_paths, path_marker, reads_remote_store
from .store import LeftVectors, naming_write_failures, spilling
from .tsqr import MergeFactors, StreamingTSQR, assemble_left_vectors, householder_r
from .units import format_bytes

# How long the removal of the scratch directory by a worker is waited for before the client
# removes it: a task submitted while the scheduler restarts is never run, and the run's
# error waited a minute behind it.
CLEANUP_TIMEOUT_S = 15
# How long a client that ooc_svd made waits for its connection to close (dask's default
# is a minute, which a connection cut short by Ctrl-C spent in the client's finalizer).
CLOSE_TIMEOUT_S = 5
# Groups per worker thread: more groups than threads balance the load and make a retried
# task cheap; each group adds one n x l partial to the reduction.
GROUPS_PER_THREAD = 4
# A plan of fewer blocks than that (a large memory limit, a small matrix) has its blocks
# cut at storage chunks into pieces of about A's bytes over the groups wanted, but not
# below this: a smaller task costs more in the scheduler's overhead than it shares.
MIN_TASK_BYTES = 16 << 20
# A source is shipped to the workers pickled; past this size it holds data, not a reference
# to a store (e.g. a dask array built from an in-memory numpy array).
MAX_SOURCE_BYTES = 8 << 20
# How long to wait for the first worker of a cluster, unless dask's configuration sets
# WORKER_TIMEOUT_KEY (a batch system may start the workers long after the scheduler).
WORKER_TIMEOUT = "120s"
WORKER_TIMEOUT_KEY = "ooc-svd.worker-timeout"
# Runs of the residual pass again after a worker holding rows of U scattered to it was lost.
SCATTERED_RETRIES = 2
# How often a run that waits on its tasks counts the cluster's workers (``_watched``).
WORKER_CHECK_SECONDS = 2.0
LOCAL_PREFIX = "local:"


def worker_kernels(n: int, backend: str = "auto", scatter_copies: int | None = None,
                   cuda_options: dict | None = None,
                   device_need: DeviceNeed | None = None) -> Kernels:
    """The kernels a task uses on its worker: with backend 'auto', the CUDA ones where the
    worker has a usable GPU with ``device_need`` (a ``DeviceNeed``) free, and the CPU ones
    elsewhere, so a mixed cluster uses what each node has; 'cuda' fails on a worker without
    a GPU or without that memory free, naming what is missing. The CPU's sparse power
    kernel keeps the plan's cap on private accumulators; the CUDA kernels take
    ``cuda_options``."""
    kernels = None
    if backend != "cpu":
        kernels = gpu_kernels(n, backend, device_need, cuda_options)
    return kernels or CPUKernels(n, scatter_copies)


# One task at a time on a process's GPU: each task's CUDA kernels hold a block's buffers
# per stream on the device, which the plan counts once (tasks on several threads of a
# worker would each hold them, and each check the free memory before the others took
# theirs), and a GPU pass is bound by the host-to-device copy, which they would share.
_GPU_TURN = threading.Lock()


# One task at a time in a process whose numba threading layer is workqueue (no OpenMP or
# TBB found): it aborts the process when parallel kernels run from two threads at once,
# as the tasks on a worker's threads would.
_WORKQUEUE_TURN = threading.Lock()
_LAYER_FOUND = threading.Lock()
_threading_layers: list[str] = []  # the process's, once found


@numba.njit(parallel=True, cache=True)
def _parallel_probe(values):
    total = 0.0
    for i in numba.prange(values.size):
        total += values[i]
    return total


def threading_layer() -> str:
    """The threading layer numba's parallel kernels run on in this process ('omp', 'tbb',
    'workqueue'), found by running a tiny one (numba chooses it at the first)."""
    with _LAYER_FOUND:
        if not _threading_layers:
            _parallel_probe(np.zeros(1))
            _threading_layers.append(numba.threading_layer())
        return _threading_layers[0]


@contextlib.contextmanager
def _task_kernels(n: int, spec: tuple) -> Iterator[Kernels]:
    """``worker_kernels(n, *spec)`` for one task (``ClusterPasses.kernel_spec``), released
    when it ends (a GPU's buffers); a task on the GPU waits for the process's other GPU
    tasks to end (``_GPU_TURN``), and every task for the others where numba's threading
    layer is workqueue (``_WORKQUEUE_TURN``). numba's parallel kernels get the worker's
    threads, not every core of the node."""
    from distributed import get_worker

    with contextlib.suppress(ValueError):  # not on a worker: keep numba's threads
        numba.set_num_threads(min(get_worker().state.nthreads, numba.config.NUMBA_NUM_THREADS))
    with _parallel_turn(), _kernels_for_task(n, spec) as kernels:
        yield kernels


def _parallel_turn() -> Any:
    """The process's turn to run numba's parallel kernels: ``_WORKQUEUE_TURN`` where its
    threading layer is workqueue, else no wait."""
    return _WORKQUEUE_TURN if threading_layer() == "workqueue" else contextlib.nullcontext()


@contextlib.contextmanager
def _kernels_for_task(n: int, spec: tuple) -> Iterator[Kernels]:
    """``_task_kernels`` past the threading layer's turn: the kernels, and the GPU's turn."""
    backend = spec[0]
    turn = _GPU_TURN if backend != "cpu" else None
    if turn is not None:
        turn.acquire()
    try:
        kernels = worker_kernels(n, *spec)
    except BaseException:
        if turn is not None:
            turn.release()
        raise
    if turn is not None and kernels.name != "cuda":  # 'auto' left the task to the CPU
        turn.release()
        turn = None
    named = out_of_memory_named(spec[3]) if kernels.name == "cuda" else contextlib.nullcontext()
    try:
        with named:
            yield kernels
    finally:
        try:
            kernels.close()
        finally:  # whatever closing raised: the worker's later GPU tasks wait for it
            if turn is not None:
                turn.release()


# ---- the client side ------------------------------------------------------------------------


@dataclass(frozen=True)
class RowGroup:
    """Consecutive row blocks that one task reads; ``first`` is its first block's index."""

    index: int
    first: int
    blocks: tuple[tuple[int, int], ...]

    @property
    def rows(self) -> tuple[int, int]:
        return self.blocks[0][0], self.blocks[-1][1]


def split_blocks(blocks: tuple[tuple[int, int], ...], boundaries: np.ndarray,
                 unit_bytes: np.ndarray, count: int) -> tuple[tuple[int, int], ...]:
    """``blocks`` (whole units: storage chunks, or a CSR store's units, ``boundaries`` and
    their ``unit_bytes``) cut into pieces of whole units of at most A's bytes over
    ``count`` (MIN_TASK_BYTES at least), so that few large blocks still give every thread
    of a cluster its tasks. A unit larger than that is a piece of its own."""
    target = max(int(np.sum(unit_bytes)) // max(count, 1), MIN_TASK_BYTES)
    pieces: list[tuple[int, int]] = []
    for start, stop in blocks:
        first, last = np.searchsorted(boundaries, [start, stop])
        units = np.asarray(unit_bytes[first:last])
        cut, _ = group_units(boundaries[first : last + 1], units, units, target, target)
        pieces.extend(cut)
    return tuple(pieces)


def row_groups(blocks: tuple[tuple[int, int], ...], count: int) -> list[RowGroup]:
    """Split the blocks into ``count`` groups of consecutive blocks, as even as possible."""
    count = max(1, min(count, len(blocks)))
    edges = np.linspace(0, len(blocks), count + 1).round().astype(int)
    return [RowGroup(g, int(a), tuple(blocks[a:b]))
            for g, (a, b) in enumerate(zip(edges[:-1], edges[1:], strict=True))]


@dataclass
class ClusterSpill:
    """Where a final pass left its factors: the groups' spill directory and the tree's merges
    (``steps``: (node, left, right) ids, leaves are the groups 0..G-1) with their factors;
    ``groups``, those of the pass, which the U sweep takes as they were."""

    directory: str
    steps: list[tuple[int, int, int]]
    factors: list[MergeFactors]
    groups: list[RowGroup]


class ClusterPasses:
    """Runs the passes of ``passes`` on a dask.distributed cluster (see the module docstring).

    Made by ``connect``; ``close()`` removes the scratch directory and, when the client was
    made here from an address, closes it (and the LocalCluster of ``local:N``).
    """

    def __init__(self, client: Any, source: DenseSource | CSRSource, plan: Plan,
                 scratch: str, owned: list[Any], backend: str = "auto",
                 cuda_options: dict | None = None):
        self.client = client
        # The workers' kernels (see ``worker_kernels``): the backend, the plan's cap on
        # the sparse power kernel's private accumulators, the cuda backend's options and
        # the device memory its passes hold.
        need = DeviceNeed.of_plan(source.shape[1], plan, cuda_options or {})
        self.kernel_spec = (backend, plan.scatter_copies or None, cuda_options or None, need)
        self.backends: set[str] = set()  # the backends the workers' block kernels ran on
        self.n = source.shape[1]
        self.sparse = isinstance(source, CSRSource)
        self.scratch = scratch
        # The workers that connect() found to see the scratch directory: one of them
        # removes it (one that joined later may not see it).
        self.scratch_workers = sorted(client.nthreads())
        self.owned = owned  # closed last to first
        self.token = uuid.uuid4().hex[:12]
        self.count = 0  # maps so far: each map's keys carry its number
        self.operands = itertools.count()
        self.depth = plan.prefetch_depth
        self.plan_blocks = plan.blocks
        self.units = np.asarray(source.chunk_rows)  # where blocks may be cut, and their bytes
        self.unit_bytes = np.asarray(source.chunk_bytes) if self.sparse else \
            np.diff(self.units) * self.n * source.block_dtype.itemsize
        self._group_for(sum(client.nthreads().values()))
        self.total_bytes = source.nbytes
        self.sources = self._place_source(source)
        self._reachable: dict[str, bool] = {}

    def _group_for(self, threads: int) -> None:
        """Cut the blocks into GROUPS_PER_THREAD groups per thread, the plan's blocks first
        cut smaller where they are fewer (``split_blocks``): smaller blocks only lower a
        task's memory. Each pass's groups are its own (the final pass's spill keeps
        those its sweep of U's rows takes)."""
        wanted = GROUPS_PER_THREAD * max(threads, 1)
        self.blocks = self.plan_blocks
        if len(self.blocks) < wanted:
            self.blocks = split_blocks(self.blocks, self.units, self.unit_bytes, wanted)
        self.block_bytes = np.asarray(bytes_of_blocks(self.blocks, self.units,
                                                      self.unit_bytes), dtype=np.int64)
        self.groups = row_groups(self.blocks, wanted)
        self.group_bytes = [int(self.block_bytes[g.first : g.first + len(g.blocks)].sum())
                            for g in self.groups]

    def _regroup(self) -> None:
        """Before a pass: groups for the threads the cluster has now, so that workers that
        joined since the run began (an adaptive cluster, jobs of a batch system that start
        minutes apart) take their share. Rows scattered from memory stay in the groups they
        were scattered for."""
        if self.scattered:
            return
        with contextlib.suppress(Exception):  # a cluster that cannot say keeps its groups
            self._group_for(sum(self.client.nthreads().values()))
            self.sources = [self.sources[0]] * len(self.groups)

    # -- setup ----------------------------------------------------------------------------

    def _place_source(self, source: DenseSource | CSRSource) -> list[Any]:
        """One future per group of what its task reads from: the source itself, shipped
        once as a task (recomputable), or the group's rows scattered from memory."""
        shipped = shippable_source(source)
        self.scattered = shipped is None
        if shipped is None:
            return [self.client.scatter(_RowPiece(g.rows[0], source.read(*g.rows)), hash=False)
                    for g in self.groups]
        markers = tuple((path, path_marker(path)) for path in local_paths(source))
        if markers:
            self._check_inputs_reach(markers)
        # A store given by URL is read where it lies, and a worker without access to its
        # chunks would read zarr's fill value: its first and last rows are compared (a
        # chunk read for each, on the client and on each worker).
        edge_rows = edge_rows_digest(source, source.shape[0]) \
            if reads_remote_store(source) else None
        if markers or edge_rows:
            # Every worker checks on its first read, those that join later too.
            shipped = _CheckedSource(shipped, markers, source.shape[0], edge_rows,
                                     source.description, self.token)
        import cloudpickle

        blob = cloudpickle.dumps(shipped)
        if len(blob) > MAX_SOURCE_BYTES:
            raise InputError(_too_large_to_ship(source, len(blob)))
        future = self.client.submit(_unpickle, blob, key=self._key("source"))
        return [future] * len(self.groups)

    def _check_inputs_reach(self, markers: tuple[tuple[str, str | None], ...]) -> None:
        """Refuse a run whose workers do not see the input's files as this process does: zarr
        would read a store missing on a worker as its fill value, zeros, without an error."""
        for path, expected in markers:
            seen = self.client.run(path_marker, path)
            missing = sorted(address for address, marker in seen.items() if marker != expected)
            if missing:
                raise InputError(_unseen_input(f"the workers {missing} do", path))

    # -- helpers --------------------------------------------------------------------------

    def _key(self, *parts: object) -> str:
        return "-".join(["ooc-svd", *map(str, parts), self.token])

    def _put(self, value: Any, name: str) -> Any:
        """``value`` (an O(n l) operand) as a task on the cluster: one copy through the
        scheduler, fetched by the workers from each other, recomputed if lost."""
        import dask

        threshold = max(2 * _nbytes(value), 10 << 20)
        with dask.config.set({"distributed.admin.large-graph-warning-threshold": threshold}):
            return self.client.submit(_identity, value,
                                      key=self._key(name, next(self.operands)))

    def _map(self, name: str, function: Callable, *args: Any) -> list[Any]:
        """One task per group: ``function(source, blocks, first_block, *args)``, and the
        ``kernel_spec`` keyword for the tasks that run block kernels."""
        self.count += 1
        options = {"kernel_spec": self.kernel_spec} if function in _KERNEL_TASKS else {}
        return [
            self.client.submit(function, self.sources[g.index], g.blocks, g.first, *args,
                               key=self._key(name, "group", self.count, g.index), **options)
            for g in self.groups
        ]

    def _reduce(self, name: str, leaves: list[Any], combine: Callable,
                steps: list[tuple[int, int, int]] | None = None,
                on_merge: Callable[[Any], None] | None = None) -> Any:
        """Pairwise tree reduction of ``leaves`` in order (left rows before right rows), depth
        ceil(log2(len)). Records each merge in ``steps`` and passes its future to
        ``on_merge``; returns the root's future. Only the root is kept, so intermediate
        results are released as soon as their parent has them."""
        nodes = list(enumerate(leaves))
        next_id, depth = len(leaves), 0
        while len(nodes) > 1:
            merged = []
            for pair, ((left, a), (right, b)) in enumerate(
                zip(nodes[0::2], nodes[1::2], strict=False)
            ):
                future = self.client.submit(
                    combine, a, b, key=self._key(name, "merge", self.count, depth, pair)
                )
                if steps is not None:
                    steps.append((next_id, left, right))
                if on_merge is not None:
                    on_merge(future)
                merged.append((next_id, future))
                next_id += 1
            if len(nodes) % 2:
                merged.append(nodes[-1])
            nodes, depth = merged, depth + 1
        return nodes[0][1]

    def _wait(self, context: PassContext, name: str, leaves: list[Any]) -> None:
        """Show the pass's progress as groups finish, then let go of the leaves."""
        from distributed import as_completed

        bar = context.progress(name, self.total_bytes)
        group_of = {leaf.key: g for g, leaf in enumerate(leaves)}
        completed = as_completed(leaves, loop=self.client.loop)
        # Each result is released once its parent in the tree holds it: only the futures
        # of the groups not finished yet are kept, to cancel them on an error.
        unfinished = {leaf.key: leaf for leaf in leaves}
        leaves.clear()
        try:
            for leaf in self._watched(completed):
                del unfinished[leaf.key]
                if leaf.status in ("error", "cancelled"):
                    leaf.result()  # raised now, not after every other group has run
                bar.update(self.group_bytes[group_of[leaf.key]])
        except BaseException:
            _let_go(completed, unfinished)
            raise
        finally:
            bar.close()

    def _watched(self, completed: Any) -> Iterator[Any]:
        """What ``completed`` (an ``as_completed``) yields, as it comes. While nothing
        comes, the cluster's workers are looked at every WORKER_CHECK_SECONDS: dask waits
        without end for a worker to run what the last one left, or for a worker paused
        for memory to resume, so a cluster that can run nothing (``_stall``) for
        ``worker_timeout()`` seconds, with nothing coming, ends the run (ClusterError)."""
        stalled_since, checked = None, time.monotonic()
        while not completed.is_empty():
            if completed.has_ready():
                stalled_since = None
                yield next(completed)
                continue
            time.sleep(0.02)
            raise_if_lost()
            now = time.monotonic()
            if now - checked >= WORKER_CHECK_SECONDS:
                checked = now
                stalled_since = self._stalled_since(stalled_since, now)

    def _stalled_since(self, since: float | None, now: float) -> float | None:
        """When the cluster was first seen, in this wait, unable to run anything (None: it
        can now); ClusterError once that has lasted ``worker_timeout()`` seconds."""
        try:
            stall = _stall(_workers_info(self.client))
        except Exception:  # noqa: BLE001 - a lost scheduler: dask cancels the futures
            return since
        if stall is None:
            return None
        since = now if since is None else since
        timeout = worker_timeout()
        if now - since >= timeout:
            raise ClusterError(
                f"the cluster has had {stall} for {timeout:g} s while the run's tasks wait: "
                f"{STALL_ADVICE[stall]}, or wait longer ({WORKER_TIMEOUT_KEY} in dask's "
                "configuration)")
        return since

    def _result(self, future: Any) -> Any:
        """``future.result()``, waited for as ``_watched`` waits; its failure as
        ``_cluster_failures_named`` tells it."""
        from distributed import as_completed

        with _cluster_failures_named(self.client):
            for _ in self._watched(as_completed([future], loop=self.client.loop)):
                pass
            return future.result()

    def _pass_shift(self, centering: Centering, name: str) -> tuple[np.ndarray, int]:
        """The pass's centering shift, which the local pass takes from its first block, and
        the bytes read for it.

        Only an unknown mean makes the first block matter (in the first pass): a tiny task
        reads it then, a read the pass's record counts."""
        if centering.mean_known or self.sparse:
            return centering.shift_for(np.zeros((1, self.n))), 0  # no block needed
        first = self.groups[0]
        future = self.client.submit(
            _first_block_shift, self.sources[0], first.blocks[0], centering,
            key=self._key(name, "shift", self.count),
        )
        return self._result(future)

    def _record(self, context: PassContext, name: str, began: float, nbytes: int) -> None:
        """A pass's record; ``nbytes``, of its blocks and its shift's, counted as read
        (A - M: of A and M)."""
        read = round(nbytes * context.source.read_factor)
        record_pass(context.records, name, time.perf_counter() - began, read)

    def _run_reduction(self, context: PassContext, name: str, task: Callable, combine: Callable,
                       *args: Any, **reduce_options: Any) -> _Partial:
        """Map ``task`` over the groups, reduce with ``combine``, return the root's result."""
        return self._reduced(context, name, self._map(name, task, *args), combine,
                             **reduce_options)

    def _reduced(self, context: PassContext, name: str, leaves: list[Any], combine: Callable,
                 **reduce_options: Any) -> _Partial:
        """The result of the reduction of the pass's ``leaves`` with ``combine``.

        On an error or an interrupt the root is cancelled and the groups not finished are
        let go (``_let_go``), so that what has not started never runs. A piece of
        scattered in-memory input lost with its worker cannot be recomputed: that is
        said."""
        root = self._reduce(name, leaves, combine, **reduce_options)
        try:
            with _cluster_failures_named(self.client):  # before the in-memory input's own message
                self._wait(context, f"{name} pass", leaves)
                result = self._result(root)
        except BaseException as error:
            with contextlib.suppress(Exception):
                self.client.cancel([root])
            if self.scattered and isinstance(error, CancelledError):
                raise InputError(
                    "a worker holding rows of the in-memory input was lost, and rows "
                    "scattered from memory cannot be recomputed: write the matrix to a "
                    "store (zarr, .npy) for a run that survives a lost worker"
                ) from None
            raise
        self.backends |= result.backends
        return result

    # -- the passes -----------------------------------------------------------------------

    def fused_power_pass(self, context: PassContext, X: np.ndarray):
        self._regroup()
        began, centering = time.perf_counter(), context.centering
        shift, shift_bytes = self._pass_shift(centering, "power")
        operands = self._put(X, "X"), self._put(shift, "shift")
        total = self._run_reduction(context, "power", _power_group, _add_partials,
                                    *operands, self.depth)
        Z, stats = total.value, total.stats
        centering.correct_gram(Z, X, shift, stats)
        centering.finish_pass(shift, stats)
        self._record(context, "power pass", began, total.nbytes + shift_bytes)
        return Z, stats, shift

    def gram_pass(self, context: PassContext):
        self._regroup()
        began, centering = time.perf_counter(), context.centering
        shift, shift_bytes = self._pass_shift(centering, "gram")
        total = self._run_reduction(context, "gram", _gram_group, _add_partials,
                                    self._put(shift, "shift"), self.depth)
        G, stats = total.value, total.stats
        G = np.triu(G) + np.triu(G, 1).T
        centering.correct_gram(G, None, shift, stats)
        centering.finish_pass(shift, stats)
        self._record(context, "gram pass", began, total.nbytes + shift_bytes)
        return G, stats, shift

    def tsqr_r_pass(self, context: PassContext):
        self._regroup()
        began, centering = time.perf_counter(), context.centering
        append_ones = not centering.mean_known
        shift, shift_bytes = self._pass_shift(centering, "exact")
        total = self._run_reduction(context, "exact", _r_group, _merge_r,
                                    self._put(shift, "shift"), append_ones, self.depth)
        R, stats = total.value, total.stats
        d = centering.offset(shift, stats)
        if append_ones:
            R = R[:, : self.n] - np.outer(R[:, self.n], d)
        centering.finish_pass(shift, stats)
        self._record(context, "exact TSQR pass", began, total.nbytes + shift_bytes)
        return R, stats, shift

    def tsqr_final_pass(self, context: PassContext, X: np.ndarray) -> FinalPassResult:
        self._regroup()
        began, centering = time.perf_counter(), context.centering
        l = X.shape[1]
        append_ones = not centering.mean_known
        shift, shift_bytes = self._pass_shift(centering, "final")
        directory = os.path.join(self.scratch, f"final-{uuid.uuid4().hex[:8]}")
        steps: list[tuple[int, int, int]] = []
        factor_futures: list[Any] = []

        def keep_factors(merge: Any) -> None:
            factor_futures.append(self.client.submit(
                _factors_of, merge, key=self._key("final", "factors", self.count, len(steps))
            ))

        total = self._run_reduction(
            context, "final", _final_group, _merge_pairs, self._put(X, "X"),
            self._put(shift, "shift"), append_ones, directory, self.depth,
            steps=steps, on_merge=keep_factors,
        )
        factors = self.client.gather(factor_futures)
        R, BT, stats = total.value, total.BT, total.stats
        if append_ones:
            BT = BT - np.outer(centering.offset(shift, stats), R[:, l])
        centering.finish_pass(shift, stats)
        self._record(context, "final pass", began, total.nbytes + shift_bytes)
        tsqr = StreamingTSQR(R, total.BT, sum(len(g.blocks) for g in self.groups))
        return FinalPassResult(tsqr, BT, stats, shift,
                               ClusterSpill(directory, steps, factors, list(self.groups)))

    def left_vectors_sweep(self, context: PassContext, final: FinalPassResult, W: np.ndarray,
                           store_rows: Callable[[int, np.ndarray], None]) -> None:
        spill: ClusterSpill = final.cluster_spill
        P = group_products(spill.steps, spill.factors, W, len(spill.groups))
        sink = self._row_sink(store_rows)
        self.count += 1
        with self._sweep_marker(sink) as sink:
            futures = [
                self.client.submit(_left_vectors_group, spill.directory, g.blocks, g.first,
                                   P[g.index], sink,
                                   key=self._key("U", "group", self.count, g.index))
                for g in spill.groups
            ]
            self._store_returned_rows(futures, store_rows)
        self._result(self.client.submit(_remove_tree, spill.directory,
                                        key=self._key("U", "cleanup", self.count)))

    def residual_power_pass(self, context: PassContext, X: np.ndarray, U: Any, S: np.ndarray,
                            V: np.ndarray) -> np.ndarray:
        """A power pass that also reads U's rows: the workers read them from U's zarr store
        where they all reach it, else the client scatters each group's rows (U is m x k,
        small next to A, and then in the client's memory already). Scattered rows lost
        with a worker cannot be recomputed: the pass is run again, with rows scattered
        afresh, up to SCATTERED_RETRIES times."""
        self._regroup()
        began = time.perf_counter()
        shift, shift_bytes = self._pass_shift(context.centering, "residual")
        operands = [self._put(value, name) for name, value in
                    (("X", X), ("shift", shift), ("S", S), ("V", V))]
        total = None
        if self._reached_by_workers(U):
            root = os.fspath(U.store.root)
            with _marker_file(os.path.join(root, f".ooc-svd-u-{self.token}")) as marker:
                try:
                    if marker is not None:  # else U's rows are sent, as below
                        rows = _SharedRows(U, marker)
                        total = self._residual_groups(
                            context, [(rows, 0)] * len(self.groups), operands)
                except UnseenOutput:  # a worker that joined since the check: rows are sent
                    self._reachable[root] = False
        if total is None:
            total = self._scattered_residual(context, U, operands)
        self._record(context, "residual pass", began, total.nbytes + shift_bytes)
        return total.value

    def _scattered_residual(self, context: PassContext, U: Any, operands: list[Any]) -> _Partial:
        """The residual pass with each group's rows of U scattered to the cluster, run again
        (up to SCATTERED_RETRIES times) when a worker holding a piece of them is lost."""
        for _ in range(SCATTERED_RETRIES):
            with contextlib.suppress(CancelledError):
                return self._residual_groups(context, self._scattered_rows(U), operands)
        return self._residual_groups(context, self._scattered_rows(U), operands)

    def _scattered_rows(self, U: Any) -> list[tuple[Any, int]]:
        """Each group's rows of U, scattered, with the first row's index."""
        return [(self.client.scatter(np.asarray(U[slice(*g.rows)]), hash=False), g.rows[0])
                for g in self.groups]

    def _residual_groups(self, context: PassContext, pieces: list[tuple[Any, int]],
                         operands: list[Any]) -> _Partial:
        self.count += 1
        leaves = [
            self.client.submit(_residual_group, self.sources[g.index], g.blocks, g.first,
                               *pieces[g.index], *operands, self.depth,
                               key=self._key("residual", "group", self.count, g.index),
                               kernel_spec=self.kernel_spec)
            for g in self.groups
        ]
        return self._reduced(context, "residual", leaves, _add_partials)

    # -- U's rows ---------------------------------------------------------------------------

    def _row_sink(self, store_rows: Callable[[int, np.ndarray], None]) -> RowSink:
        """Where the workers put U's rows: into the output zarr array when ``store_rows``
        stores into one (``LeftVectors``) that every worker reaches, else back to the client."""
        owner = getattr(store_rows, "__self__", None)
        if not isinstance(owner, LeftVectors):
            return RowSink(None, np.dtype(np.float64), 0)
        if not self._reached_by_workers(owner.array):
            return RowSink(None, owner.dtype, owner.m)
        return RowSink(owner.array, owner.dtype, owner.m)

    @contextlib.contextmanager
    def _sweep_marker(self, sink: RowSink) -> Iterator[RowSink]:
        """``sink`` with a marker file in its array's store while the sweep runs (removed
        after, so that it never stays in the output)."""
        if sink.array is None:
            yield sink
            return
        root = os.fspath(sink.array.store.root)
        with _marker_file(os.path.join(root, f".ooc-svd-rows-{self.token}-{self.count}")
                          ) as marker:
            # Without a marker the rows come back to the client, which writes them
            yield replace(sink, array=None) if marker is None else replace(sink, marker=marker)

    def _reached_by_workers(self, array: Any) -> bool:
        """Whether ``array`` is a zarr array in a local store that every worker reaches."""
        root = getattr(getattr(array, "store", None), "root", None)
        return not isinstance(array, np.ndarray) and root is not None and \
            self._workers_reach(str(root))

    def _workers_reach(self, path: str) -> bool:
        """Whether every worker sees the directory ``path`` that this process sees (by a
        marker file made here: a directory of the same name on a worker's own disk, or in
        its working directory for a relative path, is not it)."""
        if path not in self._reachable:
            # Without a marker the rows come back to the client, which writes them
            with _marker_file(os.path.join(path, f".ooc-svd-reach-{self.token}")) as marker:
                self._reachable[path] = marker is not None and \
                    all(self.client.run(os.path.exists, marker).values())
        return self._reachable[path]

    def _store_returned_rows(self, futures: list[Any],
                             store_rows: Callable[[int, np.ndarray], None]) -> int:
        """Write the rows the tasks send back, as they finish; return the bytes they read.
        The backends of their kernels join ``self.backends``."""
        from distributed import as_completed

        nbytes = 0
        completed = as_completed(futures, loop=self.client.loop, with_results=True)
        unfinished = {future.key: future for future in futures}
        futures.clear()
        try:
            with _cluster_failures_named(self.client):
                for future, outcome in self._watched(completed):
                    if isinstance(outcome, BaseException):  # cancelled: as_completed gives it
                        raise outcome
                    read, pieces, backends = outcome
                    del unfinished[future.key]
                    for start, rows in pieces:
                        store_rows(start, rows)
                    nbytes += read
                    self.backends |= backends
        except BaseException:
            _let_go(completed, unfinished)
            raise
        return nbytes

    # -- teardown ---------------------------------------------------------------------------

    def _remove_scratch(self) -> None:
        """Remove the scratch directory by a worker; where none can run it (they all died,
        left or are paused for memory: ``_stall``) or none did it within CLEANUP_TIMEOUT_S, by the
        client where it sees the directory, or else name it in a warning."""
        try:
            stall = _stall(_workers_info(self.client))
            if stall is None:
                self.client.submit(_remove_tree, self.scratch, key=self._key("cleanup"),
                                   workers=self.scratch_workers,
                                   allow_other_workers=True).result(timeout=CLEANUP_TIMEOUT_S)
                return
            why = f"the cluster has {stall}"
        except Exception as error:  # noqa: BLE001 - any failure: the client tries
            why = f"the workers did not remove it ({type(error).__name__}: {error})"
        seen = os.path.isdir(self.scratch)
        shutil.rmtree(self.scratch, ignore_errors=True)
        if not seen or os.path.exists(self.scratch):
            warnings.warn(f"the scratch directory {self.scratch!r} (the spilled Q factors) "
                          f"may be left: {why}, and this process cannot reach it; remove it "
                          "by hand", RuntimeWarning, stacklevel=2)

    def close(self) -> None:
        """Release the input's pieces, remove the scratch directory, close what ``connect``
        opened."""
        self.sources.clear()
        self._remove_scratch()
        close_opened(self.owned)


def connect(client: Any, source: DenseSource | CSRSource, plan: Plan,
            scratch_dir: str | None, backend: str = "auto",
            cuda_options: dict | None = None) -> ClusterPasses:
    """A ``ClusterPasses`` on ``client``: a ``distributed.Client``, a scheduler address
    (``tcp://HOST:PORT``), or ``local:N`` for a LocalCluster of N worker processes made (and
    closed by ``ClusterPasses.close``) here.

    The scratch directory, ``scratch_dir`` or the system's temporary directory, must be one
    that every worker reaches (a shared filesystem on a multi-node cluster): checked here.
    """
    client, owned = client_from(client)
    scratch = None
    try:
        _wait_for_a_worker(client)
        _check_worker_package(client)
        _warn_of_small_workers(_workers_info(client), plan.predicted_peak_bytes)
        if backend == "cuda":
            _check_worker_gpus(client)
        scratch = _shared_scratch(client, scratch_dir)
        return ClusterPasses(client, source, plan, scratch, owned, backend, cuda_options)
    except BaseException:
        if scratch is not None:
            _remove_scratch_made(client, scratch, None)
        close_opened(owned)
        raise


def _without_task_errors(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Compute Failed")


class QuietTaskErrors(WorkerPlugin):
    """A worker plugin for the clusters made here (``local:N``): workers do not log a failed
    task ("Compute Failed", with its traceback), since the error reaches the client, which
    reports it (bad input in one line). Their other messages, such as a restart, stay."""

    name = "ooc-svd-quiet-task-errors"

    def setup(self, worker: Any) -> None:
        logging.getLogger("distributed.worker").addFilter(_without_task_errors)

    def teardown(self, worker: Any) -> None:
        logging.getLogger("distributed.worker").removeFilter(_without_task_errors)


NO_WORKER = "no worker"
ALL_PAUSED = "every worker paused for memory and running no task"
STALL_ADVICE = {
    NO_WORKER: "they died or left; start workers for it",
    ALL_PAUSED: ("a worker pauses above distributed.worker.memory.pause of its memory "
                 "limit; give the workers more memory, fewer threads, or the run a "
                 "smaller memory_limit"),
}


def _workers_info(client: Any) -> dict[str, dict]:
    """The scheduler's description of every worker (dask since 2025 describes only the
    first five unless asked for all)."""
    if "n_workers" in inspect.signature(client.scheduler_info).parameters:
        return client.scheduler_info(n_workers=-1)["workers"]
    return client.scheduler_info()["workers"]


def _stall(workers: dict[str, dict]) -> str | None:
    """Why a cluster with these workers can run no task (NO_WORKER, ALL_PAUSED), or None
    where it can. A paused worker still finishes the tasks it runs (and may resume)."""
    if not workers:
        return NO_WORKER
    for worker in workers.values():
        running_tasks = worker.get("metrics", {}).get("task_counts", {}).get("executing", 0)
        if worker.get("status") != "paused" or running_tasks:
            return None
    return ALL_PAUSED


def _warn_of_small_workers(workers: dict[str, dict], task_bytes: int) -> None:
    """Warn of the workers whose memory limit cannot hold a task's working set
    (``task_bytes``) on each of their threads: dask's nanny kills a worker near its limit,
    and the run ends once a task has killed a few."""
    small = {address: worker for address, worker in workers.items()
             if 0 < worker.get("memory_limit", 0) < task_bytes * worker.get("nthreads", 1)}
    if not small:
        return
    address, worker = next(iter(small.items()))
    warnings.warn(
        f"{len(small)} of the cluster's workers (as {address}: a memory limit of "
        f"{format_bytes(worker['memory_limit'])} for {worker.get('nthreads', 1)} threads) "
        f"cannot hold a task of this run on each thread, {format_bytes(task_bytes)} each "
        "(memory_limit is each task's): dask kills a worker near its limit; lower "
        "memory_limit, or start workers with fewer threads or more memory",
        RuntimeWarning, stacklevel=3)


def _wait_for_a_worker(client: Any) -> None:
    """Wait for the cluster's first worker as long as ``worker_timeout`` says; InputError,
    naming the scheduler, where none comes."""
    seconds = worker_timeout()
    if client.status in ("closing", "closed"):
        raise InputError(f"the dask client is {client.status}: pass an open one")
    try:
        client.wait_for_workers(1, timeout=seconds)
    except TimeoutError:
        if _stall(_workers_info(client)) == ALL_PAUSED:  # there, but dask counts them out
            raise ClusterError(f"every worker of the cluster has been paused for memory for "
                               f"{seconds:g} s: {STALL_ADVICE[ALL_PAUSED]}") from None
        address = getattr(client.scheduler, "address", None) or "the scheduler"
        raise InputError(f"no worker joined the scheduler at {address} within "
                         f"{seconds:g} s: start workers for it (dask worker {address}), "
                         f"or wait longer ({WORKER_TIMEOUT_KEY} in dask's configuration, "
                         "e.g. DASK_OOC_SVD__WORKER_TIMEOUT=30m)") from None


# Whether ooc_svd can be imported, as an expression for the builtin ``eval``: a worker
# without the package can run that (not a function of the package, which it could not
# unpickle), and it finds the package however it is there (installed, editable, or on
# PYTHONPATH without metadata).
_IMPORTABLE = "__import__('importlib.util').util.find_spec('ooc_svd') is not None"


def _check_worker_package(client: Any) -> None:
    """Refuse workers that cannot import ooc_svd: each task would fail to unpickle."""
    found = client.run(eval, _IMPORTABLE)
    missing = sorted(address for address, importable in found.items() if not importable)
    if missing:
        raise InputError(f"the workers {missing} cannot import ooc_svd: install it where "
                         "the workers run")


def worker_timeout() -> float:
    """Seconds to wait for a cluster's first worker: dask's configuration value
    WORKER_TIMEOUT_KEY (seconds, or a duration such as '30m'), or
    WORKER_TIMEOUT. InputError for a value that is neither, or not positive."""
    import dask.config
    from dask.utils import parse_timedelta

    value = dask.config.get(WORKER_TIMEOUT_KEY, WORKER_TIMEOUT)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        try:
            seconds = float(parse_timedelta(str(value), default="s"))
        except (ValueError, KeyError, IndexError) as error:  # dask's for a malformed one
            raise InputError(f"{WORKER_TIMEOUT_KEY} must be a duration such as 600 or "
                             f"'30m', not {value!r}") from error
    if not seconds > 0:
        raise InputError(f"{WORKER_TIMEOUT_KEY} must be positive, not {value!r}")
    return seconds


def close_opened(resources: list[Any]) -> None:
    """Close what ``client_from`` opened, last to first, each whatever the others do."""
    for resource in reversed(resources):
        with contextlib.suppress(Exception):
            resource.close()


class PromptlyClosedClient(Client):
    """A Client that waits CLOSE_TIMEOUT_S for its connection to close, not dask's minute,
    and says nothing when it times out: one whose connection Ctrl-C or SIGTERM cut short is
    closed by its finalizer, which held the interrupted command a minute and then printed a
    traceback."""

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> Any:
        with contextlib.suppress(TimeoutError):
            return super().close(timeout=timeout)
        return None


def client_from(client: Any) -> tuple[Any, list[Any]]:
    """(a Client for ``client``, what was opened for it, to close last to first)."""
    from distributed import LocalCluster

    if isinstance(client, Client):
        return client, []
    if not isinstance(client, str):
        raise InputError(
            f"client must be a distributed.Client or a scheduler address (tcp://HOST:PORT, "
            f"or local:N for N local worker processes), not {type(client).__name__}"
        )
    if client.startswith(LOCAL_PREFIX):
        workers = client[len(LOCAL_PREFIX):]
        if not workers.isdigit() or int(workers) < 1:
            raise InputError(f"local:N needs a number of workers N >= 1, not {client!r}")
        # Any free port for the scheduler's HTTP server: its default, 8787, may be taken by
        # another cluster on the node.
        cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                               dashboard_address=":0")
        try:
            made = Client(cluster, set_as_default=False)
            made.register_plugin(QuietTaskErrors())
        except BaseException:
            cluster.close()
            raise
        return made, [cluster, made]
    from distributed.comm import get_address_host_port

    try:
        # Checked first: a Client made from a malformed address fails, and then spends a
        # minute closing itself on garbage collection, with a traceback.
        get_address_host_port(client)
        # The wait for the scheduler is dask's configured one
        # (distributed.comm.timeouts.connect), which a job whose scheduler starts slowly
        # can raise.
        made = PromptlyClosedClient(client, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as error:
        raise InputError(f"cannot connect to the scheduler at {client!r}: {error}") from error
    return made, [made]


def _check_worker_gpus(client: Any) -> None:
    """Raise ``CUDAUnavailableError`` unless every worker has a usable GPU: one message
    before any pass, not a failed task (and its traceback in every worker's log)."""
    reasons = client.run(_why_no_cuda)
    missing = sorted((address, why) for address, why in reasons.items() if why)
    if missing:
        address, why = missing[0]
        raise CUDAUnavailableError(
            f"the cuda backend needs a usable NVIDIA GPU on every worker; {len(missing)} of "
            f"{len(reasons)} have none ({address}: {why}); use the cpu or auto backend"
        )


def _why_no_cuda() -> str:
    """On a worker: why the cuda backend cannot run there, or '' when it can."""
    usable, reason = cuda_available()
    return "" if usable else reason


def _shared_scratch(client: Any, scratch_dir: str | None) -> str:
    """A fresh directory under ``scratch_dir`` that one worker creates and all can see."""
    base = scratch_dir if scratch_dir is not None else tempfile.gettempdir()
    directory = os.path.join(base, f"ooc-svd-cluster-{uuid.uuid4().hex[:12]}")
    try:
        marker, why_not = client.submit(_make_scratch, directory, pure=False).result()
        if why_not:
            raise InputError(f"a worker cannot make a scratch directory in {base!r}: {why_not}")
        seen = client.run(os.path.exists, marker)
    except BaseException:  # an interrupt, or a lost cluster: a worker may have made it
        _remove_scratch_made(client, directory, None)
        raise
    if not all(seen.values()):
        # By a worker that sees it (any other would leave it: it made the marker)
        _remove_scratch_made(client, directory, [address for address, ok in seen.items()
                                                 if ok])
        # Named with those that see it: the worker that made it is one of them, and the
        # odd one out may be on either side
        missing = sorted(address for address, ok in seen.items() if not ok)
        sharing = sorted(address for address, ok in seen.items() if ok)
        raise InputError(_unshared_scratch(base, f"{missing} do not see the one that "
                                                 f"{sharing} see"))
    return directory


def _remove_scratch_made(client: Any, directory: str, workers: list[str] | None) -> None:
    """Remove a scratch directory that the run will not use: by one of ``workers`` (None:
    any), and by this process where it sees it."""
    if workers != []:  # [] : the worker that made it has left
        with contextlib.suppress(Exception):
            client.submit(_remove_tree, directory, pure=False,
                          workers=workers).result(timeout=CLEANUP_TIMEOUT_S)
    shutil.rmtree(directory, ignore_errors=True)


def shippable_source(source: DenseSource | CSRSource) -> Any:
    """What the workers open the input from, or None for data held in memory, which is
    scattered instead: zarr arrays and CSR groups, dask arrays, .npy files (by path), and
    A - M of one of those and any M."""
    if isinstance(source, CSRSource):
        return None if isinstance(source.data, np.ndarray) else source
    if isinstance(source.array, Difference):
        # A - M: A as it ships (scattered rows of A - M when A is in memory), M too, or M's
        # values when it is in memory: small for a column, and a whole m x n M is refused
        # by size as any data would be (``ClusterPasses._place_source``).
        minuend = shippable_source(source.array.minuend)
        if minuend is None:
            return None
        difference = copy.copy(source.array)
        difference.minuend = minuend
        difference.subtrahend = _shipped_subtrahend(source.array)
        return replace(source, array=difference)
    if _opened_npy_file(source):
        return _NpyFile(source.description)
    if isinstance(source.array, np.ndarray):
        return None
    return source


def _shipped_subtrahend(difference: Difference) -> Any:
    """M of A - M as it ships: as a reference to its store, or its values."""
    return shippable_source(difference.subtrahend) or difference.subtrahend


def _opened_npy_file(source: DenseSource) -> bool:
    """Whether the source is an .npy file (or an uncompressed .npz) that ooc_svd
    memory-mapped from its path (its description), which the workers can open too. A memmap
    passed as an array is described as 'memmap', and may map a raw file at an offset: its
    rows are scattered."""
    filename = getattr(source.array, "filename", None)
    return isinstance(source.array, np.memmap) and filename is not None and \
        os.path.exists(source.description) and os.path.samefile(source.description, filename)


def group_products(steps: list[tuple[int, int, int]], factors: list[MergeFactors],
                   W: np.ndarray, groups: int) -> list[np.ndarray]:
    """P_g for each group, such that U's rows of group g are Q_g P_g, with Q_g the Q of the
    group's own streaming TSQR: from P_root = W down the tree, P_left = T P, P_right = S P
    (the merge [R_left; R_right] = [T; S] R)."""
    root = steps[-1][0] if steps else 0
    P = {root: W}
    for (node, left, right), merge in zip(reversed(steps), reversed(factors), strict=True):
        above = P.pop(node)
        P[left], P[right] = merge.T @ above, merge.S @ above
    return [P[g] for g in range(groups)]


# ---- the worker side ------------------------------------------------------------------------
# Module-level functions of their arguments only: what dask retries after a lost worker.


@dataclass
class _Partial:
    """A group's (or a subtree's) share of a pass: its product, totals and bytes read."""

    value: np.ndarray
    stats: BlockStats
    nbytes: int
    BT: np.ndarray | None = None  # final pass: B^T of the rows so far, with R as ``value``
    factors: MergeFactors | None = None  # final pass: of the merge that made this node
    backends: frozenset[str] = frozenset()  # the kernels' backends that computed it


@dataclass(frozen=True)
class _RowPiece:
    """Rows [first, first + rows) of an in-memory matrix, scattered to a worker."""

    first: int
    rows: Any  # ndarray or CSRBlock

    def read(self, start: int, stop: int) -> Any:
        return self.rows[start - self.first : stop - self.first]


@dataclass
class _NpyFile:
    """A .npy file, memory-mapped read-only by each worker on first use."""

    path: str
    _source: DenseSource | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {"path": self.path, "_source": None}

    def read(self, start: int, stop: int) -> np.ndarray:
        if self._source is None:
            from .sources import open_dense_source

            self._source = open_dense_source(self.path)
        return self._source.read(start, stop)


@dataclass(frozen=True)
class RowSink:
    """Where a task puts U's rows: ``array`` (a zarr array the workers write into) or None
    (back to the client), as ``dtype``; ``m`` is U's number of rows. ``marker``: a file
    the client made in the array's store for the sweep; a worker that does not see it (one
    that joined after ``_workers_reach``, with another view of the path) sends its rows
    back instead of writing them where the client would never see them."""

    array: Any
    dtype: np.dtype
    m: int
    marker: str | None = None

    def owned_rows(self, start: int, stop: int) -> tuple[int, int]:
        """The rows of [start, stop) that lie in chunks of ``array`` wholly inside it: the
        task writes those; the rows of chunks shared with a neighbour go to the client, as
        do all of them where this worker does not see ``marker``."""
        if self.array is None or (self.marker is not None and not os.path.exists(self.marker)):
            return start, start
        chunk = int(self.array.chunks[0])
        first = -(-start // chunk) * chunk
        last = stop if stop == self.m else stop // chunk * chunk
        return (first, last) if first < last else (start, start)


class _GroupRows:
    """Collects a task's rows of U: writes the owned ones, keeps the others to return."""

    def __init__(self, sink: RowSink, start: int, stop: int):
        self.sink = sink
        self.first, self.last = sink.owned_rows(start, stop)
        self.returned: list[tuple[int, np.ndarray]] = []

    def add(self, start: int, rows: np.ndarray) -> None:
        rows = rows.astype(self.sink.dtype, copy=False)
        stop = start + rows.shape[0]
        a, b = max(start, self.first), min(stop, self.last)
        if a < b:
            with naming_write_failures(os.fspath(self.sink.array.store.root)):
                self.sink.array[a:b] = rows[a - start : b - start]
            _check_output_kept(self.sink.array)
        for lo, hi in ((start, min(stop, self.first)), (max(start, self.last), stop)):
            if lo < hi:
                self.returned.append((lo, rows[lo - start : hi - start]))


@contextlib.contextmanager
def _marker_file(path: str) -> Iterator[str | None]:
    """A file made at ``path`` while the ``with`` runs and removed after (so that none
    stays in an output), by which a worker tells that it sees the directory as this
    process does; None where it cannot be made."""
    try:
        with open(path, "w"):
            pass
    except OSError:
        yield None
        return
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)


def _check_output_kept(array: Any) -> None:
    """After a task wrote rows into the output's U: if the run has ended meanwhile (an
    error or an interrupt removed its unfinished output, while this task ran on), remove
    what the write made again, chunk files in directories that zarr recreated without their
    metadata, which would block the next run's ``resume`` and ``overwrite``; and stop."""
    root = os.fspath(array.store.root)
    if not os.path.exists(os.path.join(root, "zarr.json")):
        shutil.rmtree(root, ignore_errors=True)
        raise CancelledError(f"the run writing {root!r} has ended")


class UnseenOutput(Exception):
    """A worker does not see the output store that the client found every worker to see
    (it joined since): the pass is run again with U's rows sent to the workers."""


@dataclass
class _SharedRows:
    """U's zarr array as the residual pass's tasks read it, each read first checking that
    the task's worker sees ``marker``, which the client made in U's store for the pass: a
    worker that joined after ``_workers_reach`` may not see the store, and would read U's
    rows as zeros (zarr's fill value), and the spectral error would be wrong."""

    array: Any
    marker: str

    def __getitem__(self, rows: slice) -> Any:
        if not os.path.exists(self.marker):
            raise UnseenOutput(f"a worker on {socket.gethostname()} does not see "
                               f"{os.path.dirname(self.marker)!r}")
        return self.array[rows]


@dataclass
class _CheckedSource:
    """A shipped source whose first read in each worker process checks that the input's
    files look there as they did to the client (``path_marker``), and that its first and
    last rows read the same (``edge_rows_digest``): a worker that joined after the check
    before the first pass, or one that cannot reach a remote store's chunks, would
    otherwise read what it lacks as zeros."""

    source: Any
    markers: tuple[tuple[str, str | None], ...]
    m: int
    edge_rows: str | None  # None: not compared (no store given by URL)
    description: str
    run: str  # the run's token: each run checks afresh

    def read(self, start: int, stop: int) -> Any:
        key = (self.run, self.markers, self.edge_rows)
        if key not in _INPUTS_SEEN:
            here = f"a worker on {socket.gethostname()}"
            for path, expected in self.markers:
                if path_marker(path) != expected:
                    raise InputError(_unseen_input(f"{here} does", path))
            if self.edge_rows is not None and \
                    edge_rows_digest(self.source, self.m) != self.edge_rows:
                raise InputError(
                    f"{here} reads other values than this process does in the first or last "
                    f"row of the input {self.description!r}: it lacks the store's chunks "
                    "(zarr reads a missing chunk as its fill value) or sees other data "
                    "there; give every worker the same view of the input")
            if len(_INPUTS_SEEN) >= 1000:  # a long-lived worker's earlier runs
                _INPUTS_SEEN.clear()
            _INPUTS_SEEN.add(key)
        return self.source.read(start, stop)


def edge_rows_digest(source: Any, m: int) -> str:
    """A digest of the values of the first and last of the m rows of ``source``."""
    digest = hashlib.sha256()
    for start in sorted({0, m - 1}):
        block = source.read(start, start + 1)
        parts = (block.data, block.indices, block.indptr) if isinstance(block, CSRBlock) \
            else (block,)
        for part in parts:
            part = np.ascontiguousarray(part)
            digest.update(f"{part.dtype.str}{part.shape}".encode())
            digest.update(part.tobytes())
    return digest.hexdigest()


# The (run, markers) this process has checked: a set's add and lookup are atomic, and
# checking twice (reader threads racing on the first blocks) is harmless.
_INPUTS_SEEN: set[tuple[str, tuple]] = set()


def _too_large_to_ship(source: DenseSource | CSRSource, size: int) -> str:
    """Why a source that pickles to ``size`` bytes is refused: it carries data, A's or,
    for A - M, M's."""
    import cloudpickle

    if isinstance(getattr(source, "array", None), Difference):  # a CSRSource has none
        share = len(cloudpickle.dumps(_shipped_subtrahend(source.array)))
        if share > size // 2:
            return (f"M pickles to {format_bytes(share)}, so it carries its data rather than "
                    "a reference to a store, too much to ship to the workers; write M to a "
                    "zarr store and pass that (or a dask array read from it), so that the "
                    "workers read its blocks")
    return (f"the {source.kind} input pickles to {format_bytes(size)}, so it carries its "
            "data rather than a reference to a store; write it to a store (e.g. "
            "dask.array.to_zarr) and pass that, so that the workers read their own blocks")


def _unseen_input(workers_do: str, path: str) -> str:
    return (
        f"{workers_do} not see the input {path!r} as this process does (missing, or other "
        "files at that path"
        + ("" if os.path.isabs(path) else ", relative to their working directory")
        + "); pass an input on a filesystem that every worker mounts at the same path"
    )


def _identity(value: Any) -> Any:
    return value


def _unpickle(blob: bytes) -> Any:
    import cloudpickle

    return cloudpickle.loads(blob)


def _nbytes(value: Any) -> int:
    return int(getattr(value, "nbytes", 0))


def _blocks(source: Any, blocks: tuple[tuple[int, int], ...], depth: int) -> Iterator:
    """The group's blocks one at a time, read ``depth`` ahead as on one node."""
    return prefetch_blocks(source, blocks, depth)


def _first_block_shift(source: Any, block: tuple[int, int], centering: Centering
                       ) -> tuple[np.ndarray, int]:
    """The shift a pass takes from its first block, and the bytes of the block."""
    rows = source.read(*block)
    return centering.shift_for(rows), int(rows.nbytes)


def _power_group(source, blocks, first, X, shift, depth,
                 kernel_spec=("auto", None)) -> _Partial:
    n = X.shape[0]
    stats = BlockStats.zeros(n)
    nbytes = 0
    with _task_kernels(n, kernel_spec) as kernels:
        sweep = kernels.power_sweep(X, stats)
        for start, _, block in _blocks(source, blocks, depth):
            sweep.add(block, start, shift)
            nbytes += block.nbytes
        Z = sweep.result()
    return _Partial(Z, stats, nbytes, backends=frozenset([kernels.name]))


def _gram_group(source, blocks, first, shift, depth) -> _Partial:
    n = shift.size
    G = np.zeros((n, n), order="F")
    stats = BlockStats.zeros(n)
    subs = SubBlocks(n)
    nbytes = 0
    with _parallel_turn():  # a CSR block's pairs kernel
        for start, _, block in _blocks(source, blocks, depth):
            gram_block(block, start, shift, G, stats, subs)
            nbytes += block.nbytes
    return _Partial(G, stats, nbytes, backends=frozenset(["cpu"]))


def _r_group(source, blocks, first, shift, append_ones, depth) -> _Partial:
    n = shift.size
    rows_per_stack = stacked_rows(n)
    stats = BlockStats.zeros(n)
    R = np.zeros((0, n + append_ones))
    nbytes = 0
    for start, _, block in _blocks(source, blocks, depth):
        R = add_rows_to_r(R, block, start, shift, rows_per_stack, stats, append_ones)
        nbytes += block.nbytes
    return _Partial(R, stats, nbytes, backends=frozenset(["cpu"]))


def _final_group(source, blocks, first, X, shift, append_ones, directory, depth,
                 kernel_spec=("auto", None)) -> _Partial:
    """The streaming TSQR of the group's rows; Q_i, T_i, S_i spilled under global indices."""
    n = X.shape[0]
    _make_spill_directory(directory)
    stats = BlockStats.zeros(n)
    nbytes = 0

    def spill(i: int, Q_i: np.ndarray, merge: MergeFactors | None) -> None:
        _save(directory, "Q", first + i, Q_i)
        if merge is not None:
            _save(directory, "T", first + i, merge.T)
            _save(directory, "S", first + i, merge.S)

    with _task_kernels(n, kernel_spec) as kernels, \
            aborted_on_error(kernels.final_sweep(X, stats, append_ones, spill)) as sweep:
        for start, _, block in _blocks(source, blocks, depth):
            sweep.add(block, start, shift)
            nbytes += block.nbytes
        tsqr = sweep.result()
    return _Partial(tsqr.R, stats, nbytes, BT=tsqr.BT, backends=frozenset([kernels.name]))


def _residual_group(source, blocks, first, U, u_first, X, shift, S, V, depth,
                    kernel_spec=("auto", None)) -> _Partial:
    """Z = R^T R X over the group's rows; U holds U's rows from row ``u_first`` on (all of
    U's zarr array, or the group's rows)."""
    n = X.shape[0]
    stats = BlockStats.zeros(n)
    Z = np.zeros(X.shape, order="F")
    SVtX = S[:, None] * (V.T @ X)
    nbytes = 0
    with _task_kernels(n, kernel_spec) as kernels:
        for start, _, block in _blocks(source, blocks, depth):
            rows = start - u_first
            U_i = np.asarray(U[rows : rows + block.shape[0]], dtype=np.float64)
            Y = kernels.times(block, start, X, shift, stats) - U_i @ SVtX
            Z += kernels.transposed_times(block, start, Y, shift, stats)
            Z -= V @ (S[:, None] * (U_i.T @ Y))
            nbytes += block.nbytes
    return _Partial(Z, stats, nbytes, backends=frozenset([kernels.name]))


def _left_vectors_group(directory, blocks, first, P, sink):
    """U's rows of one group: the backward sweep over its spill, from its P_g."""
    _check_scratch_seen(os.path.dirname(directory))
    rows = _GroupRows(sink, blocks[0][0], blocks[-1][1])
    assemble_left_vectors(
        len(blocks),
        P,
        lambda i: _load(directory, "Q", first + i),
        lambda i: MergeFactors(_load(directory, "T", first + i),
                               _load(directory, "S", first + i)) if i else None,
        lambda i, U_i: rows.add(blocks[i][0], U_i),
    )
    return 0, rows.returned, frozenset()  # no block kernels: products of small factors


def _merged_stats(a: BlockStats, b: BlockStats) -> BlockStats:
    return BlockStats(a.colsum + b.colsum, a.sumsq + b.sumsq, a.rows + b.rows,
                      a.shifted_after + b.shifted_after)


def _add_partials(a: _Partial, b: _Partial) -> _Partial:
    return _Partial(a.value + b.value, _merged_stats(a.stats, b.stats), a.nbytes + b.nbytes,
                    backends=a.backends | b.backends)


def _merge_r(a: _Partial, b: _Partial) -> _Partial:
    """R of [R_a; R_b]: the R factor of both groups' rows."""
    R = householder_r(np.vstack([a.value, b.value]))
    return _Partial(R, _merged_stats(a.stats, b.stats), a.nbytes + b.nbytes,
                    backends=a.backends | b.backends)


def _merge_pairs(a: _Partial, b: _Partial) -> _Partial:
    """The streaming TSQR merge of two (R, B^T) pairs, a's rows above b's."""
    tsqr = StreamingTSQR(a.value, a.BT, 1)
    factors = tsqr.add_block(b.value, b.BT)
    return _Partial(tsqr.R, _merged_stats(a.stats, b.stats), a.nbytes + b.nbytes,
                    BT=tsqr.BT, factors=factors, backends=a.backends | b.backends)


def _factors_of(node: _Partial) -> MergeFactors:
    return node.factors


def _spill_path(directory: str, name: str, index: int) -> str:
    return os.path.join(directory, f"{name}{index:08d}.npy")


def _save(directory: str, name: str, index: int, array: np.ndarray) -> None:
    """Write under a temporary name and rename, so a retried task (or a reader) never sees
    half a file."""
    path = _spill_path(directory, name, index)
    partial = f"{path}.{uuid.uuid4().hex[:8]}.partial"
    with spilling(directory), open(partial, "wb") as file:
        np.save(file, array, allow_pickle=False)
    os.replace(partial, path)


def _load(directory: str, name: str, index: int) -> np.ndarray:
    return np.load(_spill_path(directory, name, index), allow_pickle=False)


# The file in a run's scratch directory by which each worker tells that it sees it.
SCRATCH_MARKER = "shared"


def _make_scratch(directory: str) -> tuple[str, str]:
    """On a worker: make the run's scratch directory and the marker the others look for.
    (marker, '') or ('', why not), said rather than raised, which dask would log as a
    failed task with its traceback."""
    try:
        # Not makedirs: a mistyped scratch_dir is refused, not created. The directory's name
        # is the run's own, so one that exists was made by this task before a retry.
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory)
        marker = os.path.join(directory, SCRATCH_MARKER)
        with open(marker, "w") as file:
            file.write("ooc-svd scratch\n")
    except FileNotFoundError:
        return "", "it is not a directory there"
    except PermissionError:
        return "", "it is not writable there"
    except OSError as error:
        return "", f"{error.strerror or error}"
    return marker, ""


def _make_spill_directory(directory: str) -> None:
    """Make a final pass's spill directory in the run's scratch directory, which this
    worker must see (not makedirs: a worker that joined after ``connect`` checked the
    scratch directory would make a private copy of it, which the others cannot read)."""
    _check_scratch_seen(os.path.dirname(directory))
    with contextlib.suppress(FileExistsError):  # made by another group's task
        os.mkdir(directory)


def _check_scratch_seen(scratch: str) -> None:
    """Refuse to spill to, or read from, a scratch directory this worker does not see."""
    if not os.path.exists(os.path.join(scratch, SCRATCH_MARKER)):
        raise InputError(_unshared_scratch(os.path.dirname(scratch),
                                           f"a worker on {socket.gethostname()} does not "
                                           "see it"))


def _unshared_scratch(base: str, who_sees_what: str) -> str:
    return (f"the scratch directory {base!r} is not shared by all workers ({who_sees_what});"
            " pass scratch_dir on a filesystem every worker mounts")


def _let_go(completed: Any, unfinished: dict[str, Any]) -> None:
    """Release the futures of a pass that failed or was interrupted whose tasks have not
    finished, and empty ``completed`` (an ``as_completed``, which holds them too): a task
    that nothing wants is not started. Those not started would read A for a run that
    failed, on a cluster that may serve others, and hold up the cleanup queued behind them.
    (Released, not cancelled: the scheduler fails to cancel a task whose dependents no
    client wants, as the merges of a reduction.)"""
    completed.clear()
    for future in unfinished.values():
        with contextlib.suppress(Exception):
            future.release()


@contextlib.contextmanager
def _cluster_failures_named(client: Any = None) -> Iterator[None]:
    """Raise what ``_cluster_failure`` makes of an error of the block, or the error itself."""
    try:
        yield
    except Exception as error:
        failure = _cluster_failure(error, client)
        if failure is None:
            raise
        raise failure from error


def _cluster_failure(error: BaseException, client: Any = None) -> ClusterError | None:
    """A task whose workers all died running it, the scheduler lost or restarted, or the
    run's ``client`` closed, as the run reports it, in one line; None for any other
    ``error``."""
    from distributed.scheduler import KilledWorker

    if isinstance(error, KilledWorker):
        return ClusterError(
            f"{error} Most often a worker ran out of memory: each task holds up to the "
            "run's memory_limit, and a worker's tasks together must fit in its own memory "
            "limit (start workers with fewer threads or more memory, or pass a lower "
            "memory_limit)")
    if not isinstance(error, CancelledError):
        return None
    if "scheduler-connection-lost" in str(error):
        return ClusterError("the connection to the dask scheduler was lost during the run")
    if "scheduler-restart" in str(error):
        return ClusterError("the dask scheduler was restarted during the run (client.restart"
                            "()), which cancels every task")
    if client is not None and client.status in ("closing", "closed"):
        return ClusterError("the run's dask client was closed during the run")
    return None


def _remove_tree(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def tree_depth(groups: int) -> int:
    """Levels of the pairwise reduction of ``groups`` partial results."""
    return math.ceil(math.log2(groups)) if groups > 1 else 0


# The group tasks that run block kernels, and so take the ``kernel_spec`` keyword.
_KERNEL_TASKS = (_power_group, _final_group)
