"""Peak memory stays under memory_limit on a store several times larger than the limit."""

import tracemalloc

import numpy as np
import pytest

import ooc_svd


def traced_run(path, method, limit, out, k=4):
    """(result, peak traced bytes) of a run writing U to ``out``, after a first run that
    compiles the kernels."""
    ooc_svd.svd(path, k, niter=1, method=method, memory_limit=limit, out=out)
    tracemalloc.start()
    try:
        result = ooc_svd.svd(
            path, k, niter=1, method=method, memory_limit=limit, out=out, overwrite=True
        )
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    ("method", "limit"),
    [("randomized", 5_000_000), ("krylov", 5_000_000), ("exact", 7_000_000),
     ("gram", 5_000_000)],
)
def test_peak_allocation_stays_under_the_limit(tmp_path, zarr_matrix, method, limit):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((100_000, 64)).astype(np.float32)  # 25.6 MB
    path = zarr_matrix(A, chunk_rows=1000)
    out = str(tmp_path / "result.zarr")  # U goes to the store, not to memory
    result, peak = traced_run(path, method, limit, out)
    assert len(result.plan.blocks) > 10
    assert result.plan.predicted_peak_bytes <= limit
    assert peak < limit, f"peak {peak / 1e6:.1f} MB over the {limit / 1e6:.1f} MB limit"
    assert A.nbytes > 3 * limit


def smallest_limit(path, k, method) -> int:
    """The smallest memory_limit (to 1%) that the plan of a run accepts."""
    low, high = 1_000_000, 1_000_000_000
    while high - low > high // 100:
        middle = (low + high) // 2
        try:
            ooc_svd.svd_plan(path, k, niter=1, method=method, memory_limit=middle)
            high = middle
        except ooc_svd.PlanError:
            low = middle
    return high


@pytest.mark.parametrize("method", ["randomized", "exact", "gram"])
def test_a_final_pass_nearly_as_wide_as_the_matrix_stays_under_the_limit(
    tmp_path, zarr_matrix, method
):
    """k close to n, at the smallest limit the plan accepts: the final pass's l x l merge
    factors and, for exact and gram, their n x n factors before it weigh as much as the
    n x l arrays."""
    A = np.random.default_rng(2).standard_normal((50_000, 200)).astype(np.float32)  # 40 MB
    path = zarr_matrix(A, chunk_rows=500)
    limit = smallest_limit(path, 180, method)
    result, peak = traced_run(path, method, limit, str(tmp_path / "result.zarr"), k=180)
    assert len(result.plan.blocks) > 10 and not result.plan.spill_in_memory
    assert result.plan.predicted_peak_bytes <= limit
    assert peak < limit, f"peak {peak / 1e6:.1f} MB over the {limit / 1e6:.1f} MB limit"


def test_block_cache_serves_later_passes_and_changes_nothing(zarr_matrix, monkeypatch):
    from ooc_svd.sources.dense import DenseSource

    A = np.random.default_rng(1).standard_normal((20_000, 50))  # 8 MB, 20 chunks
    path = zarr_matrix(A, chunk_rows=1000)
    reads = []
    original = DenseSource.read

    def counting_read(self, start, stop):
        reads.append((start, stop))
        return original(self, start, stop)

    monkeypatch.setattr(DenseSource, "read", counting_read)
    small = ooc_svd.svd(path, 5, method="randomized", niter=3, memory_limit="9MB")
    assert 0 < small.plan.cached_blocks < len(small.plan.blocks)
    uncached = len(small.plan.blocks) - small.plan.cached_blocks
    assert len(reads) == len(small.plan.blocks) + 3 * uncached
    assert small.bytes_read == small.plan.bytes_to_read

    reads.clear()
    roomy = ooc_svd.svd(path, 5, method="randomized", niter=3, memory_limit="1GB")
    assert roomy.plan.cached_blocks == len(roomy.plan.blocks)
    assert len(reads) == len(roomy.plan.blocks)  # A is read once for four passes
    np.testing.assert_allclose(roomy.S, small.S, rtol=1e-12)
    np.testing.assert_allclose(roomy.U, small.U, atol=1e-12)


