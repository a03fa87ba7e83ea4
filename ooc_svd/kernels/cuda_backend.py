"""The CUDA backend: a pass's products on an NVIDIA GPU, with the copies of A overlapped.

A power pass does about 4l flops per element of A, far below what a GPU computes in the time
it takes to copy that element over PCIe, so the pass runs at the host-to-device bandwidth at
best. ``CUDAPowerSweep`` aims for it:

- each of ``streams`` CUDA streams (two by default) owns a pinned host buffer and a device
  buffer for one block; ``add`` waits until its stream's previous copy out of the pinned
  buffer is done (an event), copies the block into it, enqueues the asynchronous
  host-to-device copy and the kernels, and returns. Block i+1 is staged and copied while
  block i's kernels run on the other stream;
- the staging copy runs on several host threads (numpy releases the GIL): one thread copies
  about 10 GB/s, slower than a PCIe 4 or 5 link, and would otherwise cap the pass. It still
  costs two bytes of host memory traffic per byte of A besides the device's own read, so
  where host memory bandwidth is short, blocks that already lie in page-locked memory
  (``pinned_empty``: a block cache, or a reader decoding into it) skip it and are copied by
  the device directly, at the full host-to-device bandwidth;
- X, Z and the column sums stay on the device, and ``result()`` synchronizes and copies Z
  back once. The streams share one Z: every update of Z is an atomic add, which is safe
  between kernels running at once, and a copy per stream would double the L2 footprint of
  the CSR scatter targets (X and two Z's are 72 MB at n = 1e5, l = 30; an H100 has 50 MB).
  CSR blocks form Z += A^T Y by atomic scatters from their rows, or, with
  ``csr_transposed='columns'``, from a copy reordered by columns on the device (see
  ``kernels.cuda``), which its stream keeps beside the block.

The final pass (``CUDAFinalSweep``) keeps B^T on the device the same way and factors each
Y_i there too, by CholeskyQR rounds whose small Cholesky factors the host computes
(``factor_on_device``), while the next block is copied (see its docstring).

Device memory: per stream one block, up to three b x l matrices (Y_i, Q_i, Q_i S) and the
small factors of the final pass's QR and merges, and
with ``csr_transposed='columns'`` the block's column order; once, X and Z or the two
buffers of B^T (n x l), and the column sums. ``device_bytes`` gives the total for the
planner.

A NaN or Inf is found by the kernels, which record a flag and the sum of squares of every
block in its own slot on the device; ``result()`` reads the slots once and raises
``NonFiniteError`` naming the rows of the first offending block (a sweep never waits for a
block, so it cannot name the row inside it; the pass reads those rows again to name it,
``passes.PassContext.naming_the_row``). ``times`` and ``transposed_times`` are synchronous
and raise at once.

The CSR centering shift is applied algebraically, as on the CPU: the kernels compute
Z += A^T (A X - 1 s^T X) and the column sums and sum of squares of A, and the host turns
them into those of A_s = A - 1 s^T with the totals of the whole sweep:
sum_i 1^T (A_s,i X) = colsum(A_s)^T X, so Z_s = Z - s (colsum(A_s)^T X).
"""

from __future__ import annotations

import ctypes
import os
import sys
import weakref
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg

from ..errors import InputError, NonFiniteError, PlanError, check_int
from ..sources.csr import is_sparse_block
from ..tsqr import MergeFactors, StreamingTSQR, local_qr
from ..units import format_bytes
from .backend import SpillBlock
from .cpu import BlockStats, subtract_outer
from .csr import shifted_totals

STREAMS = 2
# The accumulation types of the kernels (``kernels.cuda.ACCUMULATE``), named here to check
# options without importing numba.cuda.
ACCUMULATIONS = ("float64", "float32")
# The ways of forming A^T Y for CSR blocks (CUDAKernels' csr_transposed).
CSR_TRANSPOSED = ("scatter", "columns")
# What svd's ``cuda_options`` may set: CUDAKernels keywords and their allowed values.
CUDA_OPTION_CHOICES = {"accumulate": ACCUMULATIONS, "csr_transposed": CSR_TRANSPOSED}
# Device slots for per-block totals: room for this many blocks, doubled when full.
RECORD_CAPACITY = 1024
# The staging copy is split between threads in pieces of at least this many bytes.
COPY_PIECE_BYTES = 4 << 20
# The final pass's CholeskyQR on the device (``factor_on_device``): a round that starts
# from a basis whose Gram matrix is this close to the identity (Frobenius norm) is the
# last; a block not there after this many rounds goes to the host's Householder QR.
ORTHOGONALITY_TOLERANCE = 0.1
MAX_CHOLESKY_ROUNDS = 6
UNIT_ROUNDOFF = np.finfo(np.float64).eps / 2
# Arrays packed into one staging buffer start at multiples of this (the device's own
# allocation alignment), so every array is aligned for coalesced loads.
ALIGNMENT = 256


class CUDAUnavailableError(InputError):
    """backend='cuda' was requested without a usable GPU; the message says what is missing."""


def cuda_available(allow_simulator: bool = True) -> tuple[bool, str]:
    """(whether the CUDA backend can run here, and why not when it cannot).

    Under numba's simulator (NUMBA_ENABLE_CUDASIM=1) the backend runs, very slowly, for
    tests; ``allow_simulator=False`` (for backend='auto') does not count it as a GPU, and
    first looks for the driver library itself: microseconds, where importing numba.cuda
    to find out costs about a second.
    """
    if not allow_simulator and not driver_library_loads():
        return False, "no NVIDIA driver library could be loaded"
    try:
        import numba_cuda  # noqa: F401 - the CUDA target that numba.cuda needs
        from numba import config, cuda
    except ImportError:
        return False, ("numba-cuda is not installed: install ooc_svd with its cuda extra "
                       "(pip install -e '.[cuda]' in its checkout)")
    if config.ENABLE_CUDASIM:
        return (True, "") if allow_simulator else (False, "only numba's CUDA simulator is on")
    error = cuda.cuda_error()
    if error is not None:
        return False, f"no usable NVIDIA driver ({' '.join(str(error).split())})"
    if not cuda.is_available():
        return False, "the CUDA compiler library (NVVM) was not found; reinstall the cuda extra"
    if len(cuda.gpus) == 0:
        return False, "the NVIDIA driver sees no CUDA device"
    shortfall = capability_shortfall(cuda)
    return (False, shortfall) if shortfall else (True, "")


def capability_shortfall(cuda: Any) -> str:
    """'' when the installed CUDA compiler builds kernels for the current GPU, else why
    not: NVRTC 13 targets compute capability 7.5 and up, so on an older GPU (a V100, a
    P100) the first launch would fail, where 'auto' should take the CPU."""
    try:
        from numba.cuda.cudadrv.nvrtc import get_lowest_supported_cc

        lowest = tuple(get_lowest_supported_cc())
    except Exception:  # a numba-cuda without it, or NVRTC not answering: the launch decides
        return ""
    # The device that numba opens unless a program selects another, read without
    # creating a context (which takes device memory) in a process that only asks.
    capability = tuple(cuda.gpus[0].compute_capability)
    if capability >= lowest:
        return ""
    return (f"the GPU's compute capability {capability[0]}.{capability[1]} is below "
            f"{lowest[0]}.{lowest[1]}, the lowest that the installed CUDA compiler (NVRTC) "
            "targets")


def driver_library_loads() -> bool:
    """Whether the NVIDIA driver library loads (or numba is told where it is)."""
    if os.environ.get("NUMBA_CUDA_DRIVER"):
        return True  # numba's own setting for a driver in an unusual place: let it look
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


def require_cuda() -> None:
    """Raise ``CUDAUnavailableError`` unless the CUDA backend can run here."""
    usable, reason = cuda_available()
    if not usable:
        raise _unavailable(reason)


