"""CUDA backend: power and final sweep throughput against the pinned host-to-device bandwidth.

    python benchmarks/bench_cuda.py [--gb 4] [--cols 256 1024 4096 100000] [--basis 30]
                                    [--block-mib 64] [--csr-cols 100000 ...] [--csr-row-nnz 64]
                                    [--csr-column-exponents 0 1] [--profile-final]

A power pass is bound by the copy of A to the device (about 4l flops per element), so its
target is the pinned host-to-device bandwidth for data already in host memory. Measured, in
one run on one GPU:

- the pinned and pageable host-to-device bandwidth, and the host copy into pinned memory;
- a full ``CUDAKernels.power_sweep`` over --gb of float32 blocks (distinct arrays in host
  memory) for each n, and over CSR blocks (float32 values, int32 indices) with uniform
  columns (exponent 0) and Zipf-like ones (column j drawn with probability proportional
  to (j + 1) ** -exponent, as in text or ratings data), each with A^T Y formed both ways
  (``csr_transposed``: atomic scatters from the rows, or the block reordered by columns):
  GB/s of A and the ratio to the pinned bandwidth, for blocks in ordinary (pageable)
  memory, which go through the staging copy, and for the same blocks in page-locked
  memory, which do not;
- a full ``CUDAKernels.final_sweep`` (the final pass: Y_i and its QR on the device, Q_i
  copied home, B^T on the device) over the page-locked blocks, the Q_i kept in memory;
- the kernels alone on a block already on the device (GB/s of the block), and, where CuPy
  is installed, cuBLAS (float64 and float32 GEMMs, Y = A X then Z = A^T Y) and cuSPARSE
  (SpMM) on the same block, for scale.

- a power sweep over the page-locked blocks timed by CUDA events around each block's copy
  and kernels: how much of the sweep the copies and the kernels kept the device busy, how
  much of them overlapped, and a block's kernels in the sweep against the same kernels
  alone (slower beside a copy: the two contend for memory or the L2 cache; not
  overlapped: something serializes them);
- the fixed cost of a pass, apart from its blocks: a power and a final sweep over a
  single block of 4 (l + 1) rows (a block of fewer than l + 1 rows takes the host's QR,
  not the device's), split into set-up (the sweep's construction: X to the device, Z
  allocated and zeroed, or B^T's buffers allocated) and result (Z or B^T copied home,
  F-ordered; for the final sweep also the work on its last block: its QR, B^T's update
  and its Q_i's delivery), best of --repeats, for each n: at large n this is what keeps a
  short pass below the copy rate;
- with --profile-final, a host profile of each final sweep (cProfile, by cumulative time),
  which separates the host's own work from its waits on the device (``synchronize``).

Kernels are compiled in a warm-up sweep before anything is timed. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=4.0, help="data per sweep, in GB")
    parser.add_argument("--cols", type=int, nargs="+", default=[256, 1024, 4096, 100_000],
                        help="n of the dense blocks; a wide n gives blocks of few rows")
    parser.add_argument("--basis", type=int, default=30, help="l = k + p")
    parser.add_argument("--block-mib", type=float, default=64,
                        help="block size in MiB; runs read blocks of at most 64 MiB "
                             "(plan.MAX_BLOCK_BYTES)")
    parser.add_argument("--csr-cols", type=int, nargs="+", default=[100_000],
                        help="n of the CSR blocks; a small n keeps X and Z in the L2 cache")
    parser.add_argument("--csr-row-nnz", type=int, default=64)
    parser.add_argument("--csr-column-exponents", type=float, nargs="+", default=[0.0, 1.0],
                        help="0: uniform columns; s > 0: column j ~ (j + 1) ** -s")
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--copy-threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="kernel timings: best of")
    parser.add_argument("--profile-final", action="store_true",
                        help="print a host profile (cProfile) of each final sweep")
    return parser.parse_args()


def seconds_on_device(cuda, function, repeats: int) -> float:
    """Best time of ``function()`` (which enqueues work on the default stream), by events."""
    function()
    best = float("inf")
    for _ in range(repeats):
        start, stop = cuda.event(), cuda.event()
        start.record()
        function()
        stop.record()
        stop.synchronize()
        best = min(best, start.elapsed_time(stop) / 1e3)
    return best


def copy_bandwidths(cuda, nbytes: int, repeats: int, copy_threads: int) -> dict[str, float]:
    """GB/s of pinned and pageable host-to-device copies and of host copies into pinned
    memory (the sweep's staging step) on 1 and ``copy_threads`` threads."""
    from ooc_svd.kernels.cuda_backend import _HostCopier

    pinned = cuda.pinned_array(nbytes, dtype=np.uint8)
    pageable = np.ones(nbytes, dtype=np.uint8)
    pinned[:] = 1
    device = cuda.device_array(nbytes, dtype=np.uint8)
    rates = {
        "pinned H2D": nbytes / seconds_on_device(cuda, lambda: device.copy_to_device(pinned),
                                                 repeats),
        "pageable H2D": nbytes / seconds_on_device(
            cuda, lambda: device.copy_to_device(pageable), repeats),
    }
    began = time.perf_counter()
    with cuda.pinned(pageable):  # cuMemHostRegister, then cuMemHostUnregister
        pass
    rates["page-locking pageable memory in place"] = nbytes / (time.perf_counter() - began)
    for threads in (1, copy_threads):
        copier = _HostCopier(threads)
        began = time.perf_counter()
        copier.copy(pageable, pinned)
        rates[f"host copy into pinned, {threads} threads"] = nbytes / (time.perf_counter() - began)
        copier.close()
    return {name: rate / 1e9 for name, rate in rates.items()}


def dense_blocks(total_bytes: int, block_bytes: int, n: int) -> list[np.ndarray]:
    """Distinct float32 blocks of about block_bytes filling total_bytes."""
    rows = max(1, block_bytes // (4 * n))
    template = np.random.default_rng(0).standard_normal((rows, n), dtype=np.float32)
    return [template + np.float32(i) for i in range(max(1, total_bytes // template.nbytes))]


def csr_blocks(total_bytes: int, block_bytes: int, n: int, row_nnz: int,
               exponent: float) -> list:
    """Distinct CSR blocks (float32 values, int32 indices, row_nnz per row), column j drawn
    with probability proportional to (j + 1) ** -exponent."""
    from ooc_svd.sources.csr import CSRBlock

    rng = np.random.default_rng(0)
    rows = max(1, block_bytes // (row_nnz * 8 + 8))
    indptr = np.arange(rows + 1, dtype=np.int64) * row_nnz
    cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -exponent)
    indices = np.searchsorted(cdf / cdf[-1], rng.random(rows * row_nnz)).astype(np.int32)
    data = rng.standard_normal(rows * row_nnz, dtype=np.float32)
    return [CSRBlock(data + np.float32(i), indices.copy(), indptr.copy(), n)
            for i in range(max(1, total_bytes // block_bytes))]


def sweep_rates(backend, blocks, X, profile: bool = False
                ) -> tuple[float, float, float, dict | None]:
    """Power sweep GB/s for the blocks as given (pageable) and as page-locked copies,
    final sweep GB/s for the page-locked copies, and the ``SweepTimeline.summary`` of a
    power sweep over them (None under the simulator, whose events do not time)."""
    from numba import config

    pageable = sweep_rate(backend, blocks, X)
    pinned = [backend.keep(block) for block in blocks]  # page-locked copies
    locked = sweep_rate(backend, pinned, X)
    final = final_sweep_rate(backend, pinned, X, profile)
    timeline = None if config.ENABLE_CUDASIM else sweep_timeline(backend.cuda, backend,
                                                                 pinned, X)
    return pageable, locked, final, timeline


def final_sweep_rate(backend, blocks, X, profile: bool = False) -> float:
    """GB/s of A through the final pass's sweep: Y_i and its QR on the device while the
    next block travels, Q_i copied home, B^T updated on the device; the Q_i are kept in
    memory. ``profile``: print where the host's time went (cProfile), which tells host
    work from waits on the device (``synchronize``)."""
    import cProfile
    import pstats

    from ooc_svd.kernels.cpu import BlockStats

    n = X.shape[0]

    def run(blocks) -> None:
        spilled = []
        sweep = backend.final_sweep(X, BlockStats.zeros(n), True,
                                    lambda i, Q_i, merge: spilled.append(Q_i))
        for block in blocks:
            sweep.add(block, 0, np.zeros(n))
        sweep.result()

    run(blocks[:2])
    began = time.perf_counter()
    run(blocks)
    rate = sum(block.nbytes for block in blocks) / (time.perf_counter() - began) / 1e9
    if profile:
        profiler = cProfile.Profile()
        profiler.runcall(run, blocks)
        print(f"\nfinal sweep, host profile ({len(blocks)} blocks of {blocks[0].shape}):")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(15)
    return rate


class SweepTimeline:
    """CUDA events around each block of a power sweep: when the stream reached its copy,
    when the copy ended and when its kernels ended. ``watch(backend)`` wraps the backend's
    upload; ``added()`` marks the end of the block just given to ``sweep.add``.

    Each copy is made to wait for the one before it (on whichever stream) before its start
    is marked: the backend's upload makes it wait too, but after that mark, which would
    then count the wait as transfer. A block's kernels run from the end of its copy to its
    last event on its stream.
    """

    def __init__(self, cuda):
        self.cuda = cuda
        self.blocks: list[list] = []  # [stream, copy began, copy ended, kernels ended]

    def watch(self, backend) -> None:
        upload = backend.upload

        def timed_upload(lane, block):
            if self.blocks:
                self.blocks[-1][2].wait(lane.stream)
            began = self._mark(lane.stream)
            arrays = upload(lane, block)
            self.blocks.append([lane.stream, began, self._mark(lane.stream), None])
            return arrays

        backend.upload = timed_upload

    def added(self) -> None:
        self.blocks[-1][3] = self._mark(self.blocks[-1][0])

    def _mark(self, stream):
        event = self.cuda.event()
        event.record(stream)
        return event

    def summary(self) -> dict[str, float]:
        """Milliseconds of the sweep on the device (first copy to last kernel), the
        fractions of it the copies and the kernels kept the device busy, the fraction of
        the smaller of the two that ran alongside the other, and the mean kernel time of
        a block."""
        self.cuda.synchronize()
        origin = self.blocks[0][1]
        copies = [(origin.elapsed_time(b[1]), origin.elapsed_time(b[2])) for b in self.blocks]
        kernels = [(origin.elapsed_time(b[2]), origin.elapsed_time(b[3])) for b in self.blocks]
        span = max(end for _, end in kernels)
        copy_busy, kernel_busy = _covered(copies), _covered(kernels)
        both = copy_busy + kernel_busy - _covered(copies + kernels)
        return {"ms": span, "copying": copy_busy / span, "computing": kernel_busy / span,
                "overlap": both / min(copy_busy, kernel_busy),
                "kernel ms": sum(end - start for start, end in kernels) / len(kernels)}


def _covered(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of the intervals."""
    total, reached = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total


def sweep_timeline(cuda, backend, blocks, X) -> dict[str, float]:
    """``SweepTimeline.summary`` of a power sweep over ``blocks`` (page-locked)."""
    from ooc_svd.kernels.cpu import BlockStats

    n = X.shape[0]
    timeline = SweepTimeline(cuda)
    timeline.watch(backend)
    try:
        sweep = backend.power_sweep(X, BlockStats.zeros(n))
        for block in blocks:
            sweep.add(block, 0, np.zeros(n))
            timeline.added()
        sweep.result()
    finally:
        del backend.upload  # the class's again
    summary = timeline.summary()
    summary["block bytes"] = sum(block.nbytes for block in blocks) / len(blocks)
    return summary


def sweep_rate(backend, blocks, X) -> float:
    """GB/s of A through a full power sweep (staging, copies, kernels, result)."""
    from ooc_svd.kernels.cpu import BlockStats

    n = X.shape[0]
    warm = backend.power_sweep(X, BlockStats.zeros(n))
    for block in blocks[:2]:
        warm.add(block, 0, np.zeros(n))
    warm.result()
    began = time.perf_counter()
    sweep = backend.power_sweep(X, BlockStats.zeros(n))
    for block in blocks:
        sweep.add(block, 0, np.zeros(n))
    sweep.result()
    return sum(block.nbytes for block in blocks) / (time.perf_counter() - began) / 1e9


def fixed_costs(backend, block, X, repeats: int) -> dict[str, float]:
    """Milliseconds of a power and a final sweep's set-up and result around one small
    ``block``, best of ``repeats`` after a warm-up."""
    from ooc_svd.kernels.cpu import BlockStats

    n = X.shape[0]
    starts = {
        "power": lambda: backend.power_sweep(X, BlockStats.zeros(n)),
        "final": lambda: backend.final_sweep(X, BlockStats.zeros(n), True,
                                             lambda i, Q_i, merge: None),
    }
    best: dict[str, float] = {}
    for _ in range(repeats + 1):  # the first run compiles and warms up
        for name, start in starts.items():
            began = time.perf_counter()
            sweep = start()
            set_up = time.perf_counter()
            sweep.add(block, 0, np.zeros(n))
            backend.cuda.synchronize()
            added = time.perf_counter()
            sweep.result()
            ended = time.perf_counter()
            for part, seconds in (("set-up", set_up - began), ("result", ended - added)):
                key = f"{name} {part}"
                best[key] = min(best.get(key, np.inf), 1e3 * seconds)
    return best


def print_fixed_costs(costs: list[tuple[str, dict[str, float]]]) -> None:
    print("\nFixed cost of a pass (one block of 4 (l + 1) rows), ms, best of the repeats:\n")
    print("| blocks | power: set-up | power: result | final: set-up | final: result |")
    print("| --- | --- | --- | --- | --- |")
    for name, cost in costs:
        print(f"| {name} | {cost['power set-up']:.1f} | {cost['power result']:.1f} "
              f"| {cost['final set-up']:.1f} | {cost['final result']:.1f} |")


def dense_kernel_rates(cuda, backend, block, X, repeats) -> dict[str, float]:
    """GB/s of the block for our kernels and, with CuPy, for cuBLAS, all on the device."""
    n, l = X.shape
    kernels, stream = backend.kernels, cuda.default_stream()
    A = cuda.to_device(block)
    shift, colsum, record = (cuda.to_device(np.zeros(n)), cuda.to_device(np.zeros(n)),
                             cuda.to_device(np.zeros(2)))
    device_X = cuda.to_device(np.ascontiguousarray(X))
    Y = cuda.device_array((block.shape[0], l))
    Z = cuda.to_device(np.zeros((n, l)))

    def ours():
        kernels.dense_totals(stream, A, shift, colsum, record)
        kernels.dense_times(stream, A, shift, device_X, Y)
        kernels.dense_transposed(stream, A, shift, Y, Z)

    rates = {"ooc_svd kernels": block.nbytes / seconds_on_device(cuda, ours, repeats) / 1e9}
    rates.update(cupy_dense_rates(block, X, repeats))
    return rates


def cupy_dense_rates(block, X, repeats) -> dict[str, float]:
    try:
        import cupy
    except ImportError:
        return {}
    rates = {}
    for name, dtype in [("cuBLAS float64", np.float64), ("cuBLAS float32", np.float32)]:
        A, Xd = cupy.asarray(block, dtype=dtype), cupy.asarray(X, dtype=dtype)
        rates[name] = block.nbytes / cupy_seconds(cupy, lambda A=A, Xd=Xd: A.T @ (A @ Xd),
                                                  repeats) / 1e9
    return rates


def csr_kernel_rates(cuda, backend, block, X, repeats) -> dict[str, float]:
    """GB/s of the block for the power kernels of ``backend.csr_transposed`` (for
    'columns', also the reorder alone) and, with CuPy, for cuSPARSE."""
    n, l = X.shape
    kernels, stream = backend.kernels, cuda.default_stream()
    arrays = [cuda.to_device(a) for a in (block.data, block.indices, block.indptr)]
    device_X, sX = cuda.to_device(np.ascontiguousarray(X)), cuda.to_device(np.zeros(l))
    Z, colsum = cuda.to_device(np.zeros((n, l))), cuda.to_device(np.zeros(n))
    record = cuda.to_device(np.zeros(2))
    Y = cuda.device_array((block.shape[0], l))
    counts = cuda.device_array(n + 1, np.int64)
    starts, cursor = cuda.device_array(n + 1, np.int64), cuda.device_array(n, np.int64)
    values, rows = cuda.device_array(block.nnz, block.data.dtype), cuda.device_array(
        block.nnz, np.int32)

    def reorder():
        kernels.csr_to_columns(stream, *arrays, counts, starts, cursor, values, rows)

    def ours():
        if backend.csr_transposed == "scatter":
            kernels.csr_power(stream, *arrays, device_X, sX, Z, colsum, record)
            return
        kernels.csr_times(stream, *arrays, device_X, sX, Y)
        reorder()
        kernels.columns_times(stream, values, rows, starts, Y, Z, colsum, record)

    rates = {"ooc_svd kernels": block.nbytes / seconds_on_device(cuda, ours, repeats) / 1e9}
    if backend.csr_transposed == "columns":
        rates["reorder alone"] = block.nbytes / seconds_on_device(cuda, reorder, repeats) / 1e9
    try:
        import cupy
        import cupyx.scipy.sparse
    except ImportError:
        return rates
    A = cupyx.scipy.sparse.csr_matrix(
        (cupy.asarray(block.data, dtype=np.float64), cupy.asarray(block.indices),
         cupy.asarray(block.indptr)), shape=block.shape)
    AT = A.T.tocsr()
    Xd = cupy.asarray(X)
    rates["cuSPARSE float64 (A^T precomputed)"] = block.nbytes / cupy_seconds(
        cupy, lambda: AT @ (A @ Xd), repeats) / 1e9
    return rates


def cupy_seconds(cupy, function, repeats) -> float:
    function()
    best = float("inf")
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        function()
        stop.record()
        stop.synchronize()
        best = min(best, cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return best


def main() -> None:
    args = parse_args()
    from ooc_svd.kernels.cuda_backend import cuda_available

    usable, why_not = cuda_available()
    if not usable:
        raise SystemExit(f"bench_cuda.py needs a usable NVIDIA GPU: {why_not}")
    from numba import cuda

    from ooc_svd.kernels.cuda_backend import CUDAKernels

    block_bytes, total = int(args.block_mib * 2**20), int(args.gb * 1e9)
    few_rows = 4 * (args.basis + 1)  # the fixed costs' block
    device = cuda.get_current_device()
    name = getattr(device, "name", "the CUDA simulator")
    print(f"device: {name.decode() if isinstance(name, bytes) else name}")
    copy_threads = args.copy_threads or min(8, os.cpu_count() or 1)
    copies = copy_bandwidths(cuda, block_bytes, args.repeats, copy_threads)
    pinned = copies["pinned H2D"]
    print("\n| copy | GB/s |\n| --- | --- |")
    for name, rate in copies.items():
        print(f"| {name} | {rate:.1f} |")

    rows, costs = [], []
    rng = np.random.default_rng(1)
    for n in args.cols:
        backend = CUDAKernels(n, streams=args.streams, copy_threads=args.copy_threads)
        X = np.asfortranarray(rng.standard_normal((n, args.basis)))
        blocks = dense_blocks(total, block_bytes, n)
        rates = sweep_rates(backend, blocks, X, args.profile_final)
        kernels = dense_kernel_rates(cuda, backend, blocks[0], X, args.repeats)
        rows.append((f"dense float32, n={n}", sum(b.nbytes for b in blocks), rates, kernels))
        costs.append((f"dense, n={n}", fixed_costs(backend, blocks[0][:few_rows], X,
                                                   args.repeats)))
        backend.close()
        del blocks
    for n in args.csr_cols:
        rows += csr_rows(cuda, args, n, total, block_bytes, rng)
        backend = CUDAKernels(n, streams=args.streams, copy_threads=args.copy_threads)
        few = csr_blocks(0, few_rows * (8 * args.csr_row_nnz + 8), n, args.csr_row_nnz, 0.0)[0]
        X = np.asfortranarray(rng.standard_normal((n, args.basis)))
        costs.append((f"CSR, n={n}", fixed_costs(backend, few, X, args.repeats)))
        backend.close()

    print(f"\nl = {args.basis}, blocks of {args.block_mib:g} MiB, {args.streams} streams; "
          f"pinned H2D {pinned:.1f} GB/s\n")
    print("| blocks | GB | sweep GB/s, pageable | % of pinned H2D | sweep GB/s, page-locked "
          "| % of pinned H2D | final sweep GB/s, page-locked | % of pinned H2D "
          "| on-device GB/s of A |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, nbytes, (pageable, locked, final, _), kernels in rows:
        on_device = ", ".join(f"{label} {value:.0f}" for label, value in kernels.items())
        print(f"| {name} | {nbytes / 1e9:.1f} | {pageable:.1f} | {100 * pageable / pinned:.0f}% "
              f"| {locked:.1f} | {100 * locked / pinned:.0f}% | {final:.1f} "
              f"| {100 * final / pinned:.0f}% | {on_device} |")
    print_timelines(rows)
    print_fixed_costs(costs)


def print_timelines(rows) -> None:
    """Where a power sweep over page-locked blocks spent its time, by CUDA events: is the
    copy overlapped with the kernels, and does a kernel run slower beside a copy than
    alone?"""
    if all(row[2][3] is None for row in rows):
        print("\n(no timeline: the simulator's events do not time)")
        return
    print("\nPower sweep over page-locked blocks, by CUDA events (copies made to follow one "
          "another):\n")
    print("| blocks | ms on the device | copying | computing | overlap (of the smaller) "
          "| kernels per block: in the sweep / alone |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, _, (*_, timeline), kernels in rows:
        alone_ms = timeline["block bytes"] / kernels["ooc_svd kernels"] / 1e6
        print(f"| {name} | {timeline['ms']:.0f} | {100 * timeline['copying']:.0f}% "
              f"| {100 * timeline['computing']:.0f}% | {100 * timeline['overlap']:.0f}% "
              f"| {timeline['kernel ms']:.1f} ms / {alone_ms:.1f} ms |")


def csr_rows(cuda, args, n: int, total: int, block_bytes: int, rng) -> list[tuple]:
    """The table's rows for CSR blocks of n columns: each column distribution, each way of
    forming A^T Y."""
    from ooc_svd.kernels.cuda_backend import CUDAKernels

    rows = []
    X = np.asfortranarray(rng.standard_normal((n, args.basis)))
    for exponent in args.csr_column_exponents:
        blocks = csr_blocks(total, block_bytes, n, args.csr_row_nnz, exponent)
        columns = "uniform columns" if exponent == 0 else f"columns ~ (j+1)^-{exponent:g}"
        for way in ("scatter", "columns"):
            backend = CUDAKernels(n, streams=args.streams, copy_threads=args.copy_threads,
                                  csr_transposed=way)
            rates = sweep_rates(backend, blocks, X, args.profile_final)
            kernels = csr_kernel_rates(cuda, backend, blocks[0], X, args.repeats)
            rows.append((f"CSR f32/i32, n={n}, {args.csr_row_nnz}/row, {columns}, A^T Y by "
                         f"{way}", sum(b.nbytes for b in blocks), rates, kernels))
            backend.close()
        del blocks
    return rows


if __name__ == "__main__":
    main()
