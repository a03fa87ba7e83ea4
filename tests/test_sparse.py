"""Sparse CSR matrices: kernels against dense references, end to end against LAPACK."""

import re

import numpy as np
import pytest
import scipy.sparse
from naive import (
    csr_block_products,
    csr_gram,
    sparse_with_decay,
    subspace_distance,
    truncated_svd,
)

import ooc_svd
from ooc_svd.errors import NonFiniteError, PlanError
from ooc_svd.kernels.backend import CPUKernels
from ooc_svd.kernels.cpu import BlockStats
from ooc_svd.sources.csr import CSRBlock, CSRWriter, open_csr_group


def write_csr_store(path, A, rows_per_append=97, chunk_nnz=500):
    """A CSR zarr store of A, appended in row blocks of an awkward size."""
    with CSRWriter(path, A.shape[1], A.dtype, chunk_nnz=chunk_nnz) as writer:
        for start in range(0, A.shape[0], rows_per_append):
            writer.append(A[start : start + rows_per_append])
        return writer.close()


def awkward_block(dtype, index_dtype, seed=0):
    """12 x 9 with empty rows at the start, middle and end, and one row holding one value."""
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((12, 9)) * (rng.random((12, 9)) < 0.3)
    dense[[0, 5, 11]] = 0
    dense[7] = 0
    dense[7, 3] = 2.5
    A = scipy.sparse.csr_matrix(dense.astype(dtype))
    return CSRBlock(A.data, A.indices.astype(index_dtype), A.indptr.astype(np.int64), 9), A


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("prefetch", [False, True])
def test_csr_kernels_match_dense_references(dtype, index_dtype, shifted, prefetch, monkeypatch):
    import ooc_svd.kernels.csr

    if prefetch:  # as for an X too large for the cache, and close enough ahead that the
        monkeypatch.setattr(ooc_svd.kernels.csr, "PREFETCH_MIN_BYTES", 0)  # tiny blocks
        monkeypatch.setattr(ooc_svd.kernels.csr, "PREFETCH_AHEAD", 2)  # reach the guard

    block, A = awkward_block(dtype, index_dtype)
    rng = np.random.default_rng(1)
    X = np.asfortranarray(rng.standard_normal((9, 4)))
    Q = rng.standard_normal((12, 4))
    shift = rng.standard_normal(9) if shifted else np.zeros(9)
    Z_ref, Y_ref, CT_ref, colsum_ref, sumsq_ref = csr_block_products(A, X, Q, shift)
    kernels = CPUKernels(9)

    stats = BlockStats.zeros(9)
    sweep = kernels.power_sweep(X, stats)
    sweep.add(block[:5], 0, shift)  # two blocks, the first of them starting empty
    sweep.add(block[5:], 5, shift)
    np.testing.assert_allclose(sweep.result(), Z_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.colsum, colsum_ref, rtol=1e-12, atol=1e-12)
    assert stats.sumsq == pytest.approx(sumsq_ref, rel=1e-12)
    assert stats.rows == 12

    stats = BlockStats.zeros(9)
    np.testing.assert_allclose(kernels.times(block, 0, X, shift, stats), Y_ref, atol=1e-12)
    np.testing.assert_allclose(kernels.transposed_times(block, 0, Q, shift, stats), CT_ref,
                               atol=1e-12)
    np.testing.assert_allclose(stats.colsum, 2 * colsum_ref, atol=1e-12)


@pytest.mark.parametrize("shifted", [False, True])
def test_row_shift_kernels_match_dense_references(shifted):
    """B = A_s - c 1^T from the CPU kernels of A_s and the rank-one terms of c: the power
    sweep over two blocks, times and transposed_times, and their totals."""
    from ooc_svd.kernels.row_shift import RowShiftKernels
    from ooc_svd.sources.dense import open_dense_source

    block, A = awkward_block(np.float32, np.int32)
    rng = np.random.default_rng(3)
    X = np.asfortranarray(rng.standard_normal((9, 4)))
    Q = rng.standard_normal((12, 4))
    shift = rng.standard_normal(9) if shifted else np.zeros(9)
    c = 2.0 + rng.standard_normal(12)
    c[[0, 7]] = 0.0  # an empty row, and the row with a single value
    B = A.toarray().astype(np.float64) - shift - c[:, None]
    kernels = RowShiftKernels(CPUKernels(9), open_dense_source(c[:, None]))

    stats = BlockStats.zeros(9)
    sweep = kernels.power_sweep(X, stats)
    sweep.add(block[:5], 0, shift)
    sweep.add(block[5:], 5, shift)
    np.testing.assert_allclose(sweep.result(), B.T @ (B @ X), rtol=1e-12, atol=1e-11)
    np.testing.assert_allclose(stats.colsum, B.sum(axis=0), rtol=1e-12, atol=1e-12)
    assert stats.sumsq == pytest.approx(np.sum(B * B), rel=1e-12)
    assert stats.rows == 12

    stats = BlockStats.zeros(9)
    out = np.zeros((12, 5), order="F")
    Y = kernels.times(block, 0, X, shift, stats, out=out[:, :4])
    np.testing.assert_allclose(out[:, :4], B @ X, atol=1e-12)
    assert Y.flags.f_contiguous and not out[:, 4].any()
    np.testing.assert_allclose(kernels.transposed_times(block, 0, Q, shift, stats), B.T @ Q,
                               atol=1e-12)
    np.testing.assert_allclose(stats.colsum, 2 * B.sum(axis=0), atol=1e-12)
    assert stats.sumsq == pytest.approx(2 * np.sum(B * B), rel=1e-12)
    # A block further down takes c's rows from where it starts.
    stats = BlockStats.zeros(9)
    np.testing.assert_allclose(kernels.times(block[5:], 5, X, shift, stats), B[5:] @ X,
                               atol=1e-12)
    np.testing.assert_allclose(kernels.transposed_times(block[5:], 5, Q[5:], shift, stats),
                               B[5:].T @ Q[5:], atol=1e-12)
    assert stats.sumsq == pytest.approx(2 * np.sum(B[5:] ** 2), rel=1e-12)