def _unavailable(reason: str) -> CUDAUnavailableError:
    return CUDAUnavailableError(
        f"the cuda backend needs a usable NVIDIA GPU: {reason}; use the cpu backend")


def context_failure() -> str:
    """'' once the current GPU's CUDA context exists, else why it cannot be created: a GPU
    in exclusive-process mode that another process holds, or one whose memory is full,
    passes ``cuda_available``, which creates none (it takes device memory)."""
    from numba import cuda
    from numba.cuda.cudadrv.driver import CudaAPIError
    from numba.cuda.cudadrv.error import CudaSupportError

    try:
        cuda.current_context()
    except (CudaAPIError, CudaSupportError) as error:
        return (f"the GPU's CUDA context could not be created ({' '.join(str(error).split())}"
                "): another process may hold the GPU (exclusive-process mode), or its memory "
                "is full")
    return ""


def gpu_kernels(n: int, backend: str, need: DeviceNeed | None,
                cuda_options: dict | None) -> CUDAKernels | None:
    """The CUDA kernels of a run (here or on a worker) with ``backend`` 'cuda' or 'auto',
    or None where ``why_not_gpu`` leaves the run to the CPU."""
    if why_not_gpu(backend, need):
        return None
    return CUDAKernels(n, **(cuda_options or {}))


def why_not_gpu(backend: str, need: DeviceNeed | None) -> str:
    """'' when kernels with ``backend`` 'cuda' or 'auto' run on this machine's GPU, else
    why 'auto' leaves the run to the CPU: no usable GPU, or less than ``need`` free on it.
    'cuda' raises there, naming what is missing. Nothing is allocated on the GPU (asking
    for its free memory creates the CUDA context)."""
    if backend == "cuda":
        require_cuda()
        reason = context_failure()
        if reason:
            raise _unavailable(reason)
        if need is not None:
            need.check()
        return ""
    usable, reason = cuda_available(allow_simulator=False)
    if not usable:
        return reason
    reason = context_failure()
    if reason:
        return reason
    if need is not None and not need.fits():
        return need.shortfall()
    return ""


def gpu_choice(backend: str, need: DeviceNeed | None) -> tuple[bool, str]:
    """``why_not_gpu`` for reports: whether the GPU takes the run, and why (for the GPU,
    its name and the memory the run holds of what it has free)."""
    reason = why_not_gpu(backend, need)
    return (False, reason) if reason else (True, describe_gpu(need))


def describe_gpu(need: DeviceNeed | None) -> str:
    """The current GPU, and what of its free memory ``need`` would take."""
    from numba import cuda

    name = getattr(cuda.get_current_device(), "name", "numba's CUDA simulator")
    name = name.decode() if isinstance(name, bytes) else str(name)
    free = device_memory()[0]
    if need is None:
        return name
    return f"{name}, the passes hold {format_bytes(need.bytes)} of its {format_bytes(free)} free"


def check_cuda_options(options: Any) -> dict[str, Any]:
    """``svd``'s ``cuda_options`` as CUDAKernels keywords, checked without a GPU:
    'accumulate' ('float64' or 'float32'), 'csr_transposed' ('scatter' or 'columns') and
    'streams' (a positive int). None gives no options."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise InputError(f"cuda_options must be a dict, not {type(options).__name__}")
    for key, value in options.items():
        if key in CUDA_OPTION_CHOICES:
            if value not in CUDA_OPTION_CHOICES[key]:
                raise InputError(f"cuda_options[{key!r}] must be one of "
                                 f"{CUDA_OPTION_CHOICES[key]}, not {value!r}")
        elif key == "streams":
            check_int("cuda_options['streams']", value, minimum=1)
        else:
            known = ", ".join([*CUDA_OPTION_CHOICES, "streams"])
            raise InputError(f"unknown cuda option {key!r}; the options are {known}")
    return dict(options)


def device_bytes(n: int, l: int, block_bytes: int, rows: int | None = None,
                 streams: int = STREAMS, columns: bool = False, value_bytes: int = 4) -> int:
    """Device memory a pass holds for blocks of at most ``block_bytes`` bytes.

    ``rows`` bounds the rows of a block (Y is rows x l); by default, that of a float32
    block. Pass it for blocks of narrower values (int8 blocks have four times the rows of
    float32 ones, and Y, Q_i and Q_i S grow with the rows) and for CSR blocks (the scatter
    power sweep needs no Y, but the final pass does). ``l`` is the widest basis used (Krylov's
    is (q + 1) l). ``columns``: CSR blocks are also reordered by columns on the device
    (``csr_transposed='columns'``), with values of ``value_bytes`` each.
    """
    if rows is None:
        rows = block_bytes // (4 * max(n, 1))
    # Per stream, the final pass's Y_i, Q_i and Q_i S (the power pass needs only Y_i), the
    # small factors of its QR and merges (G, R, T and S, of l + 1 columns at most), and a
    # CSR block's indptr widened to int64; once, X and the two buffers of B^T (or X and
    # Z), the column sums and the shift.
    per_stream = block_bytes + 3 * 8 * rows * l + 4 * 8 * (l + 1) ** 2 + 8 * (rows + 1)
    if columns:
        # The values and their int32 rows: (v + 4) bytes a non-zero where the block holds
        # at least v + 1 (indices of a byte or more, written by other tools); and three
        # int64 arrays of n + 1: counts, starts and cursor.
        entry = value_bytes + 4
        per_stream += -(-block_bytes * entry // (entry - 3)) + 3 * 8 * (n + 1)
    return streams * per_stream + 8 * (3 * n * l + 2 * n) + 16 * RECORD_CAPACITY


@dataclass(frozen=True)
class DeviceNeed:
    """What a run's passes hold on one GPU: ``bytes`` in all (``device_bytes``), for blocks
    of up to ``block_bytes`` and n x l arrays of l = ``width``."""

    bytes: int
    block_bytes: int
    width: int

    @classmethod
    def of_plan(cls, n: int, plan: Any, cuda_options: dict) -> DeviceNeed:
        """For ``plan`` (a ``plan.Plan``) run with ``cuda_options``."""
        width = max(plan.basis_size, plan.krylov_width) + 1  # the final pass's ones column
        columns = plan.sparse and cuda_options.get("csr_transposed") == "columns"
        needed = device_bytes(n, width, max(plan.block_bytes), rows=plan.block_rows,
                              streams=cuda_options.get("streams", STREAMS), columns=columns,
                              value_bytes=plan.itemsize)
        return cls(needed, max(plan.block_bytes), width)

    def fits(self) -> bool:
        """Whether the current GPU has that much free."""
        return self.bytes <= device_memory()[0]

    def check(self) -> None:
        """PlanError, with the numbers, unless the current GPU has that much free."""
        if not self.fits():
            raise PlanError(f"{self.shortfall()}: lower the memory limit (smaller blocks) or "
                            "use the cpu backend")

    def shortfall(self) -> str:
        """What the current GPU has free against this need, in words."""
        return (f"the GPU has {format_bytes(device_memory()[0])} free; blocks of "
                f"{format_bytes(self.block_bytes)} with n x l arrays of l={self.width} need "
                f"{format_bytes(self.bytes)} there")


# The driver's CUresult for memory that cannot be had, on the device or page-locked host.
CUDA_ERROR_OUT_OF_MEMORY = 2


@contextmanager
def out_of_memory_named(need: DeviceNeed | None = None):
    """The driver's out-of-memory error, raised mid-run, as a PlanError that says why and
    what to change. The plan checks the GPU's free memory before the first pass but holds
    none of it until blocks arrive, so another process that starts on the same GPU (a
    second run, a dask worker of its own) can take it in between; page-locked host buffers
    fail with the same error when the host's locked memory runs out."""
    from numba.cuda.cudadrv.driver import CudaAPIError

    try:
        yield
    except CudaAPIError as error:
        code = getattr(error, "code", error.args[0])  # the simulator's keeps it in args
        if getattr(code, "value", code) != CUDA_ERROR_OUT_OF_MEMORY:
            raise
        planned = f" (the passes hold {format_bytes(need.bytes)} there)" if need else ""
        named = PlanError(
            f"the GPU ran out of memory during the run{planned}: another process on the "
            "same GPU may have taken what was free when the run began, or the host ran out "
            "of page-locked memory; run one process per GPU, lower the memory limit "
            "(smaller blocks), or use the cpu backend")
        # Where the run kept its completed passes (api's failure handler marked the error)
        named.kept_checkpoint = getattr(error, "kept_checkpoint", None)
        raise named from error