@pytest.mark.parametrize("sparse", [False, True])
def test_a_cache_of_every_block_holds_the_last_as_the_working_sets(tmp_path, zarr_matrix,
                                                                  monkeypatch, sparse):
    """At the least limit that takes A as one block, the block is kept for the later
    passes (read once for four), and the run stays under the limit."""
    import scipy.sparse

    from ooc_svd.convert import from_scipy
    from ooc_svd.sources import CSRSource, DenseSource

    rng = np.random.default_rng(3)
    if sparse:
        A = scipy.sparse.random(40_000, 300, density=0.05, format="csr", random_state=3)
        path = str(tmp_path / "A.zarr")
        from_scipy(A, path, dtype="float64", chunk_nnz=50_000)
    else:
        path = zarr_matrix(rng.standard_normal((40_000, 50)), chunk_rows=2000)  # 16 MB
    limit = ooc_svd.svd_plan(path, 4, niter=3, method="randomized").predicted_peak_bytes
    plan = ooc_svd.svd_plan(path, 4, niter=3, method="randomized", memory_limit=limit)
    assert len(plan.blocks) == 1 == plan.cached_blocks and plan.cached_beside_bytes == 0
    reads = []
    source = CSRSource if sparse else DenseSource
    original = source.read

    def counting_read(self, start, stop):
        reads.append((start, stop))
        return original(self, start, stop)

    monkeypatch.setattr(source, "read", counting_read)
    ooc_svd.svd(path, 4, niter=3, method="randomized", memory_limit=limit)  # compiles
    reads.clear()
    tracemalloc.start()
    try:
        result = ooc_svd.svd(path, 4, niter=3, method="randomized", memory_limit=limit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(reads) == 1 and result.passes == 4  # read once for four passes
    assert result.bytes_read == result.plan.bytes_to_read == plan.bytes_per_pass
    assert peak < limit, f"peak {peak / 1e6:.1f} MB over the {limit / 1e6:.1f} MB limit"


@pytest.mark.parametrize(("method", "limit"), [("randomized", 6_000_000), ("krylov", 8_000_000)])
def test_sparse_store_peak_allocation_stays_under_the_limit(tmp_path, monkeypatch, method, limit):
    import scipy.sparse

    import ooc_svd.sources.csr
    from ooc_svd.sources.csr import CSRWriter

    monkeypatch.setattr(ooc_svd.sources.csr, "UNIT_BYTES", 1 << 18)
    A = scipy.sparse.random(200_000, 500, density=0.02, format="csr", random_state=0)
    path = str(tmp_path / "A.zarr")
    with CSRWriter(path, 500, np.float64, chunk_nnz=50_000) as writer:
        for start in range(0, A.shape[0], 20_000):
            writer.append(A[start : start + 20_000])
        writer.close()
    raw = A.nnz * 12 + A.shape[0] * 8  # 24.8 MB
    out = str(tmp_path / "result.zarr")
    result, peak = traced_run(path, method, limit, out)
    assert len(result.plan.blocks) > 10
    assert result.plan.bytes_per_pass == raw
    assert result.plan.predicted_peak_bytes <= limit
    assert peak < limit, f"peak {peak / 1e6:.1f} MB over the {limit / 1e6:.1f} MB limit"
    assert raw > 3 * limit


def test_a_minus_m_read_block_by_block_stays_under_the_limit(tmp_path, zarr_matrix):
    """svd_lowrank's m x n M: each read holds A's block, M's block and their difference."""
    import zarr

    from ooc_svd.api import _Request, _run, open_matrix
    from ooc_svd.engine import fixed_rank
    from ooc_svd.sources.difference import subtract

    rng = np.random.default_rng(2)
    A = rng.standard_normal((100_000, 64)).astype(np.float32)  # 25.6 MB
    M = rng.standard_normal(A.shape)  # float64, 51.2 MB
    paths = zarr_matrix(A, chunk_rows=1000), zarr_matrix(M, chunk_rows=1000, name="M.zarr")
    limit = 5_000_000

    def run():
        source, mean = subtract(open_matrix(paths[0])[0], zarr.open_array(paths[1], mode="r"))
        request = _Request(4, fixed_rank(4), oversample=4, niter=1, mean=mean, method="randomized",
                           memory_limit=limit, out=str(tmp_path / "U.zarr"), overwrite=True)
        return _run(source, request)

    run()  # compiles the kernels
    tracemalloc.start()
    try:
        result = run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(result.plan.blocks) > 10
    assert result.plan.predicted_peak_bytes <= limit
    assert peak < limit, f"peak {peak / 1e6:.1f} MB over the {limit / 1e6:.1f} MB limit"


def test_exact_tsqr_of_wide_blocks_stays_under_the_limit(tmp_path, zarr_matrix):
    """Blocks of more rows than a TSQR stack: each stack is factored in place."""
    A = np.random.default_rng(3).standard_normal((30_000, 500)).astype(np.float32)  # 60 MB
    path = zarr_matrix(A, chunk_rows=2000)
    limit = 60_000_000
    result, peak = traced_run(path, "exact", limit, str(tmp_path / "result.zarr"))
    assert result.plan.block_rows >= 4 * 500  # whole stacks of rows
    assert result.plan.predicted_peak_bytes <= limit
    assert peak < limit, f"peak {peak / 1e6:.1f} MB over the {limit / 1e6:.1f} MB limit"


def test_scipy_sparse_input_is_planned_without_m_long_arrays(tmp_path):
    """Opening a scipy.sparse matrix cuts its units from indptr in pieces: no int64 copy
    of indptr nor m-long temporaries beside the matrix (they took 32 MB here)."""
    import scipy.sparse

    A = scipy.sparse.random(1_000_000, 50, density=0.02, format="csr", random_state=1,
                            dtype=np.float32)
    limit = 10_000_000
    result, peak = traced_run(A, "randomized", limit, str(tmp_path / "result.zarr"))
    assert len(result.plan.blocks) > 10 and result.plan.predicted_peak_bytes <= limit
    assert peak < limit, f"peak {peak / 1e6:.1f} MB over the {limit / 1e6:.1f} MB limit"


def test_dask_array_peak_allocation_stays_under_the_limit(tmp_path, zarr_matrix):
    """dask's getter copies each chunk it reads: one more block per read in flight."""
    import dask.array as da

    A = np.random.default_rng(4).standard_normal((50_000, 64)).astype(np.float32)
    array = da.from_zarr(zarr_matrix(A, chunk_rows=1000))
    limit = 5_000_000
    result, peak = traced_run(array, "randomized", limit, str(tmp_path / "result.zarr"))
    assert len(result.plan.blocks) > 10 and result.plan.predicted_peak_bytes <= limit
    assert peak < limit, f"peak {peak / 1e6:.2f} MB over the {limit / 1e6:.1f} MB limit"
