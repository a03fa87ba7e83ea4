"""CUDA kernels for row blocks (numba-cuda), the device side of ``cuda_backend``.

A power pass does about 4l flops per element of A, so on a GPU it is bound by the
host-to-device copy, not by arithmetic: at 50 GB/s of float32 data and l = 30 the products
need about 1.5 TFLOP/s, a few percent of an H100's float64 rate. The kernels therefore aim
to be simple and to never be the bottleneck, not to reach peak flops:

- Dense blocks: shared-memory tiled products, each thread holding a small register tile.
  Y = A_s X runs one thread block per tile of rows; Z += A_s^T Y one per tile of columns and
  chunk of rows (split-K), adding its partial tile to Z with one atomic per entry. Y is
  split over chunks of columns the same way when its tiles of rows alone would leave most
  of the device idle: a wide block has few rows (a 64 MiB float32 block of 10^5 columns
  has 167, three tiles, against the hundreds of thread blocks an H100 holds). The block
  stays resident on the device between the two products, so a second read of it costs
  device bandwidth (~3 TB/s), about 1/50 of the copy that brought it. A single kernel that
  reuses one shared-memory tile for both products would need whole rows resident (Y needs
  all n columns of a row before Z can use it): 64 rows x n x 8 bytes outgrows the 228 KB
  of shared memory of an H100 multiprocessor beyond n ~ 400.
- CSR blocks: a group of ``lanes`` threads per row, one output column per thread, so the
  gathers of X's rows and the atomic scatters into Z's rows are coalesced across the group.
  The group reads a row's non-zeros in chunks of ``lanes``, one per lane (coalesced), and
  broadcasts each chunk to its lanes by warp shuffles, once per ``lanes`` output columns
  for the products and again for the scatter.
  The power kernel is fused: a row's non-zeros are read from device memory once for
  y = A_row X and again, from cache, to scatter Z += A_row^T y. That scatter costs l
  float64 atomics per non-zero, which bound it (below), and rows sharing a popular column
  all add into the same row of Z. The alternative (``csr_to_columns``, ``columns_times``)
  reorders the block by columns on the device (a histogram of the column indices, a scan,
  and a scatter of each non-zero with an integer atomic) and then sums A^T Y column by
  column in registers, from chunks of equal numbers of non-zeros, with an atomic per run
  of a column in a chunk; it costs a second copy of the block on the device.
- Totals (column sums, sum of squares, a non-finite flag) come from separate kernels for
  dense blocks (one more read of the resident block) and from the spare thread of each row
  group in the CSR power kernel: column l of the group scatters the values themselves,
  which is the column sum A^T 1.
- The final pass's small products (B^T T and Q_i S, float64): one thread per output entry;
  they are n x l x l flops against the block's b x n x l, and their factors stay in cache.
- The final pass's QR of Y_i (b x l, float64, see ``cuda_backend.factor_on_device``):
  ``gram`` sums W^T W with a thread per entry of the upper triangle, a thread block per
  chunk of rows (all its threads read the same row at once) and an atomic per entry and
  chunk; ``solve_rows`` forms W R^-1 with a thread per row. Both take a column of ones
  appended to Y without storing it. On an H100, for b = 262144 and l = 31: 3.6 ms and
  0.5 ms with one thread block per multiprocessor; ``gram`` fell to 1.0 ms with four.

The centering shift is applied while staging dense tiles, in float64 (A_s = A - 1 shift^T
is never stored), and algebraically for CSR blocks (the host corrects with shift^T X and the
column sums; see ``cuda_backend``).

Measured on an H100 (float32 blocks, n = 1024, l = 30, GB/s of A on the device): Y = A_s X
220, Z += A_s^T Y 135, totals 1270, a whole dense block about 85, 1.6 times the 52-54 GB/s
of its PCIe 5 host-to-device copy; the CSR power kernel 48 at n = 1e5 and 54-55 at n = 1e4
(64 non-zeros a row, uniform columns, float32 values and int32 indices: 8 bytes and l = 30
float64 atomic adds per non-zero; the gathers alone run at about 160, the scatter's
atomics are the rest), about the copy's rate; 7 when column j is drawn with probability
~ 1 / (j + 1), where the adds into the popular columns' rows of Z wait for one another.

Products are accumulated in float64 by default. ``accumulate='float32'`` keeps a thread's
running sums in float32: Y_i = A_i X over a row's n columns (dense tiles and CSR rows
alike), and Z over a split-K chunk of rows (thousands; a whole block once n passes about
67k), whose partial sums are added to Z in float64. The entries of X and Y they multiply
are rounded to float32 too (the staged tiles, a CSR row's gathers, Y before Z += A_s^T Y):
about eps32 each, below what the sums lose. A sum of N float32 terms rounds to
about sqrt(N) eps32 of its size, so it loses directions below about sqrt(eps32) ~ 3e-4 of
sigma_1 (Z = A^T A X squares the spectrum), and more as those sums grow (about 2e-3 at
N = 4000). It is meant for GPUs with a small float64 rate (1/32 or 1/64 of float32 on most
non-datacenter parts).
The final pass's B^T = A^T Q uses the float64 kernels whatever ``accumulate`` is, since
the residual is ||A||^2 - ||B||^2.
Dense tiles are centered before they are rounded, so the loss is relative to A - shift; a
CSR block's products are summed before the shift is applied, so there a column mean much
larger than the values' spread costs accuracy in float32.

Occupancy. Registers a thread, assembled by nvJitLink 13.5 for sm_80 / sm_90 (float64
accumulation, float32 values and int32 indices), and the blocks of 256 threads that fit a
multiprocessor: dense tiles 128 / 128 (2 / 2, by launch bounds), CSR power 114 / 59 (2 / 4),
CSR products 80 / 48 (3 / 5), ``gram`` 72 / 63 (3 / 4), all others at most 48 / 56 (5 / 4).
The CSR power kernel bounded to 4 blocks on sm_80 spills 96 bytes a thread; whether that
beats 2 blocks without spills is not measured (it needs an A100). Grid-stride and split-K
launches size their grids by threads, not by these counts (see ``BlockKernels._resident``).

Kernels are built per (accumulation type, ``Geometry``) by ``BlockKernels``; a small
geometry keeps the simulator (``NUMBA_ENABLE_CUDASIM=1``) fast in tests.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass
from functools import cache
from types import SimpleNamespace

import numpy as np
from numba import config, cuda

ACCUMULATE = {"float64": np.float64, "float32": np.float32}
# Threads of a warp: a CSR row group (``Geometry.lanes``) lies inside one.
WARP = 32
MAX_THREADS_PER_BLOCK = 1024
MAX_STATIC_SHARED_BYTES = 48 * 1024
# Thread blocks of the dense tiled products that must fit on a multiprocessor at once.
# Their register tiles take 128 registers a thread (sm_80 and sm_90, 256 threads, float64
# accumulation), the most at which two blocks share a multiprocessor's 65536 registers; a
# bound of 2 makes the compiler keep to that rather than leave one block of 8 warps, too
# few to hide the loads of the next tile. See "Occupancy" in the module docstring for the
# others; ``tests/test_cuda.py`` assembles every kernel and checks both.
DENSE_TILE_BLOCKS = 2


@dataclass(frozen=True)
class Geometry:
    """Thread-block shapes of the kernels (all powers of two).

    Dense products: ``threads_x * threads_y`` threads compute an output tile of ``tile``
    rows (of Y, or of Z's rows = A's columns) by ``out_cols`` columns, staging ``depth``
    entries of the summed dimension at a time; each thread holds
    (tile / threads_y) x (out_cols / threads_x) outputs in registers.
    CSR: ``lanes`` threads share a row, ``groups`` rows per thread block; in the
    column-ordered product they share a chunk of ``column_chunk`` non-zeros instead.
    Totals: ``stats_threads`` threads per block, one column (or non-zero) each.
    Column pointers: one block of ``scan_threads`` threads scans the column counts.
    """

    threads_x: int = 16
    threads_y: int = 16
    out_cols: int = 32
    tile: int = 64
    depth: int = 32
    lanes: int = 32
    groups: int = 8
    stats_threads: int = 256
    column_chunk: int = 256
    scan_threads: int = 1024

    def __post_init__(self):
        for name, value in vars(self).items():
            if value < 1 or value & (value - 1):
                raise ValueError(f"Geometry.{name} must be a power of two, not {value}")
        if self.tile % self.threads_y or self.out_cols % self.threads_x:
            raise ValueError("tile must be a multiple of threads_y, out_cols of threads_x")
        if self.lanes > WARP:
            raise ValueError(f"Geometry.lanes must be at most {WARP} (a row group shares "
                             f"its non-zeros by warp shuffles), not {self.lanes}")
        blocks = {"threads_x * threads_y": self.threads_x * self.threads_y,
                  "lanes * groups": self.lanes * self.groups,
                  "stats_threads": self.stats_threads, "scan_threads": self.scan_threads}
        for name, threads in blocks.items():
            if threads > MAX_THREADS_PER_BLOCK:
                raise ValueError(f"Geometry: {name} = {threads} threads per block exceeds "
                                 f"CUDA's {MAX_THREADS_PER_BLOCK}")
        # The tiled products' shared tiles, in float64 at most: (tile x depth + 1), the
        # padding against bank conflicts, and (depth x out_cols).
        shared = 8 * (self.tile * (self.depth + 1) + self.depth * self.out_cols)
        if shared > MAX_STATIC_SHARED_BYTES:
            raise ValueError(f"Geometry: the dense tiles take {shared} bytes of shared "
                             f"memory, beyond the {MAX_STATIC_SHARED_BYTES} a kernel may "
                             "declare statically")


DEFAULT_GEOMETRY = Geometry()
# Four threads per dense block, eight per CSR block: the simulator runs one Python thread
# per CUDA thread, and tiles this small still exercise every edge and every loop.
SIMULATOR_GEOMETRY = Geometry(threads_x=2, threads_y=2, out_cols=4, tile=4, depth=4,
                              lanes=4, groups=2, stats_threads=4, column_chunk=4,
                              scan_threads=4)


def device_capacity() -> tuple[int, int]:
    """(multiprocessors, resident threads per multiprocessor) of the current device; the
    simulator reports neither and gets one block at a time.

    numba-cuda names the second after the driver's enum: MAX_THREADS_PER_MULTIPROCESSOR
    with NVIDIA's cuda-python bindings (its default now), MAX_THREADS_PER_MULTI_PROCESSOR
    with its older ctypes bindings. Reading only the older name gave 0 on a GPU, so every
    grid-stride kernel ran one block per multiprocessor, an eighth of what fits.
    """
    device = cuda.get_current_device()
    threads = 0
    for name in ("MAX_THREADS_PER_MULTIPROCESSOR", "MAX_THREADS_PER_MULTI_PROCESSOR"):
        threads = threads or int(getattr(device, name, 0))
    return int(getattr(device, "MULTIPROCESSOR_COUNT", 1)), threads


class BlockKernels:
    """Launchers for the kernels of one accumulation type and geometry.

    Every array argument is a device array; every launch is asynchronous on ``stream``.
    Shapes: dense A (b, n) float32/float64 C-order; X (n, l), Y (b, l), Z (n, l) float64
    C-order; shift (n,), sX = shift^T X (l,), colsum (n,) float64; CSR data (nnz,)
    float32/float64, indices (nnz,) int32/int64, indptr (b + 1,) int64 starting at 0;
    ``record`` (2,) float64 receives [sum of squares, 1.0 if a value was NaN or Inf].
    """

    def __init__(self, accumulate: str = "float64", geometry: Geometry = DEFAULT_GEOMETRY):
        if accumulate not in ACCUMULATE:
            raise ValueError(f"accumulate must be one of {sorted(ACCUMULATE)}, not "
                             f"{accumulate!r}")
        self.geometry = geometry
        self.kernels = _compile(ACCUMULATE[accumulate], geometry)
        self.multiprocessors, self.threads_per_multiprocessor = device_capacity()
        # What columns_times writes to when no totals are wanted: no column sums, and a
        # record that only ever receives zeros.
        self.no_totals = (cuda.device_array(0), cuda.to_device(np.zeros(2)))

    def dense_times(self, stream, A, shift, X, Y):
        """Y = (A - 1 shift^T) X, A's columns split into chunks (split-K, into a zeroed Y)
        when the tiles of Y alone would not fill the device. ``Y`` is C-contiguous."""
        g = self.geometry
        n = A.shape[1]
        tiles = (_blocks(A.shape[0], g.tile), _blocks(X.shape[1], g.out_cols))
        resident = self._resident(g.threads_x * g.threads_y)
        chunk = _chunk_rows(n, resident // (tiles[0] * tiles[1]), g.depth)
        if chunk < n:
            self.zero(stream, Y.reshape(-1))
        grid = (*tiles, _blocks(n, chunk))
        self._launch("dense_times", grid, (g.threads_x, g.threads_y), stream,
                     A, shift, X, chunk, Y)

    def dense_transposed(self, stream, A, shift, Y, Z):
        """Z += (A - 1 shift^T)^T Y, the rows split into chunks that fill the device."""
        g = self.geometry
        rows, n = A.shape
        tiles = (_blocks(n, g.tile), _blocks(Y.shape[1], g.out_cols))
        resident = self._resident(g.threads_x * g.threads_y)
        chunk = _chunk_rows(rows, resident // (tiles[0] * tiles[1]), g.depth)
        grid = (*tiles, _blocks(rows, chunk))
        self._launch("dense_transposed", grid, (g.threads_x, g.threads_y), stream,
                     A, shift, Y, chunk, Z)

    def dense_totals(self, stream, A, shift, colsum, record):
        """colsum += column sums of A - 1 shift^T; record += [its sum of squares, flag]."""
        g = self.geometry
        rows, n = A.shape
        column_blocks = _blocks(n, g.stats_threads)
        chunk = _chunk_rows(rows, self._resident(g.stats_threads) // column_blocks, 1)
        grid = (column_blocks, _blocks(rows, chunk))
        self._launch("dense_totals", grid, g.stats_threads, stream,
                     A, shift, chunk, colsum, record)

    def csr_power(self, stream, data, indices, indptr, X, sX, Z, colsum, record):
        """Z += A^T (A X - 1 sX^T); colsum += column sums of A; record += [sumsq(A), flag]."""
        self._launch_rows("csr_power", stream, data, indices, indptr, X, sX, Z, colsum,
                          record)

    def csr_times(self, stream, data, indices, indptr, X, sX, Y):
        """Y = A X - 1 sX^T."""
        self._launch_rows("csr_times", stream, data, indices, indptr, X, sX, Y)

    def csr_transposed(self, stream, data, indices, indptr, Y, Z):
        """Z += A^T Y."""
        self._launch_rows("csr_transposed", stream, data, indices, indptr, Y, Z)

    def csr_totals(self, stream, data, indices, colsum, record):
        """colsum += column sums of A; record += [sum of squares of A, flag]."""
        g = self.geometry
        grid = min(_blocks(data.size, g.stats_threads), self._resident(g.stats_threads))
        self._launch("csr_totals", grid, g.stats_threads, stream, data, indices, colsum,
                     record)

    def csr_to_columns(self, stream, data, indices, indptr, counts, starts, cursor,
                       column_data, column_rows):
        """Reorder a CSR block by columns: ``starts`` (n + 1,) int64 receives the column
        pointers, ``column_data`` (nnz,) the values (of ``data``'s dtype) and
        ``column_rows`` (nnz,) int32 their rows. ``counts`` (n + 1,) and ``cursor`` (n,)
        int64 are scratch."""
        g = self.geometry
        self._launch("clear", _blocks(counts.size, g.stats_threads), g.stats_threads, stream,
                     counts)
        grid = min(_blocks(indices.size, g.stats_threads), self._resident(g.stats_threads))
        self._launch("column_counts", grid, g.stats_threads, stream, indices, counts)
        self._launch("column_starts", 1, g.scan_threads, stream, counts, starts, cursor)
        self._launch_rows("csr_to_columns", stream, data, indices, indptr, cursor,
                          column_data, column_rows)

    def columns_times(self, stream, data, rows, starts, Y, Z, colsum=None, record=None):
        """Z += A^T Y for a block in column order (``csr_to_columns``); given colsum and
        record, also colsum += column sums of A, record += [sum of squares of A, flag]."""
        g = self.geometry
        if colsum is None:
            colsum, record = self.no_totals
        grid = min(_blocks(data.size, g.column_chunk * g.groups),
                   self._resident(g.lanes * g.groups))
        self._launch("columns_times", grid, (g.lanes, g.groups), stream, data, rows, starts,
                     Y, Z, colsum, record)

    def zero(self, stream, array):
        """array[:] = 0 for a contiguous 1-d device array."""
        g = self.geometry
        self._launch("clear", _blocks(array.size, g.stats_threads), g.stats_threads, stream,
                     array)

    def transpose(self, stream, A, B):
        """B = A^T for C-ordered float64 device matrices: the basis X, Z and B^T change
        between a C-ordered device copy and an F-ordered host one this way, without a
        transposing copy on the host."""
        g = self.geometry
        grid = min(_blocks(A.size, g.stats_threads), self._resident(g.stats_threads))
        self._launch("transpose", grid, g.stats_threads, stream, A, B)

    def small_product(self, stream, A, B, C):
        """C = A B for small float64 factors (B has at most a few hundred rows): the
        final pass's B^T T and Q_i S. Always in float64, whatever ``accumulate`` is:
        these products carry the basis, not a sum over A."""
        if C.size == 0:
            return
        g = self.geometry
        grid = min(_blocks(C.size, g.stats_threads), self._resident(g.stats_threads))
        self._launch("small_product", grid, g.stats_threads, stream, A, B, C)

    def gram(self, stream, Y, G):
        """G += W^T W, upper triangle, for W = Y with columns of ones appended up to G's
        width; float64 whatever ``accumulate`` is (the final pass's QR). G is zeroed by
        the caller."""
        g = self.geometry
        chunk = _chunk_rows(Y.shape[0], self._resident(g.stats_threads), 1)
        self._launch("gram", _blocks(Y.shape[0], chunk), g.stats_threads, stream, Y, chunk,
                     G)

    def solve_rows(self, stream, Y, R, Q):
        """Q = W R^-1 for W = Y with columns of ones appended up to R's width (R upper
        triangular); Q may be Y when as wide."""
        g = self.geometry
        grid = min(_blocks(Y.shape[0], g.stats_threads), self._resident(g.stats_threads))
        self._launch("solve_rows", grid, g.stats_threads, stream, Y, R, Q)

    def _launch_rows(self, name, stream, data, indices, indptr, *rest):
        """Launch a CSR row kernel: a grid-stride loop of ``groups`` rows per thread block."""
        g = self.geometry
        grid = min(_blocks(indptr.size - 1, g.groups), self._resident(g.lanes * g.groups))
        self._launch(name, grid, (g.lanes, g.groups), stream, data, indices, indptr, *rest)

    def _resident(self, threads_per_block: int) -> int:
        """Blocks that grid-stride and split-K kernels launch: as many as a multiprocessor
        has threads for. Registers hold fewer at once (see "Occupancy" in the module
        docstring), so the grid runs in waves (4 of the dense tiles, 2 of the CSR power
        kernel on an H100), and later waves even out rows of uneven lengths. Measured on an
        H100 with blocks of 256 threads: the CSR power kernel (4 resident) ran at 34, 36 and
        39 GB/s of A with grids of 2, 4 and 8 blocks per multiprocessor; the dense products
        did not change. The split-K products pay for the extra chunks with one atomic per
        output entry and chunk, against a multiply-add per row of the chunk: Z += A^T Y
        with n = 1024 splits a block of 262 144 rows into chunks of about 4 000 on an H100."""
        per_multiprocessor = self.threads_per_multiprocessor // threads_per_block
        return self.multiprocessors * max(1, per_multiprocessor)

    def _launch(self, name, grid, block, stream, *args):
        # numba warns about grids under 128 blocks; here a small grid means a small input,
        # not a mistake, and the warning would repeat for every small block of a pass. The
        # filters are the process's: swapped under a lock, so that threads launching at
        # once (a cluster worker's tasks) do not restore each other's, leaving one set.
        with _FILTERS_SWAPPED, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*under-utilization")
            launch = getattr(self.kernels, name)[grid, block, stream]
        launch(*args)


# Held while ``_launch`` swaps the process's warning filters
_FILTERS_SWAPPED = threading.Lock()


def _blocks(count: int, size: int) -> int:
    return max(1, -(-count // size))


def _chunk_rows(rows: int, chunks: int, multiple: int) -> int:
    """Rows per chunk when splitting ``rows`` into about ``chunks`` chunks, a multiple of
    ``multiple`` so that staged tiles never straddle two chunks."""
    chunk = -(-rows // max(chunks, 1))
    return max(multiple, -(-chunk // multiple) * multiple)


def example_signatures(data: str = "float32", index: str = "int32") -> dict[str, str]:
    """One launch signature per kernel, for compiling them ahead of time (tests, PTX)."""
    block = f"{data}[:, ::1]"
    vector, matrix = "float64[::1]", "float64[:, ::1]"
    csr = f"{data}[::1], {index}[::1], int64[::1]"
    return {
        "dense_times": f"void({block}, {vector}, {matrix}, int64, {matrix})",
        "dense_transposed": f"void({block}, {vector}, {matrix}, int64, {matrix})",
        "dense_totals": f"void({block}, {vector}, int64, {vector}, {vector})",
        "csr_power": f"void({csr}, {matrix}, {vector}, {matrix}, {vector}, {vector})",
        "csr_times": f"void({csr}, {matrix}, {vector}, {matrix})",
        "csr_transposed": f"void({csr}, {matrix}, {matrix})",
        "csr_totals": f"void({data}[::1], {index}[::1], {vector}, {vector})",
        "clear": "void(int64[::1])",
        "column_counts": f"void({index}[::1], int64[::1])",
        "column_starts": "void(int64[::1], int64[::1], int64[::1])",
        "csr_to_columns": f"void({csr}, int64[::1], {data}[::1], int32[::1])",
        "columns_times": f"void({data}[::1], int32[::1], int64[::1], {matrix}, {matrix}, "
                         f"{vector}, {vector})",
        "transpose": f"void({matrix}, {matrix})",
        "small_product": f"void({matrix}, {matrix}, {matrix})",
        "gram": f"void({matrix}, int64, {matrix})",
        "solve_rows": f"void({matrix}, {matrix}, {matrix})",
    }


@cache
def _compile(acc, g: Geometry) -> SimpleNamespace:
    """The kernels for accumulation type ``acc`` and geometry ``g`` (closures over both, so
    tile shapes are compile-time constants)."""
    # numba freezes closure variables as constants: plain ints, not the dataclass.
    threads_x, threads_y, out_cols, tile, depth = (g.threads_x, g.threads_y, g.out_cols,
                                                   g.tile, g.depth)
    lanes, groups, stats_threads = g.lanes, g.groups, g.stats_threads
    column_chunk, scan_threads = g.column_chunk, g.scan_threads
    threads = threads_x * threads_y
    rows_per_thread, cols_per_thread = tile // threads_y, out_cols // threads_x
    # Shared and local array shapes must be plain constants, not expressions.
    padded_depth, row_threads = depth + 1, lanes * groups
    # A row group's lanes broadcast its non-zeros by warp shuffles; the simulator, which
    # has none, has each lane read them from memory (the same values, in the same order).
    shuffle = not config.ENABLE_CUDASIM

    @cuda.jit(device=True)
    def block_sum(value, scratch, record):
        """record[0] += the sum of ``value`` over the thread block (a tree in shared memory;
        one slot of ``scratch`` per thread)."""
        tid = cuda.threadIdx.x + cuda.threadIdx.y * cuda.blockDim.x
        scratch[tid] = value
        cuda.syncthreads()
        half = scratch.size // 2
        while half > 0:
            if tid < half:
                scratch[tid] += scratch[tid + half]
            cuda.syncthreads()
            half //= 2
        if tid == 0:
            cuda.atomic.add(record, 0, scratch[0])

    def tiled_product(transposed):
        """The dense product kernel: Y = A_s X (transposed=False) or Z += A_s^T Y (True)."""

        def kernel(A, shift, B, chunk, C):
            """C[tile, out_cols] (+)= op(A_s) B, summing ``depth`` entries at a time over
            one chunk of the summed dimension (A's columns for Y, A's rows for Z).

            The A tile is stored as a[output row, summed index] in both cases, padded by
            one column so that the transposed staging writes hit distinct banks. Z, and Y
            when A's columns are split, is summed over chunks with one atomic per entry per
            chunk.
            """
            a = cuda.shared.array((tile, padded_depth), acc)
            b = cuda.shared.array((depth, out_cols), acc)
            out = cuda.local.array((rows_per_thread, cols_per_thread), acc)
            row = cuda.local.array(cols_per_thread, acc)
            tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
            tid = tx + ty * threads_x
            t0, j0 = cuda.blockIdx.x * tile, cuda.blockIdx.y * out_cols
            first = cuda.blockIdx.z * chunk
            rows, cols = A.shape
            for i in range(rows_per_thread):
                for j in range(cols_per_thread):
                    out[i, j] = 0
            for k0 in range(first, min(first + chunk, B.shape[0]), depth):
                for e in range(tid, tile * depth, threads):
                    if transposed:  # consecutive threads read consecutive columns of A
                        r, c, i, k = k0 + e // tile, t0 + e % tile, e % tile, e // tile
                    else:
                        r, c, i, k = t0 + e // depth, k0 + e % depth, e // depth, e % depth
                    # Centered in float64 before rounding to acc: in float32, rounding
                    # first would cost eps32 |A|, not eps32 |A - shift|, per entry.
                    a[i, k] = acc(A[r, c] - shift[c]) if r < rows and c < cols else 0
                for e in range(tid, depth * out_cols, threads):
                    k, j = e // out_cols, e % out_cols
                    inside = k0 + k < B.shape[0] and j0 + j < B.shape[1]
                    b[k, j] = acc(B[k0 + k, j0 + j]) if inside else 0
                cuda.syncthreads()
                for k in range(depth):
                    for j in range(cols_per_thread):
                        row[j] = b[k, tx + j * threads_x]
                    for i in range(rows_per_thread):
                        value = a[ty + i * threads_y, k]
                        for j in range(cols_per_thread):
                            out[i, j] += value * row[j]
                cuda.syncthreads()
            for i in range(rows_per_thread):
                for j in range(cols_per_thread):
                    r, c = t0 + ty + i * threads_y, j0 + tx + j * threads_x
                    if r < C.shape[0] and c < C.shape[1]:
                        if transposed or chunk < B.shape[0]:
                            cuda.atomic.add(C, (r, c), np.float64(out[i, j]))
                        else:
                            C[r, c] = out[i, j]

        kernel.__name__ = "dense_transposed" if transposed else "dense_times"
        return kernel

    dense_times, dense_transposed = tiled_product(False), tiled_product(True)

    def dense_totals(A, shift, chunk_rows, colsum, record):
        """One thread per column over one chunk of rows (consecutive threads read
        consecutive addresses): column sums, sum of squares and NaN/Inf of A - 1 shift^T."""
        scratch = cuda.shared.array(stats_threads, np.float64)
        c = cuda.blockIdx.x * stats_threads + cuda.threadIdx.x
        first = cuda.blockIdx.y * chunk_rows
        squares = 0.0
        if c < A.shape[1]:
            column, bad = 0.0, False
            for r in range(first, min(first + chunk_rows, A.shape[0])):
                value = np.float64(A[r, c]) - shift[c]
                column += value
                squares += value * value
                if not math.isfinite(value):
                    bad = True
            cuda.atomic.add(colsum, c, column)
            if bad:
                record[1] = 1.0
        block_sum(squares, scratch, record)

    @cuda.jit(device=True)
    def row_lane():
        """(lane, first row, row step) of this thread in a grid-stride loop over rows."""
        group = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
        return cuda.threadIdx.x, group, cuda.gridDim.x * cuda.blockDim.y

    @cuda.jit(device=True)
    def group_lanes():
        """(mask of the warp lanes of this thread's row group, warp lane of its first)."""
        first = (cuda.threadIdx.y * lanes) % WARP
        return np.uint32(((1 << lanes) - 1) << first), first

    @cuda.jit(device=True)
    def own_entry(data, indices, p, end):
        """(value, column) of non-zero p, this lane's of a chunk; zeros past the row."""
        if p < end:
            return np.float64(data[p]), np.int64(indices[p])
        return 0.0, np.int64(0)

    @cuda.jit(device=True)
    def chunk_entry(data, indices, value, column, base, t, mask, first):
        """(value, column) of non-zero base + t: lane t's entry of the chunk at base."""
        if shuffle:
            return (cuda.shfl_sync(mask, value, first + t),
                    cuda.shfl_sync(mask, column, first + t))
        return np.float64(data[base + t]), np.int64(indices[base + t])

    @cuda.jit(device=True)
    def row_dot(data, indices, start, end, X, j):
        """sum over a row's non-zeros p of data[p] * X[indices[p], j] (0 for j past X's
        columns). Every lane of the group calls it: the row is read in chunks of
        ``lanes`` non-zeros, one per lane, and each chunk broadcast to the group."""
        mask, first = group_lanes()
        total = acc(0)
        for base in range(start, end, lanes):
            value, column = own_entry(data, indices, base + cuda.threadIdx.x, end)
            for t in range(min(lanes, end - base)):
                v, c = chunk_entry(data, indices, value, column, base, t, mask, first)
                if j < X.shape[1]:
                    total += acc(v) * acc(X[c, j])
        return np.float64(total)

    def scatter_function(totals):
        """The device function that adds a row's non-zeros times y into column j of Z,
        in chunks as ``row_dot`` reads them; with ``totals``, the lane whose j is Z's
        width adds the values themselves into colsum (A^T 1) and returns their sum of
        squares and whether one was NaN or Inf."""

        def row_scatter(data, indices, start, end, y, Z, j, colsum):
            mask, first = group_lanes()
            squares, bad = 0.0, False
            for base in range(start, end, lanes):
                value, column = own_entry(data, indices, base + cuda.threadIdx.x, end)
                for t in range(min(lanes, end - base)):
                    v, c = chunk_entry(data, indices, value, column, base, t, mask, first)
                    if j < Z.shape[1]:
                        cuda.atomic.add(Z, (c, j), v * y)
                    elif totals and j == Z.shape[1]:
                        cuda.atomic.add(colsum, c, v)
                        squares += v * v
                        if not math.isfinite(v):
                            bad = True
            return squares, bad

        return cuda.jit(device=True)(row_scatter)

    scatter_with_totals, scatter = scatter_function(True), scatter_function(False)

    def csr_power(data, indices, indptr, X, sX, Z, colsum, record):
        """Fused Z += A^T (A X - 1 sX^T) for CSR rows. Lane j of a row's group computes
        y_j and scatters column j of Z; the lane with j = l (column l of [Z, colsum])
        scatters the values themselves into colsum and sums their squares. The lanes
        step through columns together, as the chunks' broadcasts need every lane."""
        scratch = cuda.shared.array(row_threads, np.float64)
        lane, row, step = row_lane()
        l = X.shape[1]
        squares, bad = 0.0, False
        while row < indptr.size - 1:
            start, end = indptr[row], indptr[row + 1]
            for j0 in range(0, l + 1, lanes):
                j = j0 + lane
                y = row_dot(data, indices, start, end, X, j)
                if j < l:
                    y -= sX[j]
                row_squares, row_bad = scatter_with_totals(data, indices, start, end, y, Z,
                                                           j, colsum)
                squares += row_squares
                bad = bad or row_bad
            row += step
        if bad:
            record[1] = 1.0
        block_sum(squares, scratch, record)

    def csr_times(data, indices, indptr, X, sX, Y):
        """Y = A X - 1 sX^T, lane j of a row's group computing Y[row, j]."""
        lane, row, step = row_lane()
        l = X.shape[1]
        while row < indptr.size - 1:
            for j0 in range(0, l, lanes):
                j = j0 + lane
                y = row_dot(data, indices, indptr[row], indptr[row + 1], X, j)
                if j < l:
                    Y[row, j] = y - sX[j]
            row += step

    def csr_transposed(data, indices, indptr, Y, Z):
        """Z += A^T Y, lane j of a row's group scattering column j."""
        lane, row, step = row_lane()
        l = Y.shape[1]
        while row < indptr.size - 1:
            for j0 in range(0, l, lanes):
                j = j0 + lane
                y = Y[row, j] if j < l else 0.0
                # Z[0] stands in for the column sums, which this scatter never touches.
                scatter(data, indices, indptr[row], indptr[row + 1], y, Z, j, Z[0])
            row += step

    def csr_totals(data, indices, colsum, record):
        """Column sums (an atomic per non-zero), sum of squares and NaN/Inf of the values."""
        scratch = cuda.shared.array(stats_threads, np.float64)
        squares, bad = 0.0, False
        for p in range(cuda.grid(1), data.size, cuda.gridsize(1)):
            value = np.float64(data[p])
            cuda.atomic.add(colsum, indices[p], value)
            squares += value * value
            if not math.isfinite(value):
                bad = True
        if bad:
            record[1] = 1.0
        block_sum(squares, scratch, record)

    def clear(array):
        """array[:] = 0."""
        i = cuda.grid(1)
        if i < array.size:
            array[i] = 0

    def column_counts(indices, counts):
        """counts[c + 1] += the non-zeros of column c; counts[0] stays 0, so the prefix
        sums of counts are the column pointers."""
        for p in range(cuda.grid(1), indices.size, cuda.gridsize(1)):
            cuda.atomic.add(counts, indices[p] + 1, 1)

    def column_starts(counts, starts, cursor):
        """starts = the prefix sums of counts (starts[c] is where column c begins,
        starts[n] the number of non-zeros) and cursor = starts[:n]. One thread block: each
        thread sums a contiguous range of counts, the thread totals are scanned in shared
        memory, and each thread writes its range."""
        totals = cuda.shared.array(scan_threads, np.int64)
        t = cuda.threadIdx.x
        per_thread = (counts.size + scan_threads - 1) // scan_threads
        first = min(t * per_thread, counts.size)
        last = min(first + per_thread, counts.size)
        own = 0
        for i in range(first, last):
            own += counts[i]
        totals[t] = own
        cuda.syncthreads()
        step = 1
        while step < scan_threads:  # inclusive scan of the thread totals (Hillis-Steele)
            before = totals[t - step] if t >= step else 0
            cuda.syncthreads()
            totals[t] += before
            cuda.syncthreads()
            step *= 2
        running = totals[t] - own
        for i in range(first, last):
            running += counts[i]
            starts[i] = running
            if i < cursor.size:
                cursor[i] = running

    def csr_to_columns(data, indices, indptr, cursor, column_data, column_rows):
        """The block's non-zeros in column order: the one at (row, c) goes to the next free
        slot of column c, taken with an atomic on cursor[c]. Which rows of a column come
        first varies between runs; the products' sums vary in their last bits, as they
        do with atomic scatters."""
        lane, row, step = row_lane()
        while row < indptr.size - 1:
            for p in range(indptr[row] + lane, indptr[row + 1], lanes):
                slot = cuda.atomic.add(cursor, indices[p], 1)
                column_rows[slot] = row
                column_data[slot] = data[p]
            row += step

    @cuda.jit(device=True)
    def column_of(starts, p):
        """The column holding non-zero p: the last c < n with starts[c] <= p."""
        low, high = 0, starts.size - 2
        while low < high:
            middle = (low + high + 1) // 2
            if starts[middle] <= p:
                low = middle
            else:
                high = middle - 1
        return low

    def columns_times(data, rows, starts, Y, Z, colsum, record):
        """Z += A^T Y from the block in column order (data, rows, starts); when colsum is
        not empty also its column sums, sum of squares and NaN/Inf.

        A group of threads takes ``column_chunk`` consecutive non-zeros, whichever columns
        they fall in: long columns are shared between groups and short ones batched, so
        the work is even however skewed the column counts are. Thread j of the group sums
        each column's run of non-zeros in the chunk against column j of Y (the rows of Y
        gathered, coalesced across the group) and adds it to Z with one atomic; thread l
        sums the values themselves into colsum. That is an atomic per run and column of
        Y, not per non-zero as in the row-wise scatter."""
        scratch = cuda.shared.array(row_threads, np.float64)
        lane, group, step = row_lane()
        l = Y.shape[1]
        width = l + 1 if colsum.size > 0 else l
        squares, bad = 0.0, False
        first = group * column_chunk
        while first < data.size:
            last = min(first + column_chunk, data.size)
            for j in range(lane, width, lanes):
                c, p = column_of(starts, first), first
                while p < last:
                    while starts[c + 1] <= p:  # past the column just finished, and empty ones
                        c += 1
                    end = min(starts[c + 1], last)
                    if j < l:
                        total = acc(0)
                        for q in range(p, end):
                            total += acc(data[q]) * acc(Y[rows[q], j])
                        cuda.atomic.add(Z, (c, j), np.float64(total))
                    else:
                        column = 0.0
                        for q in range(p, end):
                            value = np.float64(data[q])
                            column += value
                            squares += value * value
                            if not math.isfinite(value):
                                bad = True
                        cuda.atomic.add(colsum, c, column)
                    p = end
            first += step * column_chunk
        if bad:
            record[1] = 1.0
        block_sum(squares, scratch, record)

    def transpose(A, B):
        """B = A^T, a thread per entry (grid-stride), in B's order: the writes are
        coalesced and the reads strided by A's row. It moves the matrix once in device
        memory, where the copy that it spares the host moves it at host memory's rate."""
        rows = B.shape[1]
        for e in range(cuda.grid(1), B.size, cuda.gridsize(1)):
            i, j = e // rows, e % rows
            B[i, j] = A[j, i]

    def small_product(A, B, C):
        """C = A B, a thread per entry of C (grid-stride). A row of A and all of B are
        read from cache after the first thread of a row has touched them."""
        for e in range(cuda.grid(1), C.size, cuda.gridsize(1)):
            i, j = e // C.shape[1], e % C.shape[1]
            total = 0.0
            for k in range(B.shape[0]):
                total += A[i, k] * B[k, j]
            C[i, j] = total

    def gram(Y, chunk_rows, G):
        """G += W^T W over one chunk of rows per thread block, for W = Y with columns of
        ones appended up to G's width; the upper triangle only. A thread per entry: all
        threads of a block read the same row at once, so each row of Y comes from device
        memory once per block."""
        cols, width = Y.shape[1], G.shape[0]
        first = cuda.blockIdx.x * chunk_rows
        last = min(first + chunk_rows, Y.shape[0])
        for e in range(cuda.threadIdx.x, width * width, cuda.blockDim.x):
            i, j = e // width, e % width
            if i <= j:
                total = 0.0
                for r in range(first, last):
                    left = Y[r, i] if i < cols else 1.0
                    right = Y[r, j] if j < cols else 1.0
                    total += left * right
                cuda.atomic.add(G, (i, j), total)

    def solve_rows(Y, R, Q):
        """Q = W R^-1 for W = Y with columns of ones appended up to R's width, R upper
        triangular: each row by forward substitution, a thread per row (grid-stride).
        Q may be Y itself when they are as wide: entry j of a row is read before it is
        written, and only after entries k < j."""
        cols, width = Y.shape[1], R.shape[0]
        for r in range(cuda.grid(1), Y.shape[0], cuda.gridsize(1)):
            for j in range(width):
                value = Y[r, j] if j < cols else 1.0
                for k in range(j):
                    value -= Q[r, k] * R[k, j]
                Q[r, j] = value / R[j, j]

    kernels = (dense_times, dense_transposed, dense_totals, csr_power, csr_times,
               csr_transposed, csr_totals, clear, column_counts, column_starts,
               csr_to_columns, columns_times, transpose, small_product, gram, solve_rows)

    def jit(kernel):
        # The simulator takes no launch bounds.
        if kernel in (dense_times, dense_transposed) and not config.ENABLE_CUDASIM:
            return cuda.jit(kernel, launch_bounds=(threads, DENSE_TILE_BLOCKS))
        return cuda.jit(kernel)

    return SimpleNamespace(**{kernel.__name__: jit(kernel) for kernel in kernels})