def device_memory() -> tuple[int, int]:
    """(free, total) bytes of the current device's memory."""
    from numba import cuda

    free_deferred(cuda)  # memory let go but still queued counts as free
    free, total = cuda.current_context().get_memory_info()
    # The simulator reports unlimited (infinite) memory.
    return int(min(free, 2**62)), int(min(total, 2**62))


def free_deferred(cuda: Any) -> None:
    """Free now the device and page-locked memory that numba queued for freeing: it
    empties its queue only past 10 entries or a fifth of the device's memory, or when an
    allocation fails, so memory let go would otherwise stay taken, for the driver's count
    of free memory and for other libraries in the process."""
    context = cuda.current_context()
    # Memory goes to its memory manager's queue (streams, events and modules to the
    # context's); the simulator has neither, a plugin manager maybe not the first.
    for owner in (getattr(context, "memory_manager", None), context):
        deallocations = getattr(owner, "deallocations", None)
        if deallocations is not None:
            deallocations.clear()


class CUDAKernels:
    """numba-cuda kernels on the current GPU.

    Parameters
    ----------
    n : int
        Columns of the matrix.
    accumulate : {'float64', 'float32'}, default='float64'
        Type of the kernels' running sums (a row's over its columns, Z's over a chunk of
        rows; see ``kernels.cuda``); float32 loses the directions below about 3e-4 sigma_1,
        more on long sums, and is for GPUs with a small float64 rate. A^T Q, B^T of the
        final pass, is summed in float64 either way.
    streams : int, default=2
        CUDA streams, each with one pinned and one device buffer of a block.
    copy_threads : int, optional
        Host threads for the staging copy; by default up to 8, one per core.
    geometry : kernels.cuda.Geometry, optional
        Thread-block shapes; by default the full-size ones on a GPU and tiny ones under the
        simulator.
    csr_transposed : {'scatter', 'columns'}, default='scatter'
        How CSR blocks' A^T Y is formed: 'scatter' adds each non-zero's row of products
        into Z with float64 atomics, from the rows as stored; 'columns' first reorders the
        block by columns on the device (``kernels.cuda.BlockKernels.csr_to_columns``), then
        sums each column's products in registers, with an atomic per column run instead of
        per non-zero, at the cost of a second copy of the block in device memory.

    The staging buffers persist between passes (pinned allocations are slow) until
    ``close()``; one sweep at a time.
    """

    name = "cuda"

    def __init__(self, n: int, *, accumulate: str = "float64", streams: int = STREAMS,
                 copy_threads: int | None = None, geometry: Any = None,
                 csr_transposed: str = "scatter"):
        if csr_transposed not in CSR_TRANSPOSED:
            raise ValueError(f"csr_transposed must be one of {CSR_TRANSPOSED}, not "
                             f"{csr_transposed!r}")
        require_cuda()
        from numba import config, cuda

        from . import cuda as device_kernels

        if geometry is None:
            geometry = (device_kernels.SIMULATOR_GEOMETRY if config.ENABLE_CUDASIM
                        else device_kernels.DEFAULT_GEOMETRY)
        self.cuda = cuda
        self.n = n
        self.csr_transposed = csr_transposed
        self.kernels = device_kernels.BlockKernels(accumulate, geometry)
        # B = Q^T A (the final pass's A^T Q) is summed in float64 whatever ``accumulate``
        # is: the residual is ||A||^2 - ||B||^2, which float32 tiles would leave about
        # eps32 ||A||^2 off, far above a small residual.
        self.float64_kernels = (self.kernels if accumulate == "float64"
                                else device_kernels.BlockKernels("float64", geometry))
        self.streams = [_StagingStream(cuda) for _ in range(max(1, streams))]
        self.copier = _HostCopier(copy_threads or min(8, os.cpu_count() or 1))
        # The final pass hands each Q_i to the spill from this thread, in block order.
        self.delivery = ThreadPoolExecutor(1)
        self.pinned_ranges: set[tuple[int, int]] = set()  # (start, end) host addresses
        # The event after the latest block's copy: each copy waits for the one before it.
        self.last_copy: Any = None

    def power_sweep(self, X: np.ndarray, stats: BlockStats) -> CUDAPowerSweep:
        return CUDAPowerSweep(self, X, stats)

    def final_sweep(self, X: np.ndarray, stats: BlockStats, append_ones: bool,
                    spill: SpillBlock) -> CUDAFinalSweep:
        return CUDAFinalSweep(self, X, stats, append_ones, spill)

    def times(self, block, first_row, X, shift, stats, out=None):
        """Y = A_s X for one block, a (b, l) float64 F-order array (``out`` if given).

        X is copied to the device once for the calls that pass the same object (the final
        and residual passes keep theirs, unchanged, for the whole pass).
        """
        rows, l = block.shape[0], X.shape[1]
        Y = np.empty((rows, l), order="F") if out is None else out
        if rows == 0:
            return Y
        lane, cuda = self.streams[0], self.cuda
        arrays = self.upload(lane, block)
        lane.holds = weakref.ref(block)  # for a transposed_times call with the same block
        device_X = lane.scratch("X", *X.shape)
        if lane.holds_x is None or lane.holds_x() is not X:
            self.matrix_to_device(X, lane.stream, out=device_X)
            lane.holds_x = weakref.ref(X)
        # The lane's scratch, which ``device_bytes`` counts (a final sweep left it there)
        device_Y = lane.scratch("Y", rows, l)
        device_shift = cuda.to_device(np.asarray(shift, dtype=np.float64), lane.stream)
        if is_sparse_block(block):
            sX = cuda.to_device(shift @ X, lane.stream)
            self.kernels.csr_times(lane.stream, *arrays, device_X, sX, device_Y)
        else:
            self.kernels.dense_times(lane.stream, *arrays, device_shift, device_X, device_Y)
        if stats is not None:
            self._add_totals(lane, block, arrays, device_shift, first_row, shift, stats)
        # Y_i's transpose passes through the lane's Q_i scratch, which times leaves free.
        self.fortran_home(device_Y, lane.stream, out=Y,
                          spare=lane.scratch("Q", rows, l).reshape(-1))
        return Y

    def transposed_times(self, block, first_row, Q, shift, stats):
        """C^T = A_s^T Q for one block, an (n, l) float64 F-order array.  Q : (b, l).

        A block given to the ``times`` call just before (the same object; the final and
        residual passes never change a block in between) is not copied again.
        """
        n, l = block.shape[1], Q.shape[1]
        lane, cuda = self.streams[0], self.cuda
        if block.shape[0] == 0:
            return np.zeros((n, l), order="F")
        resident = lane.holds is not None and lane.holds() is block
        arrays = lane.arrays if resident else self.upload(lane, block)
        lane.holds = None
        # Q's transpose goes up through the lane's Y_i scratch, free once times returned.
        device_Q = self.matrix_to_device(Q, lane.stream, out=lane.scratch("Q", *Q.shape),
                                         spare=lane.scratch("Y", *Q.shape).reshape(-1))
        device_shift = cuda.to_device(np.asarray(shift, dtype=np.float64), lane.stream)
        CT = lane.scratch("C^T", n, l)
        self.kernels.zero(lane.stream, CT.reshape(-1))
        if is_sparse_block(block):
            self.csr_transposed_times(lane, arrays, device_Q, CT)
        else:
            self.float64_kernels.dense_transposed(lane.stream, *arrays, device_shift,
                                                  device_Q, CT)
        self._add_totals(lane, block, arrays, device_shift, first_row, shift, stats)
        result = self.fortran_home(CT, lane.stream, spare=lane.scratch("C", l, n).reshape(-1))
        if is_sparse_block(block):
            subtract_outer(result, np.asarray(shift, dtype=np.float64), Q.sum(axis=0))
        return result

    def csr_transposed_times(self, lane: _StagingStream, arrays: list, Y, Z,
                             columns: tuple | None = None) -> None:
        """Enqueue Z += A^T Y for the CSR block on ``lane`` (its device ``arrays``), by
        ``csr_transposed``; ``columns``: the block already in column order (``to_columns``).
        In float64 whatever ``accumulate`` is: Z is a final pass's B^T."""
        if self.csr_transposed == "scatter":
            self.float64_kernels.csr_transposed(lane.stream, *arrays, Y, Z)
            return
        if columns is None:
            columns = self.to_columns(lane, arrays)
        self.float64_kernels.columns_times(lane.stream, *columns, Y, Z)

    def to_columns(self, lane: _StagingStream, arrays: list) -> tuple:
        """Enqueue the reordering of the CSR block on ``lane`` by columns, into the lane's
        buffers: its (values, rows, column starts), valid until the lane's next block."""
        data, indices, indptr = arrays
        if indptr.size - 1 >= 2**31:
            raise ValueError("the column order keeps rows as int32: at most 2**31 - 1 rows "
                             "per block")
        n, nnz = self.n, data.size
        counts = lane.scratch("column counts", n + 1, 1, np.int64).reshape(-1)
        starts = lane.scratch("column starts", n + 1, 1, np.int64).reshape(-1)
        cursor = lane.scratch("column cursor", n, 1, np.int64).reshape(-1)
        column_data = lane.scratch("column data", nnz, 1, data.dtype).reshape(-1)
        column_rows = lane.scratch("column rows", nnz, 1, np.int32).reshape(-1)
        self.kernels.csr_to_columns(lane.stream, data, indices, indptr, counts, starts,
                                    cursor, column_data, column_rows)
        return column_data, column_rows, starts

    def matrix_to_device(self, M: np.ndarray, stream, out=None, spare=None):
        """M (r, c) as a C-ordered float64 device matrix (``out`` if given), ready when
        this returns. An F-ordered M, as a QR gives the basis X, goes up as M^T, which is
        C-ordered already, and is transposed on the device, in ``spare`` (a flat float64
        device buffer of at least r c, free until then) or a new buffer: numpy's
        transposing copy took 9 ms for 1e5 x 30 on 2 cores, per pass.
        """
        M = np.asarray(M, dtype=np.float64)
        if out is None:
            out = self.cuda.device_array(M.shape)
        if M.size and M.flags.f_contiguous and not M.flags.c_contiguous:
            staged = _flat(self.cuda, spare, M.size).reshape(M.shape[::-1])
            staged.copy_to_device(M.T, stream=stream)
            self.kernels.transpose(stream, staged, out)
        elif M.size:
            out.copy_to_device(np.ascontiguousarray(M), stream=stream)
        stream.synchronize()
        return out

    def fortran_home(self, M, stream, out: np.ndarray | None = None, spare=None
                     ) -> np.ndarray:
        """A C-ordered (r, c) device matrix as an F-ordered host array (``out`` if given),
        after the work queued on ``stream``: transposed on the device (into ``spare``, as
        in ``matrix_to_device``) and copied home as M^T, whose C order is M's F order. On
        the host, numpy's F-order copy of Z took 6 ms for 1e5 x 30 on 2 cores."""
        rows, cols = M.shape
        straight_into_out = out is not None and out.T.flags.c_contiguous
        home = out.T if straight_into_out else np.empty((cols, rows))
        if M.size:
            transposed = _flat(self.cuda, spare, M.size).reshape(cols, rows)
            self.kernels.transpose(stream, M, transposed)
            transposed.copy_to_host(home, stream=stream)
            stream.synchronize()
        if out is None:
            return home.T
        if not straight_into_out:
            out[...] = home.T
        return out

    def pinned_empty(self, shape, dtype=np.float32) -> np.ndarray:
        """An uninitialized page-locked host array. A block in such memory (a dense block,
        or all three arrays of a CSR block) is copied to the device directly, without the
        staging copy; it must not change until the sweep's ``result()``."""
        if np.prod(shape) == 0:
            return np.empty(shape, dtype)  # nothing to copy; page-locking zero bytes fails
        array = self.cuda.pinned_array(shape, dtype=dtype)
        span = (array.ctypes.data, array.ctypes.data + array.nbytes)
        self.pinned_ranges.add(span)
        weakref.finalize(array, self.pinned_ranges.discard, span)
        return array

    def keep(self, block):
        """A page-locked copy of a block for the block cache: later passes send it to the
        device directly, at the pinned bandwidth, instead of through a staging copy."""
        if is_sparse_block(block):
            parts = [block.data, block.indices, np.asarray(block.indptr, dtype=np.int64)]
        else:
            parts = [block]
        copies = []
        for part in parts:
            copy = self.pinned_empty(part.shape, part.dtype)
            self.copier.copy(np.ascontiguousarray(part), copy)
            copies.append(copy)
        if not is_sparse_block(block):
            return copies[0]
        return type(block)(copies[0], copies[1], copies[2], block.n_cols)

    def close(self) -> None:
        """Release the staging buffers, device and pinned, and the copy threads: also
        those that a failed sweep, still referenced by its error's traceback, reaches."""
        self.delivery.shutdown()  # first: a queued delivery still copies on the copier
        for lane in self.streams:
            lane.release()
        self.streams = []
        self.copier.close()
        with suppress(Exception):  # a device in error may refuse; closing goes on
            free_deferred(self.cuda)

    def upload(self, lane: _StagingStream, block) -> list:
        """Start copying a block to ``lane``'s device buffer; its device arrays (A, or data,
        indices and indptr)."""
        if is_sparse_block(block):
            parts = [block.data, block.indices, np.asarray(block.indptr, dtype=np.int64)]
        else:
            parts = [block]
        direct = all(self._page_locked(part) for part in parts)
        arrays = lane.upload(parts, self.copier, direct, after=self.last_copy)
        self.last_copy = lane.staged
        return arrays

    def _page_locked(self, array: np.ndarray) -> bool:
        start = array.ctypes.data
        return array.flags.c_contiguous and any(
            low <= start and start + array.nbytes <= high for low, high in self.pinned_ranges)

    def _add_totals(self, lane, block, arrays, device_shift, first_row, shift, stats) -> None:
        """Add the block's totals of A_s to ``stats``, raising NonFiniteError on NaN/Inf."""
        cuda, rows = self.cuda, block.shape[0]
        colsum = cuda.to_device(np.zeros(block.shape[1]), lane.stream)
        record = cuda.to_device(np.zeros(2), lane.stream)
        if is_sparse_block(block):
            self.kernels.csr_totals(lane.stream, arrays[0], arrays[1], colsum, record)
        else:
            self.kernels.dense_totals(lane.stream, arrays[0], device_shift, colsum, record)
        record = record.copy_to_host(stream=lane.stream)
        colsum = colsum.copy_to_host(stream=lane.stream)
        lane.stream.synchronize()
        raise_if_not_finite(record[None], [(first_row, rows)])
        sumsq = float(record[0])
        if is_sparse_block(block):
            colsum, sumsq = shifted_totals(colsum, sumsq, rows, shift)
        stats.colsum += colsum
        stats.sumsq += sumsq
        stats.rows += rows