def test_a_column_of_m_over_many_blocks_of_a_store(tmp_path, monkeypatch):
    """svd_lowrank with a column M on a CSR store read in many blocks: c's rows follow the
    blocks, through the power passes and the final pass, as on the dense difference."""
    import ooc_svd.plan
    import ooc_svd.sources.csr

    A = scipy.sparse.random(600, 5000, density=0.004, random_state=4, format="csr")
    path = str(tmp_path / "A.zarr")
    write_csr_store(path, A)
    column = 2.0 + np.random.default_rng(6).standard_normal((600, 1))
    monkeypatch.setattr(ooc_svd.sources.csr, "UNIT_BYTES", 4096)
    monkeypatch.setattr(ooc_svd.plan, "MAX_BLOCK_BYTES", 20_000)
    from ooc_svd.api import _Request, _run, open_matrix
    from ooc_svd.engine import fixed_rank
    from ooc_svd.sources.difference import sparse_column

    source = open_matrix(path)[0]
    result = _run(source, _Request(5, fixed_rank(5), oversample=0, niter=2,
                                   method="randomized", row_shift=sparse_column(source, column)))
    assert len(result.plan.blocks) > 5
    reference = ooc_svd.svd(A.toarray() - column, 5, oversample=0, niter=2,
                            method="randomized")
    scale = 1e-12 * reference.S[0]  # the sums differ in their rounding, block by block
    np.testing.assert_allclose(result.S, reference.S, rtol=0, atol=scale)
    np.testing.assert_allclose(np.abs(result.V.T @ reference.V), np.eye(5), atol=1e-8)
    assert result.frobenius_norm == pytest.approx(reference.frobenius_norm, rel=1e-12)
    U, S, V = ooc_svd.svd_lowrank(path, q=5, niter=2, M=column)  # the same, from the API
    np.testing.assert_allclose(S, reference.S, rtol=0, atol=scale)


@pytest.mark.parametrize("shape", [(300, 5000), (4200, 4100)])  # A^T less a row; A less c
def test_a_column_of_m_that_overflows_float64_is_named(shape):
    A = scipy.sparse.random(*shape, density=0.002, random_state=1, format="csr")
    with pytest.raises(NonFiniteError, match="overflow.* rescale the matrix"):
        ooc_svd.svd_lowrank(A, q=3, M=np.full((shape[0], 1), 1e160))


@pytest.mark.parametrize("method", ["randomized", "krylov", "exact", "gram"])
def test_a_mean_that_overflows_float64_is_named_without_numpy_warnings(method):
    """A sparse A is centered algebraically: its totals less those of the shift, which
    overflow here; the pass's end names that (the suite turns warnings into errors)."""
    A = scipy.sparse.random(300, 500, density=0.01, random_state=1, format="csr")
    with pytest.raises(NonFiniteError, match="overflows float64"):
        ooc_svd.svd(A, 3, mean=np.full(500, 1e160), method=method)


def test_csr_kernels_on_an_empty_block_and_a_single_value():
    X = np.ones((5, 2))
    empty = CSRBlock(np.zeros(0), np.zeros(0, np.int32), np.zeros(4, np.int64), 5)
    stats = BlockStats.zeros(5)
    kernels = CPUKernels(5)
    sweep = kernels.power_sweep(X, stats)
    sweep.add(empty, 0, np.zeros(5))
    single = CSRBlock(np.array([3.0]), np.array([2], np.int32), np.array([0, 0, 1]), 5)
    sweep.add(single, 3, np.zeros(5))
    expected = np.zeros((5, 2))
    expected[2] = 9.0
    np.testing.assert_array_equal(sweep.result(), expected)
    assert (stats.rows, stats.sumsq) == (5, 9.0)
    np.testing.assert_array_equal(kernels.times(empty, 0, X, np.zeros(5), stats), 0)
    # An empty block's Q_i in the final pass has no columns, with or without a shift.
    for shift in (np.zeros(5), np.arange(5.0)):
        CT = kernels.transposed_times(empty, 0, np.zeros((0, 0)), shift, BlockStats.zeros(5))
        assert CT.shape == (5, 0)


