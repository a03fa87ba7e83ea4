"""CUDA kernels and backend against the references in naive.py and the CPU backend.

The tests marked ``gpu`` run natively on a machine with a CUDA GPU (``pytest -m gpu``).
Elsewhere ``test_gpu_tests_under_the_simulator`` runs the same tests (but those marked
``native_gpu``, which measure the device itself) in a subprocess with
NUMBA_ENABLE_CUDASIM=1 (the variable is read when numba is imported, which this process has
done already), where the backend picks tiny thread blocks so that every tile edge and loop is
exercised on tiny inputs. The simulator does not prove that a kernel compiles, so
``test_kernels_compile_to_ptx`` compiles every kernel for sm_80 and sm_90 and assembles it
to check its registers, which needs numba-cuda but no GPU.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import naive
import numpy as np
import pytest

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed (the cuda extra)")

from numba import config  # noqa: E402

from ooc_svd.errors import InputError, NonFiniteError  # noqa: E402
from ooc_svd.kernels.backend import CPUKernels  # noqa: E402
from ooc_svd.kernels.cpu import BlockStats  # noqa: E402
from ooc_svd.kernels.cuda_backend import (  # noqa: E402
    STREAMS,
    CUDAKernels,
    CUDAUnavailableError,
    DeviceNeed,
    cuda_available,
    device_bytes,
    driver_library_loads,
    require_cuda,
)
from ooc_svd.sources.csr import CSRBlock  # noqa: E402
from ooc_svd.tsqr import assemble_left_vectors  # noqa: E402

SIMULATED = bool(config.ENABLE_CUDASIM)
USABLE, WHY_NOT = cuda_available()


def on_device(test):
    """Mark a test ``gpu`` and skip it where neither a GPU nor the simulator is usable."""
    return pytest.mark.gpu(pytest.mark.skipif(not USABLE, reason=f"no CUDA: {WHY_NOT}")(test))


@pytest.fixture(params=["device's grids", "3 x 16 threads"])
def grids(request, monkeypatch):
    """The device as it reports itself (the simulator: one thread block at a time), or 3
    multiprocessors of 16 threads: under the simulator's tiny geometry, grid-stride loops,
    split-K products and block sums then launch several thread blocks, as on a GPU. The
    second asserts that some launch did."""
    from ooc_svd.kernels import cuda as device_kernels

    if request.param == "device's grids":
        yield
        return
    monkeypatch.setattr(device_kernels, "device_capacity", lambda: (3, 16))
    launched, launch = [], device_kernels.BlockKernels._launch

    def counted(self, name, grid, *rest):
        launched.append((name, int(np.prod(grid))))
        return launch(self, name, grid, *rest)

    monkeypatch.setattr(device_kernels.BlockKernels, "_launch", counted)
    yield
    assert max(blocks for _, blocks in launched) > 1, launched


# (rows, n, l): several tiles of the simulator's 4 x 4 blocks in every dimension, with
# ragged edges; natively also more than one 32-column tile of l and many thread blocks.
SHAPES = [(11, 9, 5), (1, 1, 1)] + ([] if SIMULATED else [(700, 300, 40)])


def tolerance(dtype) -> float:
    return 1e-5 if dtype == np.float32 else 1e-11


def dense_block(rows, n, dtype, seed=0):
    return (np.random.default_rng(seed).standard_normal((rows, n)) + 3.0).astype(dtype)


def csr_block(rows, n, dtype, index_dtype, seed=0) -> CSRBlock:
    """A random CSR block whose first, a middle and last rows are empty."""
    import scipy.sparse

    rng = np.random.default_rng(seed)
    dense = scipy.sparse.random(rows, n, density=0.4, random_state=rng).toarray()
    dense[[0, rows // 2, rows - 1]] = 0.0
    matrix = scipy.sparse.csr_matrix(dense.astype(dtype))
    return CSRBlock(matrix.data, matrix.indices.astype(index_dtype),
                    matrix.indptr.astype(np.int64), n)


def shifted(block, shift) -> np.ndarray:
    """The block minus 1 shift^T, dense float64."""
    dense = block.to_scipy().toarray() if isinstance(block, CSRBlock) else block
    return naive.widen_shift_rows(dense, shift)[0]


def assert_stats(stats: BlockStats, As: np.ndarray, rtol: float) -> None:
    scale = np.abs(As).sum()
    np.testing.assert_allclose(stats.colsum, As.sum(axis=0), rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(stats.sumsq, np.sum(As * As), rtol=rtol)
    assert stats.rows == As.shape[0]


def operands(n, l, rows, seed=1):
    rng = np.random.default_rng(seed)
    return (np.asfortranarray(rng.standard_normal((n, l))), rng.standard_normal(n),
            rng.standard_normal((rows, l)))


@on_device
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dense_kernels_match_reference(shape, dtype):
    rows, n, l = shape
    block = dense_block(rows, n, dtype)
    X, shift, Q = operands(n, l, rows)
    As = shifted(block, shift)
    kernels, stats = CUDAKernels(n), BlockStats.zeros(n)
    out = np.empty((rows, l + 1), order="F")
    Y = kernels.times(block, 0, X, shift, stats, out=out[:, :l])
    np.testing.assert_allclose(out[:, :l], As @ X, rtol=1e-12, atol=1e-12 * np.abs(As).sum())
    assert Y.flags.f_contiguous
    CT = kernels.transposed_times(block, 0, Q, shift, BlockStats.zeros(n))
    np.testing.assert_allclose(CT, As.T @ Q, rtol=1e-12, atol=1e-12 * np.abs(As).sum())
    assert CT.shape == (n, l) and CT.flags.f_contiguous
    assert_stats(stats, As, 1e-12)


@on_device
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("transposed", ["scatter", "columns"])
def test_csr_kernels_match_reference(shape, index_dtype, dtype, transposed):
    rows, n, l = shape
    block = csr_block(rows, n, dtype, index_dtype)
    X, shift, Q = operands(n, l, rows)
    As = shifted(block, shift)
    kernels, stats = CUDAKernels(n, csr_transposed=transposed), BlockStats.zeros(n)
    np.testing.assert_allclose(kernels.times(block, 0, X, shift, stats), As @ X, rtol=1e-12,
                               atol=1e-12 * np.abs(As).sum())
    np.testing.assert_allclose(kernels.transposed_times(block, 0, Q, shift, BlockStats.zeros(n)),
                               As.T @ Q, rtol=1e-12, atol=1e-12 * np.abs(As).sum())
    assert_stats(stats, As, 1e-12)


@on_device
@pytest.mark.parametrize("lanes", [8, 16])
def test_csr_kernels_with_row_groups_narrower_than_a_warp(lanes):
    """Row groups of 8 or 16 lanes share a warp, each broadcasting its non-zeros by
    shuffles under its own part of the warp's mask (the simulator reads memory instead).
    Rows of up to four chunks of non-zeros, and l wider than a group: every lane of every
    group takes several columns."""
    import dataclasses

    from ooc_svd.kernels import cuda as device_kernels

    base = device_kernels.SIMULATOR_GEOMETRY if SIMULATED else device_kernels.DEFAULT_GEOMETRY
    geometry = dataclasses.replace(base, lanes=lanes, groups=4 if SIMULATED else 16)
    rows, n, l = (9, 70, 19) if SIMULATED else (900, 70, 40)
    block = csr_block(rows, n, np.float32, np.int32)
    X, shift, Q = operands(n, l, rows)
    As = shifted(block, shift)
    kernels, stats = CUDAKernels(n, geometry=geometry), BlockStats.zeros(n)
    scale = np.abs(As).sum()
    np.testing.assert_allclose(kernels.times(block, 0, X, shift, stats), As @ X, rtol=1e-12,
                               atol=1e-12 * scale)
    np.testing.assert_allclose(kernels.transposed_times(block, 0, Q, shift, BlockStats.zeros(n)),
                               As.T @ Q, rtol=1e-12, atol=1e-12 * scale)
    sweep = kernels.power_sweep(X, BlockStats.zeros(n))
    sweep.add(block, 0, shift)
    expected = naive.fused_power_product(As, X)
    np.testing.assert_allclose(sweep.result(), expected, rtol=1e-10,
                               atol=1e-10 * np.abs(expected).max())


def skewed_csr(rows, n, dtype, index_dtype, seed=0):
    """A CSR block (scipy) whose column 1 holds a non-zero in most rows (a run longer than
    several chunks of the column-ordered product), with empty columns (0 and the last
    two) and empty rows."""
    import scipy.sparse

    rng = np.random.default_rng(seed)
    dense = scipy.sparse.random(rows, n, density=0.2, random_state=rng).toarray()
    dense[rng.random(rows) < 0.8, 1] = rng.standard_normal()
    dense[:, [0, n - 2, n - 1]] = 0.0
    dense[[2, rows - 1]] = 0.0
    matrix = scipy.sparse.csr_matrix(dense.astype(dtype))
    matrix.indices = matrix.indices.astype(index_dtype)
    return matrix


@on_device
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_csr_to_columns_matches_scipy_csc(index_dtype, dtype):
    """The device reorder of a CSR block by columns: the column pointers of the CSC form,
    and in each column the same (row, value) pairs, in whatever order. Two blocks in a
    row through the same buffers: nothing of the first may remain in the second's."""
    from numba import cuda

    rows, n = (23, 8) if SIMULATED else (5000, 3000)
    kernels = CUDAKernels(n).kernels
    counts = cuda.to_device(np.full(n + 1, 7, dtype=np.int64))  # scratch, not zeroed
    starts, cursor = cuda.device_array(n + 1, np.int64), cuda.device_array(n, np.int64)
    for seed in (0, 1):
        A = skewed_csr(rows, n, dtype, index_dtype, seed)
        values = cuda.device_array(A.nnz, dtype)
        row_of = cuda.device_array(A.nnz, np.int32)
        arrays = [cuda.to_device(a) for a in (A.data, A.indices, A.indptr.astype(np.int64))]
        kernels.csr_to_columns(0, *arrays, counts, starts, cursor, values, row_of)
        reference = A.tocsc()
        np.testing.assert_array_equal(starts.copy_to_host(), reference.indptr)
        values, row_of = values.copy_to_host(), row_of.copy_to_host()
        for c in range(n):
            run = slice(reference.indptr[c], reference.indptr[c + 1])
            order = np.argsort(row_of[run])
            np.testing.assert_array_equal(row_of[run][order], reference.indices[run])
            np.testing.assert_array_equal(values[run][order], reference.data[run])