class _DeviceSweep:
    """What the power and final sweeps share: X on the device, the sweep's column sums and
    per-block records there, and the first block fixing the kind of blocks and the shift.

    All blocks are dense, or all CSR, with one shift (a pass reads one source with one
    centering shift).
    """

    def __init__(self, backend: CUDAKernels, X: np.ndarray, stats: BlockStats):
        cuda = backend.cuda
        self.backend, self.stats = backend, stats
        self.X = np.asarray(X, dtype=np.float64)
        # Set-up work runs on the first lane, and each step below waits for it.
        setup = backend.streams[0].stream
        self.device_X = backend.matrix_to_device(self.X, setup)
        self.colsum = cuda.device_array(X.shape[0])
        backend.kernels.zero(setup, self.colsum)
        self.records = _BlockRecords(cuda, setup)
        setup.synchronize()
        self.shift: np.ndarray | None = None
        self.sparse: bool | None = None
        self.rows = 0
        self.turn = 0

    def _next_lane(self) -> _StagingStream:
        lanes = self.backend.streams
        self.turn += 1
        return lanes[(self.turn - 1) % len(lanes)]

    def _check(self, block, shift: np.ndarray) -> None:
        """The first block fixes the kind of blocks and the shift of the sweep."""
        cuda = self.backend.cuda
        if self.sparse is None:
            self.sparse = is_sparse_block(block)
            self.shift = np.asarray(shift, dtype=np.float64)
            setup = self.backend.streams[0].stream
            self.device_shift = cuda.to_device(self.shift, setup)
            self.device_sX = cuda.to_device(self.shift @ self.X, setup)
            # Waited for, not left to the legacy default stream's ordering of the copies
            # before the lanes' kernels, which a per-thread default stream does not keep.
            setup.synchronize()
        elif is_sparse_block(block) != self.sparse:
            raise TypeError("a sweep takes dense blocks or CSR blocks, not both")
        elif shift is not self.shift and not np.array_equal(shift, self.shift):
            raise ValueError("a pass keeps one centering shift for all its blocks")

    def _let_go_of_device(self, *names: str) -> None:
        """Drop the sweep's device arrays (these and ``names``) once its result is home.
        A cluster task closes its kernels while its sweep is still referenced; held until
        then, they were queued for freeing after the close's flush and stayed taken."""
        for name in ("device_X", "colsum", "records", "device_shift", "device_sX", *names):
            setattr(self, name, None)

    def _add_sweep_totals(self) -> np.ndarray:
        """Wait for the device, raise NonFiniteError for a block with NaN or Inf, and add
        the sweep's totals of A_s to ``stats``; returns the column sums of A_s."""
        self.backend.cuda.synchronize()
        records = self.records.read()
        raise_if_not_finite(records, self.records.rows)
        colsum = self.colsum.copy_to_host()
        sumsq = float(records[:, 0].sum())
        if self.sparse:
            colsum, sumsq = shifted_totals(colsum, sumsq, self.rows, self.shift)
        self.stats.colsum += colsum
        self.stats.sumsq += sumsq
        self.stats.rows += self.rows
        return colsum