def test_densified_sub_blocks_feed_the_gram_and_exact_methods():
    from ooc_svd.kernels.cpu import widen_into

    block, A = awkward_block(np.float32, np.int32)
    shift = np.linspace(-1, 1, 9)
    out = np.empty((12, 9))
    stats = BlockStats.zeros(9)
    widen_into(block, 0, shift, out, stats)
    np.testing.assert_allclose(out, A.toarray() - shift, rtol=1e-7)
    np.testing.assert_allclose(stats.colsum, (A.toarray() - shift).sum(axis=0), atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 20])
def test_the_sparse_gram_kernel_matches_the_sum_over_rows(dtype, index_dtype, shifted,
                                                           threads, monkeypatch):
    """G's upper triangle and the pass's totals, over two blocks (the first starting with
    an empty row), with more threads than columns too (threads owning no column)."""
    import ooc_svd.kernels.csr
    from ooc_svd.kernels.csr import gram_into

    monkeypatch.setattr(ooc_svd.kernels.csr, "scatter_threads", lambda: threads)
    block, A = awkward_block(dtype, index_dtype)
    shift = np.random.default_rng(2).standard_normal(9) if shifted else np.zeros(9)
    G = np.zeros((9, 9), order="F")
    stats = BlockStats.zeros(9)
    gram_into(block[:5], 0, shift, G, stats)
    gram_into(block[5:], 5, shift, G, stats)
    _, _, _, colsum_ref, sumsq_ref = csr_block_products(A, np.zeros((9, 0)), np.zeros((12, 0)),
                                                        shift)
    np.testing.assert_allclose(np.triu(G), csr_gram(A, shift), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.colsum, colsum_ref, rtol=1e-12, atol=1e-12)
    assert stats.sumsq == pytest.approx(sumsq_ref, rel=1e-12) and stats.rows == 12


def test_gram_blocks_take_the_sparse_kernel_where_it_pays():
    """Rows of few non-zeros go through the pairs kernel, dense rows stored as CSR are
    densified for dsyrk (pairs cost ~300x a dsyrk product): the same G either way."""
    from ooc_svd.kernels.cpu import SubBlocks, gram_block
    from ooc_svd.plan import sparse_gram_pays
    from ooc_svd.sources.csr import row_pairs

    rng = np.random.default_rng(4)
    for density, pays in ((0.01, True), (1.0, False)):
        A = scipy.sparse.random(3000, 200, density=density, format="csr", random_state=rng)
        block = CSRBlock.from_scipy(A)
        assert sparse_gram_pays(3000, 200, row_pairs(block.indptr)) == pays
        G = np.zeros((200, 200), order="F")
        gram_block(block, 0, np.zeros(200), G, BlockStats.zeros(200), SubBlocks(200))
        dense = A.toarray()
        np.testing.assert_allclose(np.triu(G), np.triu(dense.T @ dense), rtol=1e-12,
                                   atol=1e-12)


def test_a_sparse_matrix_gets_the_exact_svd_where_its_dense_copy_does():
    """Its Gram matrix costs the pairs of each row's non-zeros, not m n^2: 'auto' takes gram
    for the sparse matrix as for the dense, where densifying made randomized the cheaper
    (16% off on sigma_1 here, a flat spectrum)."""
    A = scipy.sparse.random(20000, 1000, density=0.002, random_state=1, format="csr")
    sparse, dense = ooc_svd.svd(A, 5), ooc_svd.svd(A.toarray(), 5)
    assert sparse.method == dense.method == "gram"
    np.testing.assert_allclose(sparse.S, dense.S, rtol=1e-12)
    assert subspace_distance(sparse.V, dense.V) < 1e-8


def test_non_finite_values_name_their_row():
    A = sparse_with_decay(300, 20, 0.2, 0.1)
    A.data[A.indptr[123]] = np.nan
    for method in ("randomized", "gram"):
        # The cpu backend names the row; a GPU names the rows of the block (test_cuda.py).
        with pytest.raises(NonFiniteError, match="first at row 123"):
            ooc_svd.svd(A, 3, method=method, backend="cpu")


