"""Peak memory stays under memory_limit on a store several times larger than the limit."""

import tracemalloc

import numpy as np
import pytest

import ooc_svd


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
    ooc_svd.svd(path, 4, niter=1, method=method, memory_limit=limit, out=out)  # compile first
    tracemalloc.start()
    try:
        result = ooc_svd.svd(
            path, 4, niter=1, method=method, memory_limit=limit, out=out, overwrite=True
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(result.plan.blocks) > 10
    assert result.plan.predicted_peak_bytes <= limit
    assert peak < limit, f"peak {peak / 1e6:.1f} MB over the {limit / 1e6:.1f} MB limit"
    assert A.nbytes > 3 * limit