class CUDAPowerSweep(_DeviceSweep):
    """Z = sum_i A_s,i^T (A_s,i X) over the blocks given to ``add``, on the GPU.

    ``add`` returns once the block is staged and its copy and kernels are enqueued; the
    caller may then drop or reuse the block, except a block in page-locked memory
    (``CUDAKernels.pinned_empty``), which the device reads where it lies and which must not
    change until ``result()``.
    """

    def __init__(self, backend: CUDAKernels, X: np.ndarray, stats: BlockStats):
        super().__init__(backend, X, stats)
        self.Z = backend.cuda.device_array(X.shape)
        setup = backend.streams[0].stream
        backend.kernels.zero(setup, self.Z.reshape(-1))
        setup.synchronize()

    def add(self, block, first_row: int, shift: np.ndarray) -> None:
        self._check(block, shift)
        if block.shape[0] == 0:
            return
        lane = self._next_lane()
        record = self.records.slot(first_row, block.shape[0])
        arrays = self.backend.upload(lane, block)
        kernels, stream = self.backend.kernels, lane.stream
        if self.sparse and self.backend.csr_transposed == "columns":
            Y = lane.scratch("Y", block.shape[0], self.X.shape[1])
            kernels.csr_times(stream, *arrays, self.device_X, self.device_sX, Y)
            columns = self.backend.to_columns(lane, arrays)
            kernels.columns_times(stream, *columns, Y, self.Z, self.colsum, record)
        elif self.sparse:
            kernels.csr_power(stream, *arrays, self.device_X, self.device_sX, self.Z,
                              self.colsum, record)
        else:
            (A,) = arrays
            Y = lane.scratch("Y", A.shape[0], self.X.shape[1])
            kernels.dense_totals(stream, A, self.device_shift, self.colsum, record)
            kernels.dense_times(stream, A, self.device_shift, self.device_X, Y)
            kernels.dense_transposed(stream, A, self.device_shift, Y, self.Z)
        self.rows += block.shape[0]

    def result(self) -> np.ndarray:
        """Z (n, l) float64 F-order; adds the sweep's totals to ``stats``."""
        colsum = self._add_sweep_totals()
        # X's device copy, no longer read, holds Z^T on its way home.
        Z = self.backend.fortran_home(self.Z, self.backend.streams[0].stream,
                                      spare=self.device_X.reshape(-1))
        if self.sparse:
            subtract_outer(Z, self.shift, colsum @ self.X)
        self._let_go_of_device("Z")
        return Z


@dataclass
class _PendingBlock:
    """A block of the final sweep whose Y_i is being computed on the device."""

    lane: _StagingStream
    arrays: list  # the block's device arrays, resident until the lane's next upload
    first_row: int
    rows: int
    Y: Any  # (rows, l) device matrix: Y_i = A_s,i X
    columns: tuple | None = None  # a CSR block in column order, when the backend uses it


@dataclass
class _HomewardQ:
    """Block ``index``'s Q_i on its way to the spill: on the host already (``Q_i``, a
    block factored there), or being copied into its lane's ``pinned`` buffer until the
    event ``arrived``."""

    index: int
    lane: _StagingStream
    merge: MergeFactors | None
    Q_i: np.ndarray | None = None
    pinned: np.ndarray | None = None
    arrived: Any = None