@on_device
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_columns_times_splits_long_columns_between_chunks(dtype):
    """Z += A^T Y and the column totals from the column order, on a block whose long column
    spans several chunks and whose chunks span several columns, some empty."""
    from numba import cuda

    rows, n, l = (23, 8, 5) if SIMULATED else (5000, 3000, 40)
    A = skewed_csr(rows, n, dtype, np.int32)
    CSC = A.tocsc()
    Y = np.random.default_rng(2).standard_normal((rows, l))
    Z0 = np.random.default_rng(3).standard_normal((n, l))
    kernels = CUDAKernels(n).kernels
    Z, colsum, record = (cuda.to_device(Z0), cuda.to_device(np.zeros(n)),
                         cuda.to_device(np.zeros(2)))
    kernels.columns_times(0, cuda.to_device(CSC.data), cuda.to_device(CSC.indices),
                          cuda.to_device(CSC.indptr.astype(np.int64)), cuda.to_device(Y), Z,
                          colsum, record)
    dense = A.toarray().astype(np.float64)
    np.testing.assert_allclose(Z.copy_to_host(), Z0 + dense.T @ Y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(colsum.copy_to_host(), dense.sum(axis=0), rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(record.copy_to_host(), [np.sum(dense * dense), 0.0],
                               rtol=1e-12)


def test_resident_threads_are_read_under_either_name(monkeypatch):
    """numba-cuda names the resident threads per multiprocessor after the driver's enum:
    MAX_THREADS_PER_MULTIPROCESSOR with NVIDIA's cuda-python bindings, and
    MAX_THREADS_PER_MULTI_PROCESSOR with its ctypes ones. Reading only the latter gave 0 on
    a GPU, and grid-stride kernels launched one block per multiprocessor."""
    from types import SimpleNamespace

    from ooc_svd.kernels import cuda as device_kernels

    for name in ("MAX_THREADS_PER_MULTIPROCESSOR", "MAX_THREADS_PER_MULTI_PROCESSOR"):
        device = SimpleNamespace(MULTIPROCESSOR_COUNT=132, **{name: 2048})
        monkeypatch.setattr(device_kernels.cuda, "get_current_device", lambda d=device: d)
        assert device_kernels.device_capacity() == (132, 2048)


def test_launches_from_several_threads_leave_the_warning_filters_as_they_were():
    """Each launch swaps the process's warning filters to silence numba's small-grid
    warning. Two at once, unguarded, restored each other's: the second restored the
    first's swapped set, and the filter stayed."""
    import threading
    import warnings
    from types import SimpleNamespace

    from ooc_svd.kernels import cuda as device_kernels

    inside = threading.Event()

    class SlowToConfigure:  # a kernel whose launch configuration takes a while
        def __getitem__(self, configuration):
            inside.set()
            time.sleep(0.05)
            return lambda *args: None

    kernels = SimpleNamespace(kernels=SimpleNamespace(sweep=SlowToConfigure()))
    before = list(warnings.filters)

    def launch():
        device_kernels.BlockKernels._launch(kernels, "sweep", 1, 32, 0)

    first = threading.Thread(target=launch)
    first.start()
    inside.wait()
    second = threading.Thread(target=launch)  # while the first holds its swapped filters
    second.start()
    first.join()
    second.join()
    assert warnings.filters == before


@on_device
@pytest.mark.parametrize("ones", [0, 1])
def test_gram_and_solve_rows_match_reference(ones, grids):
    """The final pass's QR kernels on W = Y with a column of ones appended or not: G +=
    W^T W (upper triangle) and Q = W R^-1, into another matrix and in place."""
    from numba import cuda

    rows, l = (11, 5) if SIMULATED else (5000, 40)
    rng = np.random.default_rng(5)
    Y = rng.standard_normal((rows, l))
    width = l + ones
    W = naive.with_ones(Y, width)
    kernels = CUDAKernels(1).kernels
    G = cuda.to_device(np.full((width, width), 0.5))
    kernels.gram(0, cuda.to_device(Y), G)
    expected = np.triu(0.5 + W.T @ W)
    np.testing.assert_allclose(np.triu(G.copy_to_host()), expected,
                               atol=1e-12 * np.abs(expected).max())
    R = np.triu(rng.standard_normal((width, width))) + 4 * np.eye(width)
    Q = cuda.device_array((rows, width))
    kernels.solve_rows(0, cuda.to_device(Y), cuda.to_device(R), Q)
    expected = W @ np.linalg.inv(R)
    np.testing.assert_allclose(Q.copy_to_host(), expected, rtol=1e-10, atol=1e-12)
    V = cuda.to_device(W)
    kernels.solve_rows(0, V, cuda.to_device(R), V)
    np.testing.assert_allclose(V.copy_to_host(), expected, rtol=1e-10, atol=1e-12)


@on_device
@pytest.mark.parametrize("order", ["F", "C"])
def test_matrices_change_order_on_the_device(order):
    """A host matrix of either order reaches the device C-ordered, and a device matrix
    comes home F-ordered, through a spare buffer or a new one, into ``out`` or not."""
    from numba import cuda

    rows, cols = (7, 3) if SIMULATED else (1000, 37)
    M = np.asarray(np.random.default_rng(8).standard_normal((rows, cols)), order=order)
    kernels = CUDAKernels(cols)
    stream = kernels.streams[0].stream
    spare = cuda.to_device(np.full(rows * cols + 2, np.nan))
    for buffer in (None, spare):
        device = kernels.matrix_to_device(M, stream, spare=buffer)
        assert device.is_c_contiguous()
        np.testing.assert_array_equal(device.copy_to_host(), M)
        home = kernels.fortran_home(device, stream, spare=buffer)
        assert home.flags.f_contiguous
        np.testing.assert_array_equal(home, M)
    wide = np.zeros((rows, cols + 1), order="F")
    kernels.fortran_home(device, stream, out=wide[:, :cols])  # into F-ordered columns
    np.testing.assert_array_equal(wide, np.column_stack([M, np.zeros(rows)]))
    rows_first = np.zeros((rows, cols))
    kernels.fortran_home(device, stream, out=rows_first)  # a C-ordered out is filled too
    np.testing.assert_array_equal(rows_first, M)
    kernels.kernels.zero(stream, device.reshape(-1))
    np.testing.assert_array_equal(device.copy_to_host(), 0.0)
    with pytest.raises(ValueError, match="holds no"):
        kernels.matrix_to_device(np.asfortranarray(M), stream, spare=spare[:3])


def condition_cases(rows, l):
    """(name, Y) for the device QR: condition numbers from 1e2 to 1e20 (singular values
    log-spaced), exactly rank-deficient, and a repeated column."""
    cases = [(f"condition 1e{e}", naive.matrix_with_spectrum(
        rows, l, np.logspace(3, 3 - e, l), seed=4)) for e in (2, 8, 12, 16, 20)]
    low_rank = naive.matrix_with_spectrum(rows, l, np.ones(3), seed=5)
    repeated = np.random.default_rng(6).standard_normal((rows, l))
    repeated[:, 1] = repeated[:, 0]
    return cases + [("rank 3", low_rank), ("repeated column", repeated)]


@on_device
@pytest.mark.parametrize("ones", [0, 1])
def test_factor_on_device_is_a_stable_qr(ones):
    """Q orthonormal and Q R = W to working precision, R upper triangular, however
    ill-conditioned or rank-deficient W is; a W short of rows, or with a zero column, is
    left to the host."""
    from numba import cuda

    from ooc_svd.kernels.cuda_backend import factor_on_device

    rows, l = (12, 5) if SIMULATED else (20_000, 40)
    width = l + ones
    backend = CUDAKernels(1)
    lane = backend.streams[0]
    for name, Y in condition_cases(rows, l):
        factored = factor_on_device(backend.kernels, lane, cuda.to_device(Y), width)
        assert factored is not None, name
        Q, R = factored[0].copy_to_host(), factored[1]
        W = naive.with_ones(Y, width)
        np.testing.assert_allclose(Q.T @ Q, np.eye(width), atol=1e-13, err_msg=name)
        np.testing.assert_allclose(Q @ R, W, atol=1e-13 * np.abs(W).max(), err_msg=name)
        np.testing.assert_array_equal(R, np.triu(R), err_msg=name)
    zero_column = np.random.default_rng(7).standard_normal((rows, l))
    zero_column[:, 2] = 0.0
    for Y in (zero_column, np.ones((width - 1, l))):
        assert factor_on_device(backend.kernels, lane, cuda.to_device(Y), width) is None


class NumpyQRKernels:
    """``gram`` and ``solve_rows`` by numpy on host copies of the device arrays: the round
    logic of ``factor_on_device`` at sizes the simulator cannot run its kernels at (the
    kernels themselves are checked against these references above)."""

    def gram(self, stream, Y, G):
        W = naive.with_ones(Y.copy_to_host(), G.shape[0])
        G.copy_to_device(G.copy_to_host() + np.triu(W.T @ W))

    def solve_rows(self, stream, Y, R, Q):
        import scipy.linalg

        W = naive.with_ones(Y.copy_to_host(), R.shape[0])
        Q.copy_to_device(scipy.linalg.solve_triangular(R.copy_to_host(), W.T, trans="T").T)


@on_device
def test_factor_on_device_follows_a_failed_cholesky_round_with_a_shifted_one(monkeypatch):
    """On tall blocks (20000 x 41) the shift of the first round leaves Q too ill-conditioned
    for a plain Cholesky factorization beyond condition numbers of about 1e13; the round
    that fails is shifted instead, and Q R = W still holds with Q orthonormal."""
    from numba import cuda

    from ooc_svd.kernels import cuda_backend

    failed = []
    cholesky = cuda_backend._cholesky
    monkeypatch.setattr(cuda_backend, "_cholesky",
                        lambda G: failed.append(G) if (R := cholesky(G)) is None else R)
    rows, l = 20_000, 40
    lane = CUDAKernels(1).streams[0]
    for name, Y in condition_cases(rows, l):
        factored = cuda_backend.factor_on_device(NumpyQRKernels(), lane, cuda.to_device(Y),
                                                 l + 1)
        assert factored is not None, name
        Q, R = factored[0].copy_to_host(), factored[1]
        W = naive.with_ones(Y, l + 1)
        np.testing.assert_allclose(Q.T @ Q, np.eye(l + 1), atol=1e-13, err_msg=name)
        np.testing.assert_allclose(Q @ R, W, atol=1e-13 * np.abs(W).max(), err_msg=name)
    assert failed, "no plain Cholesky round failed: the shifted retry went untested"


@on_device
@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_transposed_times_copies_a_block_other_than_the_last(kind):
    """The block of the last ``times`` call stays on the device for ``transposed_times``;
    another block must be copied, not mistaken for it."""
    make = dense_block if kind == "dense" else (
        lambda rows, n, dtype, seed: csr_block(rows, n, dtype, np.int32, seed))
    first, second = make(6, 5, np.float64, seed=3), make(6, 5, np.float64, seed=4)
    X, shift, Q = operands(5, 2, 6)
    kernels = CUDAKernels(5)
    kernels.times(first, 0, X, shift, BlockStats.zeros(5))
    CT = kernels.transposed_times(second, 0, Q, shift, BlockStats.zeros(5))
    np.testing.assert_allclose(CT, shifted(second, shift).T @ Q, rtol=1e-12, atol=1e-12)


@on_device
@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_times_copies_x_once_for_the_same_object_and_again_for_another(kind, monkeypatch):
    """The final and residual passes give every block's ``times`` the same X: it goes to
    the device once; another X (the next pass's) is copied, not mistaken for it."""
    make = dense_block if kind == "dense" else (
        lambda rows, n, dtype, seed: csr_block(rows, n, dtype, np.int32, seed))
    blocks = [make(6, 5, np.float64, seed=seed) for seed in (3, 4, 5)]
    X, shift, _ = operands(5, 2, 6)
    other = np.asfortranarray(X[:, ::-1] + 1.0)
    kernels = CUDAKernels(5)
    copies = []
    to_device = kernels.matrix_to_device
    monkeypatch.setattr(kernels, "matrix_to_device",
                        lambda M, *args, **kw: copies.append(M) or to_device(M, *args, **kw))
    for operand in (X, X, X, other, X):
        for block in blocks:
            Y = kernels.times(block, 0, operand, shift, None)
            np.testing.assert_allclose(Y, shifted(block, shift) @ operand, rtol=1e-12,
                                       atol=1e-12)
    assert [id(M) for M in copies] == [id(X), id(other), id(X)]


SWEEPS = [  # (kind, data dtype, index dtype, centered, page-locked blocks); kind "columns"
    # is CSR with csr_transposed='columns'
    ("dense", np.float32, None, True, False),
    ("dense", np.float64, None, False, True),  # copied to the device without staging
    ("csr", np.float32, np.int32, True, False),  # a shift makes the CSR correction non-trivial
    ("csr", np.float64, np.int64, False, True),
    ("columns", np.float32, np.int32, True, False),
    ("columns", np.float64, np.int64, False, True),
]


def cuda_kernels(kind, n, **options) -> CUDAKernels:
    """The cuda backend for blocks of ``kind`` ('dense', 'csr' or 'columns': CSR blocks
    with their A^T Y formed in column order)."""
    transposed = "columns" if kind == "columns" else "scatter"
    return CUDAKernels(n, csr_transposed=transposed, **options)


def split_blocks(kind, dtype, index_dtype, rows, n, sizes):
    """The matrix and its row blocks of the given sizes (one of them empty)."""
    whole = (dense_block(rows, n, dtype, seed=2) if kind == "dense"
             else csr_block(rows, n, dtype, index_dtype, seed=2))  # csr, columns
    starts = np.cumsum([0, *sizes])
    return whole, [(int(a), whole[a:b]) for a, b in zip(starts[:-1], starts[1:], strict=True)]


@on_device
@pytest.mark.parametrize(("kind", "dtype", "index_dtype", "centered", "pinned"), SWEEPS)
def test_power_sweep_matches_cpu_backend(kind, dtype, index_dtype, centered, pinned, grids):
    rows, n, l = (26, 9, 5) if SIMULATED else (3000, 257, 30)
    sizes = [7, 0, 9, 3, rows - 19] if SIMULATED else [1000, 0, 999, 1, rows - 2000]
    whole, blocks = split_blocks(kind, dtype, index_dtype, rows, n, sizes)
    X, shift, _ = operands(n, l, rows)
    shift = shift if centered else np.zeros(n)
    results = []
    for kernels in (CPUKernels(n), cuda_kernels(kind, n)):
        stats = BlockStats.zeros(n)
        sweep = kernels.power_sweep(X, stats)
        for start, block in blocks:
            if pinned and kernels.name == "cuda":
                block = kernels.keep(block)  # a page-locked copy
            sweep.add(block, start, shift)
        results.append((sweep.result(), stats))
    (Z_cpu, stats_cpu), (Z_gpu, stats_gpu) = results
    assert Z_gpu.flags.f_contiguous
    np.testing.assert_allclose(Z_gpu, Z_cpu, rtol=1e-10, atol=1e-10 * np.abs(Z_cpu).max())
    As = shifted(whole, shift)
    np.testing.assert_allclose(Z_gpu, naive.fused_power_product(As, X), rtol=1e-10,
                               atol=1e-10 * np.abs(Z_cpu).max())
    np.testing.assert_allclose(stats_gpu.colsum, stats_cpu.colsum, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(stats_gpu.sumsq, stats_cpu.sumsq, rtol=1e-10)
    assert stats_gpu.rows == stats_cpu.rows == rows


# The simulator runs the kernels in numpy scalars, which warn where the GPU just computes
# with Inf and NaN.
OVERFLOW_WARNING = pytest.mark.filterwarnings(
    "ignore:.*(overflow|invalid value) encountered:RuntimeWarning")


def run_final_sweep(kernels, X, blocks, shift, append_ones):
    """The final sweep over ``blocks``: its StreamingTSQR, stats, Q assembled from the
    spill, which must arrive once per block and in order, and the sweep itself."""
    n = X.shape[0]
    stats, spilled = BlockStats.zeros(n), []
    sweep = kernels.final_sweep(X, stats, append_ones,
                                lambda i, Q_i, merge: spilled.append((i, Q_i, merge)))
    for start, block in blocks:
        sweep.add(block, start, shift)
    tsqr = sweep.result()
    assert [i for i, _, _ in spilled] == list(range(len(blocks)))
    pieces = [None] * len(blocks)
    assemble_left_vectors(len(blocks), np.eye(tsqr.R.shape[0]),
                          lambda i: spilled[i][1], lambda i: spilled[i][2],
                          lambda i, rows: pieces.__setitem__(i, rows))
    return tsqr, stats, np.vstack(pieces), sweep


@on_device
@pytest.mark.parametrize(("append_ones", "grids"), [(False, "device's grids"),
                                                    (True, "device's grids"),
                                                    (True, "3 x 16 threads")],
                         indirect=["grids"])
@pytest.mark.parametrize(("kind", "dtype", "index_dtype", "centered", "pinned"), SWEEPS)
def test_final_sweep_matches_cpu_backend(kind, dtype, index_dtype, centered, pinned,
                                         append_ones, grids):
    check_final_sweep(kind, dtype, index_dtype, centered, pinned, append_ones, streams=2)


@on_device
def test_a_column_taken_from_csr_blocks_on_the_device():
    """B = A_s - c 1^T with the cuda kernels of A_s inside (``kernels.row_shift``): the
    power and final sweeps, and their totals, against B's dense products."""
    from ooc_svd.kernels.row_shift import RowShiftKernels
    from ooc_svd.sources.dense import open_dense_source

    rows, n, l = (26, 9, 5) if SIMULATED else (3000, 257, 30)
    sizes = [7, 0, 9, rows - 16] if SIMULATED else [1000, 0, 999, rows - 1999]
    whole, blocks = split_blocks("csr", np.float32, np.int32, rows, n, sizes)
    X, shift, _ = operands(n, l, rows)
    c = 2.0 + np.random.default_rng(9).standard_normal(rows)
    B = shifted(whole, shift) - c[:, None]
    kernels = RowShiftKernels(CUDAKernels(n), open_dense_source(c[:, None]))
    stats = BlockStats.zeros(n)
    sweep = kernels.power_sweep(X, stats)
    for start, block in blocks:
        sweep.add(block, start, shift)
    expected = B.T @ (B @ X)
    np.testing.assert_allclose(sweep.result(), expected, atol=1e-10 * np.abs(expected).max())
    assert_stats(stats, B, 1e-10)
    tsqr, stats, Q, _ = run_final_sweep(kernels, X, blocks, shift, False)
    np.testing.assert_allclose(Q @ tsqr.R, B @ X, atol=1e-10 * np.abs(B @ X).max())
    np.testing.assert_allclose(tsqr.BT, B.T @ Q, atol=1e-10 * np.abs(B).sum())
    assert_stats(stats, B, 1e-10)


@on_device
@pytest.mark.parametrize("kind", ["dense", "csr", "columns"])
def test_final_sweep_on_one_stream(kind):
    """With one stream a block's B^T update must be enqueued before the next block
    overwrites the stream's device buffer."""
    check_final_sweep(kind, np.float64, np.int32, True, False, True, streams=1)


@on_device
def test_an_error_between_blocks_stops_the_final_sweeps_deliveries():
    """The final sweep hands Q_i to the spill from a thread of its own, a block later; a
    read error between blocks aborts it (``aborted_on_error``), which waits for the spill
    calls begun and drops the rest, so the caller may close the spill: none comes after."""
    from ooc_svd.kernels.backend import aborted_on_error

    rows, n, l = (8, 9, 5) if SIMULATED else (3000, 257, 30)
    X, _, _ = operands(n, l, 3 * rows)
    kernels = CUDAKernels(n, streams=2)
    calls, closed = [], []

    def slow_spill(index, Q_i, merge):
        time.sleep(0.2)
        calls.append((index, bool(closed)))

    try:
        with pytest.raises(OSError, match="a chunk that cannot be read"), \
                aborted_on_error(kernels.final_sweep(X, BlockStats.zeros(n), False,
                                                     slow_spill)) as sweep:
            for i in range(3):
                sweep.add(dense_block(rows, n, np.float64, seed=i), i * rows, np.zeros(n))
            raise OSError("a chunk that cannot be read")
        closed.append(True)  # the caller closes the spill here
        time.sleep(0.5)
    finally:
        kernels.close()
    assert calls and all(not after_close for _, after_close in calls)


def check_final_sweep(kind, dtype, index_dtype, centered, pinned, append_ones, streams):
    """B^T stays on the device: Q R = [A_s X, 1], Q orthonormal, B^T = A_s^T Q, with
    blocks shorter than l (R grows; factored on the host) and an empty block."""
    rows, n, l = (26, 9, 5) if SIMULATED else (3000, 257, 30)
    sizes = [2, 7, 0, 9, rows - 18] if SIMULATED else [20, 1000, 0, 979, rows - 1999]
    whole, blocks = split_blocks(kind, dtype, index_dtype, rows, n, sizes)
    X, shift, _ = operands(n, l, rows)
    shift = shift if centered else np.zeros(n)
    As = shifted(whole, shift)
    Y = np.hstack([As @ X, np.ones((rows, int(append_ones)))])
    scale = np.abs(As).sum()
    results = []
    for kernels in (CPUKernels(n), cuda_kernels(kind, n, streams=streams)):
        blocks_here = [(start, kernels.keep(block) if pinned else block)
                       for start, block in blocks]
        tsqr, stats, Q, sweep = run_final_sweep(kernels, X, blocks_here, shift, append_ones)
        np.testing.assert_allclose(Q @ tsqr.R, Y, atol=1e-10 * np.abs(Y).max())
        np.testing.assert_allclose(Q.T @ Q, np.eye(Q.shape[1]), atol=1e-10)
        assert tsqr.BT.flags.f_contiguous
        np.testing.assert_allclose(tsqr.BT, As.T @ Q, atol=1e-10 * scale)
        assert_stats(stats, As, 1e-10)
        if kernels.name == "cuda":  # the device factors every block with enough rows
            width = l + append_ones
            assert sweep.factored_on_host == sum(0 < size < width for size in sizes)
        results.append(tsqr)
    cpu, gpu = results
    # B^T R = A_s^T Y whatever the signs of Q's columns.
    np.testing.assert_allclose(gpu.BT @ gpu.R, cpu.BT @ cpu.R, atol=1e-9 * scale * l)
    assert gpu.blocks == cpu.blocks == len(blocks)


@on_device
@pytest.mark.parametrize("streams", [1, 2])
def test_final_sweep_raises_what_the_spill_raised(streams):
    """Q_i reach the spill from the delivery thread: an error there (a full disk, say)
    still ends the sweep, and no block after it is lost without a word."""
    whole, blocks = split_blocks("dense", np.float64, np.int32, 40, 6, [10, 10, 10, 10])
    spilled = []

    def spill(i, Q_i, merge):
        if i == 1:
            raise OSError("no space left on device")
        spilled.append(i)

    sweep = cuda_kernels("dense", 6, streams=streams).final_sweep(
        np.ones((6, 2), order="F"), BlockStats.zeros(6), False, spill)
    with pytest.raises(OSError, match="no space left"):
        for start, block in blocks:
            sweep.add(block, start, np.zeros(6))
        sweep.result()
    assert spilled == [0]  # no block after the failed one was spilled


@on_device
def test_a_failed_final_sweep_makes_no_spill_call_after_it_raised():
    """The caller closes the spill once the sweep raises: every Q_i handed to the
    delivery thread is settled by then, and none is spilled after."""
    whole, blocks = split_blocks("dense", np.float64, np.int32, 40, 6, [10, 10, 10, 10])
    calls, closed = [], []

    def slow_spill(i, Q_i, merge):
        time.sleep(0.2)
        calls.append((i, bool(closed)))

    sweep = cuda_kernels("dense", 6).final_sweep(np.ones((6, 2), order="F"),
                                                 BlockStats.zeros(6), False, slow_spill)
    with pytest.raises(ValueError, match="one centering shift"):
        for start, block in blocks:
            sweep.add(block, start, np.zeros(6) if start < 30 else np.ones(6))
    closed.append(True)
    time.sleep(0.5)
    assert calls and not any(after_close for _, after_close in calls)


@on_device
def test_float32_accumulation_centers_before_rounding():
    """A float64 block far from the origin: its tiles are centered in float64 and only then
    rounded, so float32 arithmetic errs relative to A - shift, not to A."""
    rows, n, l = (13, 9, 5) if SIMULATED else (2000, 300, 30)
    rng = np.random.default_rng(3)
    block = rng.standard_normal((rows, n)) + 1e6
    shift = block.mean(axis=0)
    X = rng.standard_normal((n, l))
    backend = CUDAKernels(n, accumulate="float32")
    Y = backend.times(block, 0, X, shift, None)
    expected = (block - shift) @ X
    np.testing.assert_allclose(Y, expected, atol=1e-5 * np.abs(expected).max())
    sweep = backend.power_sweep(X, BlockStats.zeros(n))
    sweep.add(block, 0, shift)
    expected = naive.fused_power_product(block, X, shift)
    np.testing.assert_allclose(sweep.result(), expected, atol=1e-5 * np.abs(expected).max())


@on_device
@OVERFLOW_WARNING
@pytest.mark.parametrize("kind", ["dense", "csr", "columns"])
def test_final_sweep_names_the_rows_of_a_non_finite_block(kind):
    whole, blocks = split_blocks(kind, np.float64, np.int32, 30, 6, [10, 10, 10])
    if kind == "dense":
        whole[13, 2] = np.nan
    else:
        whole.data[whole.indptr[10]] = np.nan
    spilled = []
    kernels = cuda_kernels(kind, 6)
    lanes = list(kernels.streams)
    sweep = kernels.final_sweep(np.ones((6, 2), order="F"), BlockStats.zeros(6), False,
                                lambda *block: spilled.append(block))
    with pytest.raises(NonFiniteError, match=r"NaN or Inf in rows \[1010, 1020\)"):
        for start, block in blocks:
            sweep.add(block, 1000 + start, np.zeros(6))
        sweep.result()
    # Nothing of the bad block reached the spill (the block before it may have: the
    # spill gets each block a block later, from the delivery thread).
    assert [i for i, _, _ in spilled] in ([], [0])
    # The failed sweep (which an error's traceback may keep) holds no buffers once the
    # backend is closed: device memory and pinned pages go back.
    kernels.close()
    for lane in lanes:
        assert lane.host is None and lane.device is None
        assert not lane.device_scratch and not lane.host_scratch and not lane.arrays


@on_device
@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_a_run_names_the_row_of_a_nan_as_the_cpu_backend_does(kind, tmp_path):
    """The device flags the block; the pass reads its rows again to name the first one
    holding the NaN."""
    import scipy.sparse
    import zarr

    import ooc_svd

    A = np.random.default_rng(2).standard_normal((23, 5))
    A[13, 2] = np.nan
    if kind == "dense":
        path = str(tmp_path / "A.zarr")
        zarr.create_array(path, shape=A.shape, chunks=(4, 5), dtype="f8")[:] = A
    else:
        path = scipy.sparse.csr_matrix(A)
    for backend in ("cpu", "cuda"):
        with pytest.raises(NonFiniteError, match="NaN or Inf, first at row 13"):
            ooc_svd.svd(path, 2, method="randomized", niter=1, backend=backend,
                        memory_limit="1.2MB")


@on_device
def test_running_out_of_device_memory_mid_run_is_named(monkeypatch, tmp_path):
    """Memory free when the run was planned, taken by the time a pass allocates it (by
    another process on the GPU): the driver's error becomes a PlanError that says what
    to change, and where the completed passes are kept; any other driver error passes
    unchanged."""
    from numba.cuda.cudadrv import driver

    import ooc_svd
    from ooc_svd.cli import failure_message
    from ooc_svd.errors import PlanError

    A = np.random.default_rng(2).standard_normal((23, 5))
    sweeps = CUDAKernels.power_sweep
    for code, expected, match in [(2, PlanError, "the GPU ran out of memory during the run "
                                   r"\(the passes hold .*B there\): another process"),
                                  (700, driver.CudaAPIError, "illegal address")]:
        calls = []

        def taken_in_the_second(self, *args, code=code, calls=calls, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise driver.CudaAPIError(code, "CUDA_ERROR: an illegal address or no memory")
            return sweeps(self, *args, **kwargs)

        monkeypatch.setattr(CUDAKernels, "power_sweep", taken_in_the_second)
        out = tmp_path / f"result-{code}.zarr"
        with pytest.raises(expected, match=match) as failed:
            ooc_svd.svd(A, 2, method="randomized", niter=2, backend="cuda", out=out)
        assert failure_message(failed.value).endswith(
            "the same command with --resume continues from there")


def test_free_deferred_flushes_the_memory_managers_queue_and_the_contexts():
    """numba queues frees of device and page-locked memory with the context's memory
    manager, and of streams, events and modules with the context itself."""
    from types import SimpleNamespace

    from ooc_svd.kernels.cuda_backend import free_deferred

    flushed = []

    def queue(name):
        return SimpleNamespace(clear=lambda: flushed.append(name))

    context = SimpleNamespace(memory_manager=SimpleNamespace(deallocations=queue("memory")),
                              deallocations=queue("context"))
    free_deferred(SimpleNamespace(current_context=lambda: context))
    assert flushed == ["memory", "context"]
    free_deferred(SimpleNamespace(current_context=lambda: SimpleNamespace()))  # simulator's


@on_device
@pytest.mark.native_gpu
@pytest.mark.skipif(SIMULATED, reason="the simulator has no device memory to count")
def test_closed_kernels_give_their_device_memory_back():
    """numba queues frees until 10 are pending or a fifth of the device is: without
    flushing that queue, a closed run's buffers stayed taken for the driver. The sweeps stay
    referenced, as a cluster task's do when it closes its kernels: their own arrays (X, Z
    and B^T, 0.5-1 GB each for 4 million columns) are let go with their results."""
    from numba import cuda

    from ooc_svd.kernels.cuda_backend import free_deferred

    def driver_free():  # the driver's count, without device_memory's flush
        return cuda.current_context().get_memory_info()[0]

    rows, n, l = 200_000, 256, 30  # a 205 MB block on each of the two streams
    X, shift, _ = operands(n, l, rows)
    free_deferred(cuda)
    before = driver_free()
    kernels = CUDAKernels(n)
    sweep = kernels.power_sweep(X, BlockStats.zeros(n))
    for seed in range(2):
        sweep.add(dense_block(rows, n, np.float32, seed), 0, shift)
    sweep.result()
    assert driver_free() < before - 300e6
    kernels.close()
    assert driver_free() > before - 50e6

    n = 4_000_000
    X = np.random.default_rng(0).standard_normal((n, l))
    block = csr_block(100, n // 1000, np.float32, np.int32)
    block = CSRBlock(block.data, block.indices * 1000, block.indptr, n)
    kernels = CUDAKernels(n)
    power, final = (kernels.power_sweep(X, BlockStats.zeros(n)),
                    kernels.final_sweep(X, BlockStats.zeros(n), True, lambda *_: None))
    for sweep in (power, final):
        sweep.add(block, 0, np.zeros(n))
        sweep.result()
    kernels.close()
    assert driver_free() > before - 50e6


@on_device
def test_a_mean_that_overflows_float64_is_named_without_numpy_warnings():
    """CSR blocks' totals are shifted on the host; an overflowing shift ends in the pass's
    NonFiniteError (the suite turns numpy's warnings into errors)."""
    import scipy.sparse

    import ooc_svd

    A = scipy.sparse.random(60, 20, density=0.1, random_state=1, format="csr")
    with pytest.raises(NonFiniteError, match="overflows float64"):
        ooc_svd.svd(A, 3, mean=np.full(20, 1e160), method="randomized", backend="cuda")


@on_device
def test_float32_accumulation_is_close_to_float64():
    rows, n, l = (13, 9, 5) if SIMULATED else (2000, 300, 30)
    block = dense_block(rows, n, np.float32)
    X, shift, _ = operands(n, l, rows)
    expected = naive.fused_power_product(block, X, shift)
    stats = BlockStats.zeros(n)
    sweep = CUDAKernels(n, accumulate="float32").power_sweep(X, stats)
    sweep.add(block, 0, shift)
    np.testing.assert_allclose(sweep.result(), expected, rtol=1e-3,
                               atol=1e-4 * np.abs(expected).max())


@on_device
@OVERFLOW_WARNING
@pytest.mark.parametrize("kind", ["dense", "csr", "columns"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_sweep_names_the_rows_of_a_non_finite_block(kind, bad):
    whole, blocks = split_blocks(kind, np.float64, np.int32, 30, 6, [10, 10, 10])
    if kind == "dense":
        whole[13, 2] = bad
    else:
        assert whole.indptr[10] < whole.indptr[20]
        whole.data[whole.indptr[10]] = bad  # the blocks are views: rows [10, 20) hold it
    sweep = cuda_kernels(kind, 6).power_sweep(np.ones((6, 2), order="F"), BlockStats.zeros(6))
    for start, block in blocks:
        sweep.add(block, 1000 + start, np.zeros(6))
    with pytest.raises(NonFiniteError, match=r"NaN or Inf in rows \[1010, 1020\)"):
        sweep.result()


@on_device
@OVERFLOW_WARNING
def test_times_reports_an_overflowing_sum_of_squares():
    block = np.full((4, 3), 1e200)
    with pytest.raises(NonFiniteError, match=r"rows \[8, 12\) overflows"):
        CUDAKernels(3).times(block, 8, np.ones((3, 2), order="F"), np.zeros(3),
                             BlockStats.zeros(3))


@on_device
def test_sweep_rejects_a_second_shift_or_kind():
    block, X = dense_block(4, 3, np.float64), np.ones((3, 2), order="F")
    sweep = CUDAKernels(3).power_sweep(X, BlockStats.zeros(3))
    sweep.add(block, 0, np.zeros(3))
    with pytest.raises(ValueError, match="one centering shift"):
        sweep.add(block, 4, np.ones(3))
    with pytest.raises(TypeError, match="not both"):
        sweep.add(csr_block(4, 3, np.float64, np.int32), 4, np.zeros(3))


# Not on the device: these run in every test session.

@pytest.mark.skipif(SIMULATED, reason="already under the simulator")
def test_gpu_tests_under_the_simulator():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-m", "gpu and not native_gpu", "-q", "-p",
         "no:cacheprovider"],
        # A guard against a hang, not a timing: about 2-3 minutes on two idle cores, four
        # times that on a loaded machine
        env=env, capture_output=True, text=True, cwd=Path(__file__).parent.parent,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


@pytest.mark.skipif(SIMULATED, reason="the simulator does not compile kernels")
@pytest.mark.parametrize("cc", [(8, 0), (9, 0)])
def test_kernels_compile_to_ptx(cc, monkeypatch):
    import dataclasses
    import types

    import numba.cuda.dispatcher
    from numba import cuda

    from ooc_svd.kernels import cuda as device_kernels

    # numba-cuda compiles the device functions a kernel calls for the current device, even
    # in compile_ptx; stand in a device of the target compute capability.
    monkeypatch.setattr(numba.cuda.dispatcher, "get_current_device",
                        lambda: types.SimpleNamespace(compute_capability=cc))
    for accumulate, data, index in [("float64", "float32", "int32"),
                                    ("float32", "float64", "int64")]:
        # Fresh dispatchers: none compiled for another device or capability.
        compiled = device_kernels._compile.__wrapped__(device_kernels.ACCUMULATE[accumulate],
                                                       device_kernels.DEFAULT_GEOMETRY)
        for name, signature in device_kernels.example_signatures(data, index).items():
            kernel = getattr(compiled, name)
            ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=cc,
                                      launch_bounds=kernel.targetoptions["launch_bounds"])
            assert f".target sm_{cc[0]}{cc[1]}" in ptx, name
            assert ".local" not in ptx, f"{name} keeps its register tiles in local memory"
            check_occupancy(name, ptx, cc)
    # What zero() launches: clear on float64 arrays.
    compiled = device_kernels._compile.__wrapped__(np.float64, device_kernels.DEFAULT_GEOMETRY)
    ptx, _ = cuda.compile_ptx(compiled.clear.py_func, "void(float64[::1])", cc=cc)
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    # Row groups narrower than a warp shuffle under a partial mask.
    narrow = device_kernels._compile.__wrapped__(
        np.float64, dataclasses.replace(device_kernels.DEFAULT_GEOMETRY, lanes=8))
    signatures = device_kernels.example_signatures()
    for name in ("csr_power", "csr_times", "csr_transposed"):
        ptx, _ = cuda.compile_ptx(getattr(narrow, name).py_func, signatures[name], cc=cc)
        assert "shfl.sync" in ptx, name


def check_occupancy(name: str, ptx: str, cc: tuple[int, int]):
    """Assemble ``ptx`` for ``cc`` as the driver would (nvJitLink, shipped with
    numba-cuda[cu13]) and check that the kernel spills no registers and that enough of its
    thread blocks fit on a multiprocessor: ``DENSE_TILE_BLOCKS`` of the dense tiled
    products (the launch bound), 2 of the others but the scan, which runs one block."""
    import re

    from cuda.bindings import nvjitlink

    from ooc_svd.kernels import cuda as device_kernels

    handle = nvjitlink.create(2, [f"-arch=sm_{cc[0]}{cc[1]}", "-verbose"])
    try:
        code = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, code, len(code), name)
        nvjitlink.complete(handle)
        log = bytearray(nvjitlink.get_info_log_size(handle))
        nvjitlink.get_info_log(handle, log)
    finally:
        nvjitlink.destroy(handle)
    log = log.decode()
    registers = int(re.findall(r"[Uu]sed (\d+) registers", log)[-1])
    shared = int((re.findall(r"(\d+) bytes smem", log) or ["0"])[-1])
    assert re.search(r"\b0 bytes spill stores", log), f"{name} spills registers:\n{log}"

    g = device_kernels.DEFAULT_GEOMETRY
    if name in ("dense_times", "dense_transposed"):
        threads, wanted = g.threads_x * g.threads_y, device_kernels.DENSE_TILE_BLOCKS
        assert f".minnctapersm {wanted}" in ptx, f"{name} lost its launch bounds"
    elif name == "column_starts":
        threads, wanted = g.scan_threads, 1
    elif name in ("csr_power", "csr_times", "csr_transposed", "csr_to_columns",
                  "columns_times"):
        threads, wanted = g.lanes * g.groups, 2
    else:
        threads, wanted = g.stats_threads, 2
    # sm_80 and sm_90: 65536 registers, 2048 threads and 32 blocks per multiprocessor,
    # registers allocated per warp in units of 256, 1 KiB of shared memory reserved per block.
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // 256) * 256
    shared_per_multiprocessor = {8: 164, 9: 228}[cc[0]] * 1024
    fit = min((65536 // per_warp) // warps, 2048 // threads, 32,
              shared_per_multiprocessor // (shared + 1024))
    assert fit >= wanted, (f"{name}: {fit} blocks of {threads} threads fit a multiprocessor "
                           f"({registers} registers, {shared} bytes of shared memory), "
                           f"not {wanted}")


@pytest.mark.skipif(USABLE, reason="a CUDA device is usable here")
def test_unusable_gpu_gets_a_clear_error():
    assert WHY_NOT
    with pytest.raises(CUDAUnavailableError, match="the cuda backend needs a usable NVIDIA GPU"):
        require_cuda()
    assert issubclass(CUDAUnavailableError, InputError)


@pytest.mark.parametrize(("shape", "message"), [
    ({"threads_x": 64, "threads_y": 32, "out_cols": 64}, "2048 threads per block exceeds"),
    ({"lanes": 32, "groups": 64}, "lanes \\* groups = 2048 threads per block"),
    ({"scan_threads": 2048}, "scan_threads = 2048 threads"),
    ({"tile": 128, "depth": 64}, "the dense tiles take 82944 bytes of shared memory"),
    ({"lanes": 64}, "lanes must be at most 32"),
    ({"tile": 48}, "must be a power of two"),
])
def test_a_geometry_beyond_what_a_launch_allows_is_refused(shape, message):
    from ooc_svd.kernels.cuda import DEFAULT_GEOMETRY, SIMULATOR_GEOMETRY, Geometry

    with pytest.raises(ValueError, match=message):
        Geometry(**shape)
    assert Geometry() == DEFAULT_GEOMETRY and SIMULATOR_GEOMETRY.tile == 4


@pytest.mark.skipif(SIMULATED, reason="the simulator has no CUDA compiler")
def test_a_gpu_older_than_the_compiler_targets_is_not_usable():
    """NVRTC 13 builds for compute capability 7.5 and up: a V100 (7.0) would fail at the
    first launch, so it is no usable GPU ('auto' takes the CPU, 'cuda' says why)."""
    from types import SimpleNamespace

    from numba.cuda.cudadrv.nvrtc import get_lowest_supported_cc

    from ooc_svd.kernels.cuda_backend import capability_shortfall

    def gpu_of(capability):
        device = SimpleNamespace(compute_capability=capability)
        return SimpleNamespace(gpus=[device])

    lowest = get_lowest_supported_cc()
    older = (lowest[0] - 1, 0)
    assert capability_shortfall(gpu_of(older)) == (
        f"the GPU's compute capability {older[0]}.0 is below {lowest[0]}.{lowest[1]}, the "
        "lowest that the installed CUDA compiler (NVRTC) targets")
    assert capability_shortfall(gpu_of(tuple(lowest))) == ""
    assert capability_shortfall(gpu_of((9, 0))) == ""


@pytest.mark.skipif(driver_library_loads(), reason="an NVIDIA driver library loads here")
def test_auto_backend_does_not_import_numba_cuda_without_a_driver():
    """Looking for a GPU costs microseconds, not the second of importing numba.cuda."""
    code = ("import sys, numpy as np, ooc_svd; "
            "r = ooc_svd.svd(np.arange(600.0).reshape(30, 20) ** 0.5, 2); "
            "print(r.backend, 'numba.cuda' in sys.modules)")
    env = {key: value for key, value in os.environ.items() if not key.startswith("NUMBA_")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120, check=True)
    assert done.stdout.split() == ["cpu", "False"]


@pytest.mark.skipif(USABLE, reason="a GPU (or the simulator) is usable here")
def test_cuda_without_a_gpu_is_named_before_the_memory_limit(tmp_path):
    """A limit too small for the GPU's pinned buffers must not hide the missing GPU."""
    import ooc_svd

    A = np.ones((4000, 50))
    for limit in ("2MB", "1GB"):
        with pytest.raises(CUDAUnavailableError, match="needs a usable NVIDIA GPU"):
            ooc_svd.svd_plan(A, 3, backend="cuda", memory_limit=limit)


def test_pinned_staging_buffers_that_do_not_fit_are_named_or_left_to_the_cpu(monkeypatch,
                                                                            tmp_path):
    """At 4 MB the cpu plan fits this store and the cuda one, with a pinned staging buffer
    per stream, does not: 'cuda' is refused naming the buffers and streams, where the
    plan's message alone advised rechunking; 'auto' runs on the CPU and says why."""
    import zarr

    import ooc_svd
    from ooc_svd import api
    from ooc_svd.errors import PlanError
    from ooc_svd.kernels import cuda_backend

    monkeypatch.setattr(api, "cuda_available", lambda allow_simulator=True: (True, ""))
    monkeypatch.setattr(cuda_backend, "cuda_available", lambda allow_simulator=True: (True, ""))
    path = str(tmp_path / "A.zarr")
    zarr.create_array(path, shape=(4000, 50), chunks=(1000, 50), dtype="f8")[:] = 1.0
    options = {"memory_limit": "4MB", "method": "randomized"}
    assert ooc_svd.svd_plan(path, 3, backend="cpu", **options).backend == "cpu"
    with pytest.raises(PlanError, match=r"cpu backend's plan fits: the cuda backend's pinned "
                                        r"staging buffers \(2 streams\) are what does not"):
        ooc_svd.svd_plan(path, 3, backend="cuda", **options)
    plan = ooc_svd.svd_plan(path, 3, backend="auto", **options)
    assert plan.backend == "cpu"
    assert "Kernels: cpu (the cuda backend's pinned staging buffers do not fit memory_limit)" \
        in plan.describe()
    with pytest.raises(PlanError, match="cannot hold one storage chunk") as refused:
        ooc_svd.svd_plan(path, 3, backend="cuda", memory_limit="2MB", method="randomized")
    assert "staging" not in str(refused.value)  # the cpu plan does not fit either


def test_a_gpu_whose_context_cannot_be_created_is_left_to_the_cpu_or_named(monkeypatch):
    """A GPU that passes ``cuda_available`` (which creates no context) may still refuse
    one: held by another process in exclusive-process mode, or with its memory full.
    'auto' then runs on the CPU and says why; 'cuda' is refused in one line."""
    from numba import cuda
    from numba.cuda.cudadrv.driver import CudaAPIError

    import ooc_svd
    from ooc_svd import api
    from ooc_svd.kernels import cuda_backend

    def held_elsewhere():
        raise CudaAPIError(46, "Call to cuDevicePrimaryCtxRetain results in "
                               "CUDA_ERROR_DEVICE_UNAVAILABLE")

    monkeypatch.setattr(api, "cuda_available", lambda allow_simulator=True: (True, ""))
    monkeypatch.setattr(cuda_backend, "cuda_available", lambda allow_simulator=True: (True, ""))
    monkeypatch.setattr(cuda, "current_context", held_elsewhere)
    A = np.random.default_rng(0).standard_normal((200, 20)).astype(np.float32)
    plan = ooc_svd.svd_plan(A, 3, backend="auto", method="randomized")
    assert plan.backend == "cpu"
    assert "the GPU's CUDA context could not be created ([46] Call to " \
           "cuDevicePrimaryCtxRetain results in CUDA_ERROR_DEVICE_UNAVAILABLE): another " \
           "process may hold the GPU (exclusive-process mode)" in plan.backend_reason
    with pytest.raises(CUDAUnavailableError, match="the cuda backend needs a usable NVIDIA "
                                                   "GPU: the GPU's CUDA context could not"):
        ooc_svd.svd_plan(A, 3, backend="cuda", method="randomized")


def test_device_bytes_counts_every_stream_buffer():
    n, l, block = 1000, 30, 64 << 20
    rows = block // (4 * n)
    # A block, Y_i, Q_i, Q_i S, four small factors and an int64 indptr per stream; X, the
    # two buffers of B^T, colsum and the shift once.
    per_stream = block + 3 * 8 * rows * l + 4 * 8 * (l + 1) ** 2 + 8 * (rows + 1)
    assert device_bytes(n, l, block) >= 2 * per_stream + 8 * (3 * n * l + 2 * n)
    assert device_bytes(n, l, block, streams=3) - device_bytes(n, l, block) == per_stream
    assert device_bytes(n, l, block, rows=10) < device_bytes(n, l, block)
    # The column order: a second copy of the block, and counts, starts and cursor.
    # (float32 values and int32 rows, where the block may hold as little as a one-byte
    # index a value: 8 bytes of the column order for 5 of the block)
    assert (device_bytes(n, l, block, columns=True) - device_bytes(n, l, block)
            == 2 * (-(-block * 8 // 5) + 3 * 8 * (n + 1)))
    assert (device_bytes(n, l, block, columns=True, value_bytes=8) -
            device_bytes(n, l, block) == 2 * (-(-block * 12 // 9) + 3 * 8 * (n + 1)))


def test_device_need_counts_the_rows_of_narrow_blocks():
    """Blocks of one-byte values have four times the rows of float32 blocks of the same
    bytes, and Y_i, Q_i and Q_i S have as many rows: the need counts them."""
    from ooc_svd.plan import make_plan
    from ooc_svd.sources.dense import regular_boundaries

    shape = (2_000_000, 1000)
    needs = {}
    for itemsize in (1, 4):
        plan = make_plan(shape, itemsize, regular_boundaries(shape[0], 20_000), 20, 10, 2,
                         "randomized", 2 * 10**9)
        need = DeviceNeed.of_plan(shape[1], plan, {})
        width = plan.basis_size + 1
        assert need.bytes >= device_bytes(shape[1], width, max(plan.block_bytes),
                                          rows=plan.block_rows)
        needs[itemsize] = need.bytes - STREAMS * max(plan.block_bytes)
    # Beyond the blocks themselves, the one-byte run needs about four times more per row.
    assert needs[1] > 2 * needs[4]


def test_csr_transposed_must_be_a_known_way():
    with pytest.raises(ValueError, match="csr_transposed must be one of"):
        CUDAKernels(5, csr_transposed="atomic")


@on_device
def test_auto_does_not_take_the_simulator_for_a_gpu():
    usable, reason = cuda_available(allow_simulator=False)
    assert usable is not SIMULATED
    assert bool(reason) is SIMULATED


@on_device
def test_cli_run_on_the_cuda_backend_writes_what_the_cpu_backend_writes(tmp_path):
    """``ooc-svd run --backend cuda`` on a zarr store, against ``--backend cpu``."""
    import zarr
    from click.testing import CliRunner

    from ooc_svd.cli import main

    rows, n = (48, 6) if SIMULATED else (30_000, 64)
    A = naive.matrix_with_spectrum(rows, n, np.logspace(0, -2, n), np.float32, seed=2)
    store = str(tmp_path / "A.zarr")
    zarr.create_array(store, shape=A.shape, chunks=(rows // 4, n), dtype="f4")[:] = A
    written = {}
    for backend in ("cpu", "cuda"):
        out = str(tmp_path / f"{backend}.zarr")
        run = CliRunner().invoke(main, ["run", store, "--k", "3", "--out", out, "--backend",
                                        backend, "--method", "randomized", "--niter", "2"])
        assert run.exit_code == 0, run.output
        assert f"on the {backend} backend" in run.output
        group = zarr.open_group(out, mode="r")
        written[backend] = (np.asarray(group["S"]), np.asarray(group["V"]))
    (S_cpu, V_cpu), (S_gpu, V_gpu) = written["cpu"], written["cuda"]
    np.testing.assert_allclose(S_gpu, S_cpu, rtol=1e-6)
    np.testing.assert_allclose(np.abs(V_gpu.T @ V_cpu), np.eye(3), atol=1e-4)


@on_device
@pytest.mark.parametrize(("kind", "method", "cuda_options"), [
    ("dense", "randomized", None),
    ("dense", "krylov", None),
    ("csr", "randomized", None),
    ("csr", "krylov", None),
    ("csr", "randomized", {"csr_transposed": "columns", "streams": 3}),
    ("csr", "krylov", {"csr_transposed": "columns", "streams": 1}),
    ("dense", "exact", None),  # the final pass over A V_k on the GPU
    ("csr", "gram", None),
])
def test_svd_with_the_cuda_backend_matches_the_cpu_backend(kind, method, cuda_options):
    import scipy.sparse

    import ooc_svd

    rows, n = (40, 7) if SIMULATED else (3000, 200)
    A = naive.matrix_with_spectrum(rows, n, np.logspace(0, -3, n), seed=2)
    if kind == "csr":
        A = scipy.sparse.random(rows, n, density=0.3, format="csr", random_state=2) * 5.0
    options = dict(method=method, niter=1, oversample=2, center=True, seed=4)
    cpu = ooc_svd.svd(A, 3, backend="cpu", **options)
    gpu = ooc_svd.svd(A, 3, backend="cuda", cuda_options=cuda_options, **options)
    assert (gpu.backend, cpu.backend) == ("cuda", "cpu")
    np.testing.assert_allclose(gpu.S, cpu.S, rtol=1e-10)
    np.testing.assert_allclose(gpu.V, cpu.V, atol=1e-8)
    np.testing.assert_allclose(gpu.U, cpu.U, atol=1e-8)
    np.testing.assert_allclose(gpu.mean, cpu.mean, rtol=1e-12)
    assert gpu.residual == pytest.approx(cpu.residual, rel=1e-9)


@on_device
@pytest.mark.parametrize(("kind", "cuda_options"), [
    ("dense", {"accumulate": "float32"}),
    ("csr", {"accumulate": "float32", "csr_transposed": "columns"}),
])
def test_float32_accumulation_keeps_the_residual_of_its_own_factors(kind, cuda_options):
    """The residual is ||A||^2 less ||B||^2, B = Q^T A from the final pass: B summed in
    float32 tiles would leave rounding of eps32 ||A||^2 in it, here far above the
    residual itself. U, S and V may lose a little to float32; the residual must stay that
    of the factors returned."""
    import scipy.sparse

    import ooc_svd

    rows, n = (60, 16) if SIMULATED else (3000, 200)
    rng = np.random.default_rng(5)
    A = rng.standard_normal((rows, 3)) @ rng.standard_normal((3, n)) + 100.0
    A += 1e-4 * rng.standard_normal((rows, n))
    if kind == "csr":
        A = scipy.sparse.csr_matrix(A)
    # k = 4: the mean's direction and the rank-3 part, leaving the 1e-4 noise, about 1e-6
    result = ooc_svd.svd(A, 4, method="randomized", niter=1, oversample=2, seed=4,
                         backend="cuda", cuda_options=cuda_options)
    dense = A.toarray() if kind == "csr" else A
    actual = np.linalg.norm(dense - (result.U * result.S) @ result.V.T) / np.linalg.norm(dense)
    assert actual < 1e-5
    assert result.residual == pytest.approx(actual, rel=1e-2)


@on_device
@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_cached_blocks_go_to_page_locked_memory_and_change_nothing(kind, tmp_path):
    import scipy.sparse
    import zarr

    import ooc_svd
    from ooc_svd.sources.csr import CSRWriter

    # On a GPU's sizes, chunks of 20 non-zeros would be 30000 files.
    rows, n, chunk_nnz = (60, 6, 20) if SIMULATED else (20_000, 100, 20_000)
    path = str(tmp_path / "A.zarr")
    if kind == "dense":
        array = zarr.create_array(path, shape=(rows, n), chunks=(rows // 6, n), dtype="f4")
        array[:] = naive.matrix_with_spectrum(rows, n, np.logspace(0, -2, n), seed=3)
    else:
        A = scipy.sparse.random(rows, n, density=0.3, format="csr", random_state=3, dtype="f4")
        with CSRWriter(path, n, np.float32, chunk_nnz=chunk_nnz) as writer:
            for start in range(0, rows, rows // 6):
                writer.append(A[start : start + rows // 6])
            writer.close()
    options = dict(method="randomized", niter=2, oversample=2, seed=1, memory_limit="1GB")
    cpu = ooc_svd.svd(path, 3, backend="cpu", **options)
    gpu = ooc_svd.svd(path, 3, backend="cuda", **options)
    assert gpu.plan.cached_blocks > 0 and gpu.records[1].bytes_read < gpu.records[0].bytes_read
    np.testing.assert_allclose(gpu.S, cpu.S, rtol=1e-6)
    np.testing.assert_allclose(np.abs(gpu.V.T @ cpu.V), np.eye(3), atol=1e-4)


@on_device
def test_a_workers_threads_take_turns_on_its_gpu(monkeypatch, tmp_path, block_rows):
    """A worker with several threads runs one GPU task at a time: each task's kernels
    hold a block's buffers per stream, which the plan counts once."""
    import threading

    import zarr
    from distributed import Client, LocalCluster

    import ooc_svd
    from ooc_svd.kernels import cuda_backend

    open_now, most, lock = [0], [0], threading.Lock()
    original_init, original_close = cuda_backend.CUDAKernels.__init__, \
        cuda_backend.CUDAKernels.close

    def counted_init(self, n, **options):
        original_init(self, n, **options)
        with lock:
            open_now[0] += 1
            most[0] = max(most[0], open_now[0])
        time.sleep(0.05)  # room for another thread's task to start beside this one

    def counted_close(self):
        with lock:
            open_now[0] -= 1
        original_close(self)

    monkeypatch.setattr(cuda_backend.CUDAKernels, "__init__", counted_init)
    monkeypatch.setattr(cuda_backend.CUDAKernels, "close", counted_close)
    block_rows(6, 6)  # 8 blocks, in 8 groups for the 3 threads
    A = naive.matrix_with_spectrum(48, 6, np.logspace(0, -3, 6), seed=2)
    path = str(tmp_path / "A.zarr")
    zarr.create_array(path, shape=A.shape, chunks=(6, 6), dtype=A.dtype)[:] = A
    options = dict(method="randomized", niter=1, oversample=2, seed=3)
    with LocalCluster(n_workers=1, threads_per_worker=3, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        gpu = ooc_svd.svd(path, 3, backend="cuda", client=client, **options)
    cpu = ooc_svd.svd(path, 3, backend="cpu", **options)
    assert len(gpu.plan.blocks) == 8
    assert gpu.backend == "cuda" and most[0] == 1 and open_now[0] == 0
    np.testing.assert_allclose(gpu.S, cpu.S, rtol=1e-10)


@on_device
def test_a_gpu_task_whose_kernels_fail_to_close_lets_the_next_one_run(monkeypatch):
    from ooc_svd import distributed
    from ooc_svd.kernels import cuda_backend

    def failing_close(self):
        raise RuntimeError("the device is gone")

    monkeypatch.setattr(cuda_backend.CUDAKernels, "close", failing_close)
    with pytest.raises(RuntimeError, match="the device is gone"), \
            distributed._task_kernels(6, ("cuda", None, None, None)) as kernels:
        assert kernels.name == "cuda"
    assert distributed._GPU_TURN.acquire(blocking=False)  # not left held
    distributed._GPU_TURN.release()


@on_device
def test_cuda_options_reach_the_kernels_here_and_on_workers(monkeypatch):
    """svd's cuda_options become CUDAKernels keywords (float32 accumulation stays close to
    the CPU's float64); a worker's kernels take the same options."""
    import ooc_svd
    from ooc_svd.distributed import worker_kernels
    from ooc_svd.kernels import cuda_backend

    made = []
    original = cuda_backend.CUDAKernels.__init__

    def recording(self, n, **options):
        made.append(options)
        original(self, n, **options)

    monkeypatch.setattr(cuda_backend.CUDAKernels, "__init__", recording)
    A = naive.matrix_with_spectrum(40, 7, np.logspace(0, -3, 7), seed=2)
    options = {"accumulate": "float32", "streams": 3}
    result = ooc_svd.svd(A, 3, backend="cuda", niter=1, oversample=2, cuda_options=options)
    assert made == [options]
    reference = ooc_svd.svd(A, 3, backend="cpu", niter=1, oversample=2)
    np.testing.assert_allclose(result.S, reference.S, rtol=1e-4)
    kernels = worker_kernels(7, "cuda", None, {"csr_transposed": "columns", "streams": 1})
    assert kernels.csr_transposed == "columns" and len(kernels.streams) == 1
    kernels.close()


@on_device
def test_a_gpu_without_room_for_the_run_is_a_plan_error_or_left_to_the_cpu(monkeypatch,
                                                                           tmp_path):
    """backend='cuda' refuses a run whose blocks and n x l arrays the GPU's free memory
    cannot hold, before writing anything; 'auto' runs it on the CPU. Workers alike."""
    import ooc_svd
    from ooc_svd import api
    from ooc_svd.distributed import worker_kernels
    from ooc_svd.errors import PlanError
    from ooc_svd.kernels import cuda_backend

    free = {"bytes": 1000}
    monkeypatch.setattr(cuda_backend, "device_memory", lambda: (free["bytes"], 2**40))
    monkeypatch.setattr(api, "cuda_available", lambda allow_simulator=True: (True, ""))
    monkeypatch.setattr(cuda_backend, "cuda_available", lambda allow_simulator=True: (True, ""))
    A = naive.matrix_with_spectrum(40, 7, np.logspace(0, -3, 7), seed=2)
    options = dict(niter=1, oversample=2, method="randomized")
    with pytest.raises(PlanError, match=r"the GPU has 1 kB free; .* need [0-9.]+ [kMG]?B"):
        ooc_svd.svd(A, 3, backend="cuda", out=str(tmp_path / "r.zarr"), **options)
    assert list(tmp_path.iterdir()) == []
    assert ooc_svd.svd(A, 3, backend="auto", **options).backend == "cpu"
    plan = ooc_svd.svd_plan(A, 3, backend="auto", **options)
    assert plan.backend == "cpu" and "the GPU has 1 kB free" in plan.backend_reason
    assert "Kernels: cpu (the GPU has 1 kB free" in plan.describe()
    need = cuda_backend.DeviceNeed(10_000, 5_000, 6)
    with pytest.raises(PlanError, match="the GPU has 1 kB free"):
        worker_kernels(7, "cuda", None, None, need)
    assert worker_kernels(7, "auto", None, None, need).name == "cpu"
    free["bytes"] = 2**30
    assert ooc_svd.svd(A, 3, backend="auto", **options).backend == "cuda"
    plan = ooc_svd.svd_plan(A, 3, backend="auto", **options)
    assert plan.backend == "cuda" and "of its 1.07 GB free" in plan.backend_reason
    gram = ooc_svd.svd_plan(A, 3, backend="auto", method="gram")
    assert (gram.backend, gram.backend_reason) == ("cpu", "the gram method factors on the CPU")
    kernels = worker_kernels(7, "auto", None, None, need)
    assert kernels.name == "cuda"
    kernels.close()