@pytest.mark.parametrize("method", ["randomized", "krylov", "exact", "gram"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_svd_matches_lapack(method, dtype):
    A = sparse_with_decay(2000, 120, 0.05, 0.4, dtype=dtype)
    U_ref, S_ref, V_ref = truncated_svd(A.toarray(), 8)
    result = ooc_svd.svd(A, 8, method=method, niter=3, memory_limit="20MB")
    rtol = 1e-5 if dtype == np.float32 else 1e-9
    np.testing.assert_allclose(result.S, S_ref, rtol=rtol)
    assert subspace_distance(result.V, V_ref) < 100 * rtol
    assert subspace_distance(np.asarray(result.U, np.float64), U_ref) < 100 * rtol


@pytest.mark.parametrize("niter", [4, 6])
def test_krylov_on_a_flat_sparse_spectrum_beats_subspace_iteration(niter):
    # Power-law column scales j^-1/2: singular values 5.5, 5.4, ... 2.7 at j = 10.
    A = sparse_with_decay(4000, 400, 0.02, 0.0, seed=3)
    A = (A @ scipy.sparse.diags(1 / np.sqrt(np.arange(1, 401)))).tocsr()
    S_ref = np.linalg.svd(A.toarray(), compute_uv=False)[:10]
    errors = {}
    for method in ("randomized", "krylov"):
        result = ooc_svd.svd(A, 10, method=method, niter=niter, oversample=10)
        errors[method] = np.max(np.abs(result.S - S_ref) / S_ref)
    assert errors["krylov"] < errors["randomized"] / 100, errors


def test_krylov_matches_arpack_to_1e_6_within_5_passes():
    from scipy.sparse.linalg import svds

    A = sparse_with_decay(4000, 400, 0.02, 0.0, seed=3)
    A = (A @ scipy.sparse.diags(1 / np.sqrt(np.arange(1, 401)))).tocsr()
    S_arpack = np.sort(svds(A, k=10, tol=0, random_state=0, return_singular_vectors=False))
    result = ooc_svd.svd(A, 10, method="krylov", niter=4)
    assert result.passes == 5
    np.testing.assert_allclose(result.S, S_arpack[::-1], rtol=1e-6)


def test_krylov_drops_the_dependent_blocks_of_a_rank_deficient_sparse_matrix():
    # Six distinct sparse rows, each repeated: rank 6, so the Krylov blocks run out of new
    # directions after the first.
    rows = sparse_with_decay(6, 300, 0.05, 0.0, seed=11)
    A = scipy.sparse.vstack([rows] * 500).tocsr()
    S_exact = np.linalg.svd(A.toarray(), compute_uv=False)
    result = ooc_svd.svd(A, 4, method="krylov", niter=5)
    np.testing.assert_allclose(result.S, S_exact[:4], rtol=1e-10)
    np.testing.assert_allclose(result.U.T @ result.U, np.eye(4), atol=1e-10)
    assert result.residual == pytest.approx(
        np.sqrt(np.sum(S_exact[4:] ** 2) / np.sum(S_exact**2)), rel=1e-6
    )


@pytest.mark.parametrize("method", ["randomized", "krylov", "gram", "exact"])
def test_sparse_pca_equals_dense_pca_of_the_centered_matrix(method):
    A = sparse_with_decay(1500, 60, 0.1, 0.0, seed=4)
    A.data += 3.0  # a large mean, so centering matters
    A = (A @ scipy.sparse.diags(np.exp(-0.3 * np.arange(60)))).tocsr()
    dense = A.toarray()
    _, S_ref, V_ref = truncated_svd(dense, 6, mean=dense.mean(axis=0))
    result = ooc_svd.svd(A, 6, center=True, method=method, niter=4)
    np.testing.assert_allclose(result.mean, dense.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(result.S, S_ref, rtol=1e-8)
    assert subspace_distance(result.V, V_ref) < 1e-6
    centered = dense - dense.mean(axis=0)
    truncation = np.sqrt(max(np.sum(centered**2) - np.sum(S_ref**2), 0.0))
    assert result.residual == pytest.approx(truncation / np.linalg.norm(centered), rel=1e-6)


@pytest.mark.parametrize("offset", [1e2, 1e6])
def test_a_mean_that_dwarfs_the_spread_is_noted_when_it_costs_accuracy(offset):
    """Sparse centering is algebraic: with a mean 1e6 times the spread, the norm (and the
    residual) lose digits the singular values keep; the note says so, with its size."""
    rng = np.random.default_rng(0)
    dense = offset + rng.standard_normal((3000, 40)) * np.logspace(0, -2, 40)
    result = ooc_svd.svd(scipy.sparse.csr_matrix(dense), 5, center=True, niter=4,
                         method="randomized")
    centered = dense - dense.mean(axis=0)
    S_ref = np.linalg.svd(centered, compute_uv=False)
    np.testing.assert_allclose(result.S, S_ref[:5], rtol=1e-8)
    norm_error = abs(result.frobenius_norm / np.linalg.norm(centered) - 1)
    if offset > 1e4:
        assert "centered algebraically" in result.note
        assert norm_error > 1e-5  # what the note warns of is real
        said = float(re.search(r"relative error of up to about (\S+) ", result.note)[1])
        assert 2 * norm_error < said < 1e3 * norm_error  # (of the squared norm)
    else:
        assert result.note == "" and norm_error < 1e-8
    assert ooc_svd.svd(dense, 5, center=True, niter=4, method="randomized").note == ""
    # gram subtracts the mean found in its pass from G after the sums: 'auto' switches to
    # the exact method there, and an explicit gram run's note names S, U and V too.
    auto = ooc_svd.svd(scipy.sparse.csr_matrix(dense), 5, center=True)
    np.testing.assert_allclose(auto.S, S_ref[:5], rtol=1e-10)
    gram = ooc_svd.svd(scipy.sparse.csr_matrix(dense), 5, center=True, method="gram")
    if offset > 1e4:
        assert auto.method == "exact" and "switched to the exact method" in auto.note
        assert "the singular values and vectors" in gram.note
    else:
        assert auto.method == "gram" and gram.note == ""


def test_torch_style_entry_points_take_sparse_input():
    A = sparse_with_decay(800, 50, 0.1, 0.2, seed=5)
    dense = A.toarray()
    U, S, V = ooc_svd.svd_lowrank(A, q=6, niter=3)
    _, S_ref, _ = truncated_svd(dense, 6)
    np.testing.assert_allclose(S, S_ref, rtol=1e-6)
    U, S, V = ooc_svd.pca_lowrank(A, q=4, niter=3)
    _, S_ref, _ = truncated_svd(dense, 4, mean=dense.mean(axis=0))
    np.testing.assert_allclose(S, S_ref, rtol=1e-6)


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
def test_scipy_formats_give_the_same_result(fmt):
    A = sparse_with_decay(700, 40, 0.1, 0.2, seed=6)
    reference = ooc_svd.svd(A, 5, seed=3)
    result = ooc_svd.svd(A.asformat(fmt), 5, seed=3)
    np.testing.assert_allclose(result.S, reference.S, rtol=1e-12)
    np.testing.assert_allclose(result.V, reference.V, atol=1e-10)


def test_csr_store_and_npz_give_the_in_memory_result(tmp_path):
    A = sparse_with_decay(3000, 70, 0.05, 0.1, dtype=np.float32, seed=7)
    group = write_csr_store(str(tmp_path / "A.zarr"), A)
    assert dict(group.attrs)["encoding-type"] == "csr_matrix"
    scipy.sparse.save_npz(tmp_path / "A.npz", A)
    reference = ooc_svd.svd(A, 6, seed=1, method="randomized")
    for source in (str(tmp_path / "A.zarr"), group, str(tmp_path / "A.npz")):
        result = ooc_svd.svd(source, 6, seed=1, method="randomized")
        np.testing.assert_allclose(result.S, reference.S, rtol=1e-6)
        assert subspace_distance(result.V, reference.V) < 1e-5


class CountedReads:
    """A zarr array whose reads are counted."""

    def __init__(self, array):
        self.array, self.reads = array, 0

    def __getattr__(self, name):
        return getattr(self.array, name)

    def __getitem__(self, key):
        self.reads += 1
        return self.array[key]


def test_blocks_smaller_than_a_storage_chunk_decode_it_once(tmp_path):
    """A compressed chunk is decoded whole: blocks read in order, many to a chunk, take it
    from the one decoded last instead of decoding it again for each block. A copy of the
    source (a worker's) keeps no chunk of the original's."""
    import pickle
    from dataclasses import replace

    A = sparse_with_decay(3000, 70, 0.05, 0.1, dtype=np.float32, seed=7)
    group = write_csr_store(str(tmp_path / "A.zarr"), A, chunk_nnz=4000)
    source = open_csr_group(group, "A")
    counted = {name: CountedReads(getattr(source, name))
               for name in ("indptr", "indices", "data")}
    source = replace(source, **counted)
    blocks = [source.read(start, min(start + 40, 3000)) for start in range(0, 3000, 40)]
    for name, array in counted.items():
        assert array.reads == -(-array.shape[0] // array.chunks[0]), name
    read = scipy.sparse.vstack([block.to_scipy() for block in blocks])
    assert (read != A).nnz == 0
    shipped = open_csr_group(group, "A")
    shipped.read(0, 40)
    assert pickle.loads(pickle.dumps(shipped)).latest_chunks._latest == {}
    source.read(3000 - 40, 3000)  # the chunks decoded last, again
    assert [array.reads for array in counted.values()] == \
        [-(-array.shape[0] // array.chunks[0]) for array in counted.values()]


def test_latest_chunks_reads_any_range_as_one_slice_would(tmp_path):
    """Ranges within a chunk, across several, empty, at the ragged end, in any order: the
    values of one slice; chunks covered whole are read in one slice per read, not one
    chunk at a time (zarr decodes a slice's chunks concurrently)."""
    import zarr

    from ooc_svd.sources.csr import LatestChunks

    values = np.arange(1003, dtype=">i4")  # big-endian, as a zarr v2 store may hold
    array = CountedReads(zarr.create_array(str(tmp_path / "a.zarr"), shape=values.shape,
                                           chunks=(100,), dtype=values.dtype))
    array.array[:] = values
    latest = LatestChunks()
    rng = np.random.default_rng(0)
    ranges = [(0, 0), (0, 1003), (1000, 1003), (1003, 1003), (99, 101), (100, 300),
              (250, 250), (5, 950)] + [tuple(sorted(rng.integers(0, 1004, 2)))
                                       for _ in range(200)]
    for start, stop in ranges:
        read = latest.read("a", array, int(start), int(stop), np.dtype(np.int64))
        assert read.dtype == np.int64
        np.testing.assert_array_equal(read, values[start:stop])
    array.reads = 0
    latest.read("a", array, 150, 950, np.dtype(np.int64))  # parts of 2 chunks, 7 whole
    assert array.reads == 3


def with_repeats(A):
    """A's non-zeros stored each as two entries of the same column, rows unsorted: the same
    matrix, not in canonical CSR order."""
    coo = A.tocoo()
    order = np.lexsort((-coo.col, coo.row))  # columns decreasing within each row
    rows, cols, values = coo.row[order], coo.col[order], coo.data[order]
    pointers = np.concatenate([[0], np.cumsum(2 * np.bincount(rows, minlength=A.shape[0]))])
    return (pointers, np.repeat(cols, 2).astype(np.int32),
            np.stack([values + 1, -np.ones_like(values)], axis=1).reshape(-1))


def test_repeated_and_unsorted_entries_count_once_in_the_norm(tmp_path):
    """Repeated columns in a row are summed, as scipy sums them: the products never cared,
    but the squared norm (hence the residual and the ranks chosen by tolerance) did. The
    store is big-endian too, which numba cannot read as is."""
    import zarr

    A = sparse_with_decay(400, 30, 0.2, 0.3, seed=9)
    pointers, columns, values = with_repeats(A)
    repeated = scipy.sparse.csr_matrix((values, columns, pointers), shape=A.shape)
    assert not repeated.has_canonical_format
    np.testing.assert_allclose(repeated.toarray(), A.toarray(), atol=1e-15)
    # A zarr v2 store, big-endian as such stores may be
    group = zarr.open_group(str(tmp_path / "A.zarr"), mode="w", zarr_format=2)
    group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                        "shape": list(A.shape)})
    for name, array in (("indptr", pointers), ("indices", columns), ("data", values)):
        group.create_array(name, shape=array.shape, dtype=array.dtype.newbyteorder(">"),
                           chunks=(100,))[:] = array
    reference = ooc_svd.svd(A, 5, method="exact")
    kept = repeated.data.copy()
    for source in (repeated, str(tmp_path / "A.zarr")):
        result = ooc_svd.svd(source, 5, method="exact")
        np.testing.assert_allclose(result.frobenius_norm, scipy.sparse.linalg.norm(A),
                                   rtol=1e-12)
        np.testing.assert_allclose(result.residual, reference.residual, rtol=1e-10)
        np.testing.assert_allclose(result.S, reference.S, rtol=1e-12)
        assert ooc_svd.svd(source, tol=0.5, method="exact").rank == ooc_svd.svd(
            A, tol=0.5, method="exact").rank
    np.testing.assert_array_equal(repeated.data, kept)  # the caller's matrix is untouched


def test_results_do_not_depend_on_the_blocking(tmp_path, monkeypatch):
    import ooc_svd.plan
    import ooc_svd.sources.csr

    A = sparse_with_decay(5000, 90, 0.05, 0.05, seed=8)
    path = str(tmp_path / "A.zarr")
    write_csr_store(path, A)
    one = ooc_svd.svd(path, 6, seed=2, method="randomized", center=True)
    monkeypatch.setattr(ooc_svd.sources.csr, "UNIT_BYTES", 4096)
    monkeypatch.setattr(ooc_svd.plan, "MAX_BLOCK_BYTES", 20_000)
    many = ooc_svd.svd(path, 6, seed=2, method="randomized", center=True)
    assert len(many.plan.blocks) > 10 and len(one.plan.blocks) == 1
    for result in (one, many):  # what was read is what the plan said, however blocked
        assert result.bytes_read == result.plan.bytes_to_read
    np.testing.assert_allclose(many.S, one.S, rtol=1e-10)
    np.testing.assert_allclose(many.V, one.V, atol=1e-8)


def test_wide_sparse_matrices_work():
    A = sparse_with_decay(60, 900, 0.2, 0.01, seed=9)
    _, S_ref, V_ref = truncated_svd(A.toarray(), 5)
    result = ooc_svd.svd(A, 5, method="krylov", niter=4)
    np.testing.assert_allclose(result.S, S_ref, rtol=1e-8)


def test_plan_counts_the_n_by_l_arrays_and_refuses_with_numbers(monkeypatch):
    A = scipy.sparse.random(100, 2_000_000, density=1e-5, format="csr", random_state=0)
    refusal = r"working set .* and the smallest block it can read need [0-9.]+ [kMG]B"
    with pytest.raises(PlanError, match=refusal) as refused:
        ooc_svd.svd_plan(A, k=50, memory_limit="100MB")
    # the n x l arrays are what does not fit, not the chunks: A^T's are m x l
    assert str(refused.value).endswith("; raise memory_limit; or factor A^T (2000000 x 100) "
                                       "instead, whose U and V are V and U here")
    A = A[:, :20_000].tocsr()
    plan = ooc_svd.svd_plan(A, k=5, memory_limit="1GB")
    assert plan.sparse and "sparse matrix" in plan.describe()
    assert plan.scatter_copies >= 1
    # On many cores the power kernel's private accumulators give way to the limit.
    monkeypatch.setattr(ooc_svd.api, "scatter_threads", lambda: 1000)
    plan = ooc_svd.svd_plan(A, k=5, memory_limit="60MB")
    assert 1 <= plan.scatter_copies < 1000
    assert plan.scatter_copies * 8 * 20_000 * 16 <= 60e6 / 4 < plan.predicted_peak_bytes
    assert plan.bytes_per_pass == A.nnz * (A.data.itemsize + A.indices.itemsize) + 100 * 8


def test_units_of_short_rows_are_cut_by_rows_too(tmp_path):
    """Rows of one non-zero make units of a few bytes a row, but a block also carries
    float64 rows of the basis width: units stop at UNIT_ROWS rows, in a store and in
    memory, so a wide Krylov basis fits a small limit, which one unit of all rows did not."""
    from ooc_svd.sources.csr import UNIT_ROWS, csr_source_from_scipy

    rows = 5 * UNIT_ROWS + 7
    columns = np.random.default_rng(1).integers(0, 3000, rows)
    A = scipy.sparse.csr_matrix((np.ones(rows), columns, np.arange(rows + 1)), shape=(rows, 3000))
    for source in (open_csr_group(write_csr_store(str(tmp_path / "A.zarr"), A,
                                                  rows_per_append=10_000, chunk_nnz=50_000),
                                  "A"),
                   csr_source_from_scipy(A)):
        assert np.diff(source.chunk_rows).max() <= UNIT_ROWS
        assert np.all(source.chunk_rows[1:-1] % UNIT_ROWS == 0)
    plan = ooc_svd.svd_plan(str(tmp_path / "A.zarr"), 10, method="krylov", niter=3,
                            memory_limit="50MB")
    assert len(plan.blocks) > 1


def test_open_csr_group_validates_the_layout(tmp_path):
    import zarr

    group = zarr.open_group(str(tmp_path / "bad.zarr"), mode="w")
    group.attrs.update({"encoding-type": "csr_matrix", "shape": [3, 3]})
    group.create_array("indptr", data=np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="lacks"):
        open_csr_group(group, "bad.zarr")


def test_auto_takes_an_exact_method_that_costs_at_most_twice_the_cheapest_or_1_s_more():
    """A tall sparse matrix of 600 columns: randomized is a little cheaper by the cost model,
    gram exact."""
    A = scipy.sparse.random(1000, 600, density=0.05, random_state=0, format="csr")
    result = ooc_svd.svd(A, 5)
    assert result.method in ("exact", "gram") and "exact to rounding at" in result.plan.reason
    np.testing.assert_allclose(result.S, np.linalg.svd(A.toarray(), compute_uv=False)[:5],
                               rtol=1e-10)
    costs = re.findall(r"(\w+) ~([0-9.e-]+) s", result.plan.reason)
    seconds = {name: float(value) for name, value in costs}
    assert seconds["randomized"] < seconds[result.method] <= max(
        2 * seconds["randomized"], seconds["randomized"] + 1)


def test_a_norm_lost_to_cancellation_is_not_called_a_zero_matrix():
    """Sparse rows of a mean 1e9 x their spread, centered algebraically: ||A_c||^2 rounds
    to zero, but the singular values are not, and the note says the norm is lost, not
    that A - 1 mu^T is zero."""
    rng = np.random.default_rng(5)
    A = 1e9 + rng.standard_normal((2000, 5)) @ rng.standard_normal((5, 50))
    result = ooc_svd.svd(scipy.sparse.csr_matrix(A), 5, center=True, method="exact")
    assert result.S[0] > 100 and "centered algebraically" in result.note
    assert "is zero" not in result.note and "Frobenius norm, residual" in result.note


def test_a_centered_sparse_matrix_that_is_exactly_zero_gets_the_zero_note_alone():
    rows = scipy.sparse.random(1, 500, density=0.02, rng=1, format="csr")
    for method in ("gram", "exact", "randomized"):
        result = ooc_svd.svd(rows, 1, center=True, method=method)
        assert result.note == "every row of A read as the mean: A - 1 mu^T is zero"


@pytest.mark.parametrize("n", [30, 200])
def test_gram_counts_a_given_mean_against_its_accuracy_where_the_pairs_kernel_took_it(n):
    """A given mean is taken off sparse blocks before dsyrk where they are densified (no
    cancellation: G is accurate), but after the products where the pairs kernel sums them
    (G keeps the rounding of the uncentered A): only then is gram short of accuracy, and
    'auto' pays the exact method's extra pass."""
    from ooc_svd.plan import sparse_gram_pays
    from ooc_svd.sources.csr import row_pairs

    rng = np.random.default_rng(0)
    A = scipy.sparse.random(3000, n, density=0.05, rng=4, format="lil")
    A[:, 0] = (1e6 + 0.01 * rng.standard_normal(3000))[:, None]  # a mean 1e8 its spread
    A = A.tocsr()
    mean = np.asarray(A.mean(axis=0)).ravel()
    S_ref = np.linalg.svd(A.toarray() - mean, compute_uv=False)[:5]
    pairs = sparse_gram_pays(*A.shape, row_pairs(A.indptr))
    assert pairs == (n == 200)  # one block, by either path
    gram = ooc_svd.svd(A, 5, mean=mean, method="gram")
    auto = ooc_svd.svd(A, 5, mean=mean)
    np.testing.assert_allclose(auto.S, S_ref, rtol=1e-10)
    if pairs:
        assert "too small for the gram method's accuracy" in gram.note
        assert "the singular values and vectors, the Frobenius norm" in gram.note
        assert (auto.method, auto.passes) == ("exact", 3)
    else:
        np.testing.assert_allclose(gram.S, S_ref, rtol=1e-10)
        assert "gram method's accuracy" not in gram.note
        assert "singular values and vectors" not in gram.note
        assert (auto.method, auto.passes) == ("gram", 2)


def test_malformed_scipy_arrays_and_csr_attributes_are_refused_by_name(tmp_path):
    """scipy does not check the arrays a matrix is built from; a CSR group's shape
    attribute is read as it is stored."""
    import zarr

    from ooc_svd.errors import InputError, ReadError

    decreasing = scipy.sparse.csr_matrix(
        (np.array([1.0, 2.0, 3.0]), np.array([0, 1, 0]), np.array([0, 2, 1, 3])), shape=(3, 2))
    with pytest.raises(ReadError, match="rows \\[0, 3\\) of scipy.sparse csr_matrix are "
                                        "corrupt: indptr decreases"):
        ooc_svd.svd(decreasing, 1)
    A = scipy.sparse.random(40, 10, density=0.3, format="csr", random_state=3)
    path = str(tmp_path / "A.zarr")
    ooc_svd.convert.from_scipy(A, path)
    for shape in ("40x10", [40, 10, 1], None, [40.0, 10]):
        zarr.open_group(path, mode="r+").attrs["shape"] = shape
        with pytest.raises(InputError, match="the shape attribute must be two integers"):
            ooc_svd.svd(path, 1)


def test_absent_chunks_of_a_csr_store_are_noted(tmp_path):
    """zarr reads a lost chunk of data or indices as the fill value, as it does a dense
    store's: the note counts them, per array."""
    import os

    A = scipy.sparse.random(2000, 300, density=0.05, format="csr", random_state=0)
    path = str(tmp_path / "A.zarr")
    ooc_svd.convert.from_scipy(A, path, chunk_nnz=1000)
    assert ooc_svd.svd(path, 3).note == ""
    chunks = sorted(os.listdir(os.path.join(path, "data", "c")))
    os.remove(os.path.join(path, "data", "c", chunks[3]))
    note = ooc_svd.svd(path, 3).note
    assert f"chunks of {path} are absent (1 of the {len(chunks)} storage chunks of data)" \
        in note


def test_blas_keeps_one_thread_beside_the_sparse_kernels(monkeypatch, request):
    """numba's CSR kernels take every core, and OpenBLAS's threads spin after each product:
    while a pass reads sparse blocks, BLAS has one thread; over dense blocks held in memory,
    in the exact method's QR of sparse ones, and in a final pass whose local QRs outweigh
    its sparse products (a wide basis on rows of few non-zeros), it keeps every thread it
    had, and has them back after a pass that fails as it starts."""
    from threadpoolctl import threadpool_info, threadpool_limits

    import ooc_svd.kernels.backend as backend
    import ooc_svd.passes as passes

    def blas_threads_now() -> int:
        return max(pool["num_threads"] for pool in threadpool_info()
                   if pool["user_api"] == "blas")

    seen, factor = [], backend.local_qr
    monkeypatch.setattr(backend, "local_qr", lambda Y: (seen.append(blas_threads_now()),
                                                        factor(Y))[1])
    limits = threadpool_limits(2, user_api="blas")
    threads = blas_threads_now()
    if threads < 2:
        limits.restore_original_limits()
        pytest.skip("BLAS has one thread here: one thread beside the kernels changes nothing")
    request.addfinalizer(limits.restore_original_limits)
    sparse = scipy.sparse.random(300, 40, density=0.2, format="csr", random_state=0)
    ooc_svd.svd(sparse, k=3, method="randomized")
    assert seen and set(seen) == {1}
    seen.clear()
    ooc_svd.svd(sparse.toarray(), k=3, method="randomized")
    assert seen and set(seen) == {threads}
    in_exact_pass, factor_r = [], passes._stack_and_factor  # the exact method's TSQR pass
    monkeypatch.setattr(passes, "_stack_and_factor", lambda *args: (
        in_exact_pass.append(blas_threads_now()), factor_r(*args))[1])
    ooc_svd.svd(sparse, k=3, method="exact")
    assert in_exact_pass and set(in_exact_pass) == {threads}
    seen.clear()
    few_per_row = scipy.sparse.random(2000, 600, density=0.002, format="csr", random_state=0)
    ooc_svd.svd(few_per_row, k=100, method="randomized")
    assert seen and set(seen) == {threads}

    def failing(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(passes, "prefetch_blocks", failing)
    with pytest.raises(KeyboardInterrupt) as caught:
        ooc_svd.svd(sparse, k=3, method="randomized")
    # While the error is held (its traceback keeps the pass's frames alive), not only once
    # the frames are collected
    assert caught.value is not None and blas_threads_now() == threads