class CUDAFinalSweep(_DeviceSweep):
    """The final pass's streaming TSQR with B^T on the device.

    Per block, on its lane's stream: the copy of the block, Y_i = A_s,i X and the block's
    totals. Y_i = Q_i R_i is factored on the device (``factor_on_device``), with the host
    computing only the Cholesky factors of small Gram matrices, or, for a block with fewer
    rows than columns or a column that stays zero, by LAPACK's Householder QR on the host.
    The host merges R_i into R, which gives the merge factors T and S; the device computes
    B^T <- B^T T + A_s,i^T (Q_i S) with the block still resident, without a C_i^T, and
    copies Q_i into the lane's pinned buffer. The host works on block i only once block
    i + 1 is enqueued (``add`` finishes the block before it), so block i + 1's copy runs
    while block i is factored. Updates of B^T, on alternating streams, are ordered by an
    event. Only Q_i (b x l) crosses the bus besides the block (and Y_i too for a block
    factored on the host).

    Q_i reaches the spill a block later, from the backend's delivery thread, in block
    order: once the next block is factored (its copy home has long arrived by then) the
    host hands it over, and the thread copies it out of the pinned buffer into a new array
    (the spill may keep it) and calls the spill. That copy faults in the new pages (5-6
    GB/s on an H100's host) and took 20-25 ms of each CSR block's 45 ms there when the
    host made it itself. The host waits for it before it factors the lane's next block,
    so it overlaps only the caller's next read and the start of the block after: the
    dense final sweeps gained 26-37%, and CSR ones, whose Q_i is half a block's bytes,
    still wait on it. (Waiting only before the pinned buffer is written again measured
    slower in one run, on a machine that ran every sweep slower; not kept.) An error of
    the sweep waits for the deliveries handed over, and stops the later ones, before it
    reaches the caller.

    Every lane's buffers are reused two blocks later; each reuse is ordered after the work
    that read them by the lane's stream (a block's upload after its B^T update, which the
    host enqueues first) or by the host (a block is factored before the next ``add``, and
    a lane's pinned Q_i is delivered before the lane's next block is factored).

    CSR blocks get the shift algebraically, as in the power sweep: the device accumulates
    A^T (Q_i S), and the host keeps w = (1^T Q)-part with the same merges,
    w <- T^T w + S^T Q_i^T 1 (on the delivery thread, which has Q_i), and subtracts
    shift w^T at the end.
    """

    def __init__(self, backend: CUDAKernels, X: np.ndarray, stats: BlockStats,
                 append_ones: bool, spill: SpillBlock):
        super().__init__(backend, X, stats)
        cuda = backend.cuda
        n, l = X.shape
        self.append_ones, self.spill = append_ones, spill
        self.tsqr = StreamingTSQR()
        # B^T (n x r, r growing to l + append_ones while blocks are short) lives in one of
        # two flat buffers; each update reads one and writes the other.
        self.buffers = [cuda.device_array(n * (l + append_ones)) for _ in range(2)]
        self.BT = self.buffers[0][:0].reshape(n, 0)
        self.ones_part = np.zeros(0)  # w, for the CSR shift
        self.updated = cuda.event()  # recorded after each update of B^T
        self.pending: _PendingBlock | None = None
        self.factored_on_host = 0  # blocks that ``factor_on_device`` left to the host
        self.in_transit: _HomewardQ | None = None  # the last block's Q_i, on its way home
        self.deliveries: list[Future] = []  # handed to the delivery thread, not yet seen done
        self.failed = False  # the sweep raised, or a spill did: no more spill calls

    def add(self, block, first_row: int, shift: np.ndarray) -> None:
        with self._settling_deliveries():
            self._check(block, shift)
            lane = self._next_lane()
            if self.pending is not None and self.pending.lane is lane:  # a single stream
                self._finish(self.pending)
                self.pending = None
            started = self._start(block, first_row, lane)
            if self.pending is not None:
                self._finish(self.pending)
            self.pending = started

    def result(self) -> StreamingTSQR:
        with self._settling_deliveries():
            if self.pending is not None:
                self._finish(self.pending)
                self.pending = None
            self._deliver()
            for delivery in self.deliveries:
                delivery.result()  # raises what the spill raised
        self._add_sweep_totals()
        # The buffer that the next update would have written holds B^T's transpose.
        spare = self.buffers[(self.tsqr.blocks + 1) % 2]
        BT = self.backend.fortran_home(self.BT, self.backend.streams[0].stream, spare=spare)
        if self.sparse and BT.size:
            subtract_outer(BT, self.shift, self.ones_part)
        self.tsqr.BT = BT
        self._let_go_of_device("buffers", "BT")
        return self.tsqr

    def _start(self, block, first_row: int, lane: _StagingStream) -> _PendingBlock:
        """Enqueue the block's copy, Y_i = A_s,i X and its totals."""
        rows, l = block.shape[0], self.X.shape[1]
        Y = lane.scratch("Y", rows, l)
        if rows == 0:
            return _PendingBlock(lane, [], first_row, 0, Y)
        record = self.records.slot(first_row, rows)
        arrays = self.backend.upload(lane, block)
        kernels, stream = self.backend.kernels, lane.stream
        columns = None
        if self.sparse:
            kernels.csr_times(stream, *arrays, self.device_X, self.device_sX, Y)
            kernels.csr_totals(stream, arrays[0], arrays[1], self.colsum, record)
        else:
            kernels.dense_times(stream, arrays[0], self.device_shift, self.device_X, Y)
            kernels.dense_totals(stream, arrays[0], self.device_shift, self.colsum, record)
        if self.sparse and self.backend.csr_transposed == "columns":
            columns = self.backend.to_columns(lane, arrays)
        self.rows += rows
        return _PendingBlock(lane, arrays, first_row, rows, Y, columns)

    def _finish(self, block: _PendingBlock) -> None:
        """Factor Y_i, enqueue the update of B^T and Q_i's copy home, and hand the
        blocks before it to the delivery thread."""
        lane = block.lane
        if self.in_transit is not None and self.in_transit.lane is lane:  # a single stream
            self._deliver()
        lane.await_delivery()  # its pinned Q_i buffer is free again
        width = self.X.shape[1] + self.append_ones
        factored = factor_on_device(self.backend.kernels, lane, block.Y, width)
        if factored is None:
            self.factored_on_host += block.rows > 0
            Q_i, R_i = self._factor_on_host(block)
            device_Q = None
        else:
            (device_Q, R_i), Q_i = factored, None
        merge = self.tsqr.add_r(R_i)
        homeward = _HomewardQ(self.tsqr.blocks - 1, lane, merge, Q_i)
        if device_Q is not None:
            homeward.pinned = lane.pinned("Q", *device_Q.shape)
            device_Q.copy_to_host(homeward.pinned, stream=lane.stream)
            homeward.arrived = self.backend.cuda.event()
            homeward.arrived.record(lane.stream)
        shape = Q_i.shape if device_Q is None else device_Q.shape
        self._update_bt(block, shape, Q_i, device_Q, merge)
        self._deliver()
        self.in_transit = homeward
        while self.deliveries and self.deliveries[0].done():
            self.deliveries.pop(0).result()  # raises what the spill raised

    def abort(self) -> None:
        """Stop the deliveries not yet begun, and wait for those begun: the caller closes
        the spill after this, and no spill call may come after."""
        self.failed = True
        futures_wait(self.deliveries)

    @contextmanager
    def _settling_deliveries(self):
        """An error of the sweep's own aborts it before it reaches the caller."""
        try:
            yield
        except BaseException:
            self.abort()
            raise

    def _deliver(self) -> None:
        """Hand the Q_i in transit, if any, to the delivery thread once it has arrived."""
        item, self.in_transit = self.in_transit, None
        if item is None:
            return
        if item.arrived is not None:
            item.arrived.synchronize()
        item.lane.delivery = self.backend.delivery.submit(self._spill_block, item)
        self.deliveries.append(item.lane.delivery)

    def _spill_block(self, item: _HomewardQ) -> None:
        """On the delivery thread: Q_i in a new host array (the spill may keep it), the
        CSR shift's w updated with it, and the spill called; nothing once the sweep or
        an earlier spill failed."""
        if self.failed:
            return
        Q_i = item.Q_i
        if Q_i is None:
            Q_i = np.empty(item.pinned.shape)
            self.backend.copier.copy(item.pinned, Q_i.reshape(-1).view(np.uint8))
        if self.sparse:
            rows, r_i = Q_i.shape
            merge = item.merge
            T, S = (np.zeros((0, r_i)), np.eye(r_i)) if merge is None else (merge.T, merge.S)
            # 1^T Q_i by BLAS: numpy's sum over Q_i's rows, on one core, took a quarter of a
            # CSR final sweep's time
            self.ones_part = self.ones_part @ T + (np.ones(rows) @ Q_i) @ S
        try:
            self.spill(item.index, Q_i, item.merge)
        except BaseException:
            self.failed = True
            raise

    def _factor_on_host(self, block: _PendingBlock) -> tuple[np.ndarray, np.ndarray]:
        """Y_i = Q_i R_i by LAPACK, Y_i copied home; NonFiniteError if it is not finite."""
        lane, l = block.lane, self.X.shape[1]
        host_Y = lane.pinned("Y", block.rows, l)
        if block.rows:
            block.Y.copy_to_host(host_Y, stream=lane.stream)
            lane.stream.synchronize()
        Y = np.empty((block.rows, l + self.append_ones), order="F")
        Y[:, :l] = host_Y
        if self.append_ones:
            Y[:, l] = 1.0
        Q_i, R_i = local_qr(Y)
        if not np.isfinite(R_i).all():
            self._raise_not_finite(block)
        return Q_i, R_i

    def _update_bt(self, block: _PendingBlock, shape: tuple[int, int], Q_i: np.ndarray | None,
                   device_Q: Any, merge: MergeFactors | None) -> None:
        """Enqueue B^T <- B^T T + A_s,i^T (Q_i S) on the block's stream (for the first
        block, T has no rows and S = I), for Q_i of ``shape`` on the device, or on the host
        (``Q_i``), whence it is uploaded."""
        kernels = self.backend.kernels
        lane, stream = block.lane, block.lane.stream
        rows, r_i = shape
        T = np.zeros((0, r_i)) if merge is None else merge.T
        r_new = T.shape[1]
        P = device_Q
        if rows and P is None:
            host_Q = lane.pinned("Q", rows, r_i)
            np.copyto(host_Q, Q_i)
            P = lane.scratch("Q", rows, r_i)
            P.copy_to_device(host_Q, stream=stream)
        device_T = lane.small_to_device("T", T)
        if rows and merge is not None:
            Q_dev, P = P, lane.scratch("P", rows, r_new)
            kernels.small_product(stream, Q_dev, lane.small_to_device("S", merge.S), P)
        self.updated.wait(stream)  # the previous update, on the other stream
        n = self.X.shape[0]
        target = self.buffers[self.tsqr.blocks % 2][: n * r_new].reshape(n, r_new)
        kernels.small_product(stream, self.BT, device_T, target)
        if P is not None and self.sparse:
            self.backend.csr_transposed_times(lane, block.arrays, P, target, block.columns)
        elif P is not None:
            self.backend.float64_kernels.dense_transposed(stream, block.arrays[0],
                                                          self.device_shift, P, target)
        self.updated.record(stream)
        self.BT = target

    def _raise_not_finite(self, block: _PendingBlock) -> None:
        """Y_i is not finite: name the rows, as NaN or Inf in A, or as an overflow."""
        self.backend.cuda.synchronize()
        raise_if_not_finite(self.records.read(), self.records.rows)
        first, last = block.first_row, block.first_row + block.rows
        raise NonFiniteError(
            f"the products of rows [{first}, {last}) overflow float64; rescale the matrix")


def factor_on_device(kernels: Any, lane: _StagingStream, Y: Any, width: int
                     ) -> tuple[Any, np.ndarray] | None:
    """W = Q R on the device for W = Y (a b x l device matrix) with ones appended up to
    ``width`` columns: Q (b x width) in the lane's "Q" scratch, R upper triangular on the
    host. None when W has fewer rows than columns, or a column that stays zero, or is not
    factored within ``MAX_CHOLESKY_ROUNDS`` rounds, for the host's Householder QR
    (``local_qr``) to take.

    CholeskyQR in rounds: G = V^T V on the device (V = W, then the last round's Q),
    R_k = chol(G) on the host (width x width), V <- V R_k^-1 on the device by a
    substitution per row, R <- R_k R. The first round, and any round whose plain Cholesky
    factorization fails, adds a shift s I to G, s = 11 (b w + w (w + 1)) u trace(G)
    (u: the unit roundoff), which makes the factorization exist and leaves a Q about
    sqrt(s) / ||V|| better conditioned than V (shifted CholeskyQR; Fukaya, Kannan,
    Nakatsukasa, Zhang and Yamamoto, SIAM J. Sci. Comput. 42, 2020). A round that starts
    from a V with ||G - I||_F <= ORTHOGONALITY_TOLERANCE is the last: a plain round then
    makes Q orthonormal to working precision, with R's residual as small as Householder's.
    Well-conditioned blocks take two rounds; condition numbers up to 1e20, and exactly
    rank-deficient blocks, took four or five when tried (b = 262144, w = 31), at most
    ``MAX_CHOLESKY_ROUNDS``.

    Each round moves only the small G and R_k across the bus and reads and writes the
    b x width matrix on the device, which the host's QR would stream through its cache
    about ten times.
    """
    rows = Y.shape[0]
    if rows < width:
        return None
    Q = lane.scratch("Q", rows, width)
    R = np.eye(width)
    V = Y
    for round_ in range(MAX_CHOLESKY_ROUNDS):
        G = _gram(kernels, lane, V, width)
        last = round_ > 0 and np.linalg.norm(G - np.eye(width)) <= ORTHOGONALITY_TOLERANCE
        if round_ == MAX_CHOLESKY_ROUNDS - 1 and not last:
            break
        R_k = _cholesky(G) if round_ > 0 else None
        if R_k is None and not last:
            G[np.diag_indices(width)] += (11 * (rows * width + width * (width + 1))
                                          * UNIT_ROUNDOFF * np.trace(G))
            R_k = _cholesky(G)
        if R_k is None:
            return None
        device_R = lane.scratch("R", width, width)
        device_R.copy_to_device(np.ascontiguousarray(R_k), stream=lane.stream)
        kernels.solve_rows(lane.stream, V, device_R, Q)
        V, R = Q, R_k @ R
        if last:
            return Q, R
    return None


def _cholesky(G: np.ndarray) -> np.ndarray | None:
    """The upper Cholesky factor of G; None if G is not numerically positive definite or
    not finite."""
    try:
        return scipy.linalg.cholesky(G, lower=False)
    except (np.linalg.LinAlgError, ValueError):
        return None


def _gram(kernels: Any, lane: _StagingStream, V: Any, width: int) -> np.ndarray:
    """W^T W (width x width, symmetric) for W = V with ones appended up to ``width``
    columns; waits for the lane's stream."""
    device_G = lane.scratch("G", width, width)
    device_G.copy_to_device(np.zeros((width, width)), stream=lane.stream)
    kernels.gram(lane.stream, V, device_G)
    G = lane.pinned("G", width, width)
    device_G.copy_to_host(G, stream=lane.stream)
    lane.stream.synchronize()
    upper = np.triu(G)
    return upper + np.triu(upper, 1).T


def raise_if_not_finite(records: np.ndarray, rows: list[tuple[int, int]]) -> None:
    """Raise NonFiniteError for the first block whose record [sum of squares, NaN/Inf flag]
    shows a NaN or Inf, or a sum of squares that overflows; ``rows`` = (first row, count)."""
    bad = np.flatnonzero((records[:, 1] != 0) | ~np.isfinite(records[:, 0]))
    if bad.size == 0:
        return
    index = min(bad, key=lambda i: rows[i][0])
    first, count = rows[index]
    if records[index, 1] != 0:
        raise NonFiniteError(f"the matrix holds NaN or Inf in rows [{first}, {first + count})",
                             rows=(first, first + count))
    raise NonFiniteError(
        f"the squared Frobenius norm of rows [{first}, {first + count}) overflows float64; "
        "rescale the matrix"
    )


class _StagingStream:
    """A CUDA stream with the pinned host buffer and the device buffer its blocks pass
    through, and scratch matrices (Y, Q_i) on the device and in pinned host memory."""

    def __init__(self, cuda):
        self.cuda = cuda
        self.stream = cuda.stream()
        self.staged = cuda.event()  # recorded after each copy out of `host`
        self.host: np.ndarray | None = None
        self.device = None
        self.device_scratch: dict[str, Any] = {}
        self.host_scratch: dict[str, np.ndarray] = {}
        self.small_copied: dict[str, Any] = {}  # name -> event after its latest copy
        self.holds: weakref.ref | None = None  # the block `times` left in `device`
        self.holds_x: weakref.ref | None = None  # the X whose copy `times` left in "X"
        self.arrays: list = []
        self.in_flight: list = []  # page-locked parts the device may still be reading
        self.delivery: Future | None = None  # the final pass's last Q_i from this lane

    def release(self) -> None:
        """Let go of the stream's buffers, once its queued work is done (a device in error
        may refuse to wait: they are let go all the same)."""
        with suppress(Exception):
            self.stream.synchronize()
        self.host, self.device, self.holds, self.holds_x = None, None, None, None
        self.device_scratch, self.host_scratch = {}, {}
        self.arrays, self.in_flight, self.small_copied = [], [], {}

    def await_delivery(self) -> None:
        """Wait until the final pass's last Q_i from this lane is spilled (its pinned
        buffer free again); the sweep raises what the spill raised."""
        if self.delivery is not None:
            delivery, self.delivery = self.delivery, None
            futures_wait([delivery])

    def upload(self, parts: list[np.ndarray], copier: _HostCopier, direct: bool,
               after: Any = None) -> list:
        """Enqueue the copy of ``parts`` to the device: through the pinned buffer, or
        straight from the parts when they are page-locked (``direct``), once the copy
        that recorded the event ``after`` (another stream's) is done. Their device arrays,
        valid for this stream's later work.

        Copies in order: the GPU has several copy engines, and two blocks copied at once
        share the bus, so both arrive late and the kernels of neither can start. Measured
        on an H100 (CSR blocks, n = 1e4, whose kernels took longer than their copy): a
        power sweep ran at 29 GB/s of A with copies free to overlap, where its kernels
        kept the device busy at 42 when each copy waited for the one before."""
        offsets, total = _packing(parts)
        self.staged.synchronize()
        if self.device is None or total > self.device.size:
            self.stream.synchronize()  # queued kernels may still read the old buffer
            # The old buffers (and views of them) go first: with the new ones beside them
            # the stream would hold two blocks, where the plan counts one.
            self.arrays, self.holds, self.device, self.host = [], None, None, None
            free_deferred(self.cuda)
            self.host = None if direct else self.cuda.pinned_array(total, dtype=np.uint8)
            self.device = self.cuda.device_array(total, dtype=np.uint8)
        if after is not None and after is not self.staged:
            after.wait(self.stream)
        if direct:
            for part, offset in zip(parts, offsets, strict=True):
                self.device[offset : offset + part.nbytes].copy_to_device(
                    part.reshape(-1).view(np.uint8), stream=self.stream)
            self.in_flight = parts
        else:
            if self.host is None or total > self.host.size:
                self.host = None
                self.host = self.cuda.pinned_array(self.device.size, dtype=np.uint8)
            for part, offset in zip(parts, offsets, strict=True):
                copier.copy(part, self.host[offset : offset + part.nbytes])
            self.device[:total].copy_to_device(self.host[:total], stream=self.stream)
            self.in_flight = []
        self.staged.record(self.stream)
        self.holds = None
        self.arrays = [_view(self.device, offset, part)
                       for part, offset in zip(parts, offsets, strict=True)]
        return self.arrays

    def scratch(self, name: str, rows: int, cols: int, dtype=np.float64):
        """A (rows, cols) device matrix for this stream's work, one per ``name``, grown
        when too small (after the stream's queued work, which may still use it)."""
        buffer, size = self.device_scratch.get(name), rows * cols
        if buffer is None or size > buffer.size or buffer.dtype != dtype:
            self.stream.synchronize()
            buffer = self.device_scratch[name] = None  # let go of the old one first
            buffer = self.cuda.device_array(max(1, size), dtype=dtype)
            self.device_scratch[name] = buffer
        return buffer[:size].reshape(rows, cols)

    def small_to_device(self, name: str, M: np.ndarray):
        """A small float64 matrix in the device scratch ``name``, copied on this stream
        through the page-locked buffer of that name. Where a fresh device array per block
        would be freed later in numba's batches, each free waiting for the whole device."""
        copied = self.small_copied.get(name)
        if copied is not None:
            copied.synchronize()  # the buffer's last copy is done (long since, as a rule)
        device = self.scratch(name, *M.shape)
        if M.size:
            host = self.pinned(name, *M.shape)
            np.copyto(host, M)
            device.copy_to_device(host, stream=self.stream)
            if copied is None:
                copied = self.small_copied[name] = self.cuda.event()
            copied.record(self.stream)
        return device

    def pinned(self, name: str, rows: int, cols: int) -> np.ndarray:
        """A (rows, cols) float64 page-locked host matrix, one per ``name``, for copies
        between the host and this stream's work; grown as ``scratch``."""
        buffer = self.host_scratch.get(name)
        if buffer is None or rows * cols > buffer.size:
            self.stream.synchronize()
            buffer = self.host_scratch[name] = None  # let go of the old one first
            buffer = self.host_scratch[name] = self.cuda.pinned_array(max(1, rows * cols))
        return buffer[: rows * cols].reshape(rows, cols)


class _BlockRecords:
    """One device slot [sum of squares, NaN/Inf flag] per block of a sweep, with the rows
    each belongs to; read back once, at the end."""

    def __init__(self, cuda, stream):
        """The slots are zeroed on ``stream``, which the caller synchronizes."""
        self.cuda = cuda
        self.device = cuda.to_device(np.zeros((RECORD_CAPACITY, 2)), stream)
        self.rows: list[tuple[int, int]] = []

    def slot(self, first_row: int, count: int):
        if len(self.rows) == self.device.shape[0]:
            self.cuda.synchronize()  # kernels on every stream may still write the old slots
            grown = self.cuda.to_device(np.zeros((2 * len(self.rows), 2)))
            grown[: len(self.rows)].copy_to_device(self.device)
            self.cuda.synchronize()  # the copies landed before any stream writes a slot
            self.device = grown
        self.rows.append((first_row, count))
        return self.device[len(self.rows) - 1]

    def read(self) -> np.ndarray:
        return self.device[: len(self.rows)].copy_to_host().reshape(-1, 2)


class _HostCopier:
    """Copies arrays into pinned memory, split between threads (numpy releases the GIL)."""

    def __init__(self, threads: int):
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def copy(self, array: np.ndarray, destination: np.ndarray) -> None:
        """destination (uint8, array.nbytes) <- the bytes of ``array`` in C order."""
        target = destination.view(array.dtype).reshape(array.shape)
        pieces = min(self.threads, array.nbytes // COPY_PIECE_BYTES)
        if self.pool is None or pieces < 2 or not array.flags.c_contiguous:
            np.copyto(target, array)
            return
        source, target = array.reshape(-1), target.reshape(-1)
        bounds = np.linspace(0, source.size, pieces + 1).astype(np.int64)
        list(self.pool.map(
            lambda i: np.copyto(target[bounds[i] : bounds[i + 1]],
                                source[bounds[i] : bounds[i + 1]]),
            range(pieces),
        ))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _flat(cuda, spare, size: int):
    """The first ``size`` entries of the flat float64 device buffer ``spare``, or a new
    buffer of ``size``."""
    if spare is None:
        return cuda.device_array(size)
    if spare.size < size:
        raise ValueError(f"a spare device buffer of {spare.size} values holds no {size}")
    return spare[:size]


def _packing(parts: list[np.ndarray]) -> tuple[list[int], int]:
    """Aligned offsets of ``parts`` packed into one buffer, and its size."""
    offsets, end = [], 0
    for part in parts:
        offsets.append(end)
        end += -(-part.nbytes // ALIGNMENT) * ALIGNMENT
    return offsets, max(end, ALIGNMENT)


def _view(buffer, offset: int, part: np.ndarray):
    """The bytes of ``buffer`` at ``offset`` as a C-ordered array shaped like ``part``."""
    return buffer[offset : offset + part.nbytes].view(part.dtype).reshape(part.shape)

