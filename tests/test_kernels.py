"""CPU kernels against the slow references in naive.py."""

import naive
import numpy as np
import pytest

from ooc_svd.errors import NonFiniteError
from ooc_svd.kernels import cpu


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64, np.uint8])
def test_widen_shift_rows_matches_reference(dtype):
    rng = np.random.default_rng(0)
    src = (rng.standard_normal((17, 9)) * 50).astype(dtype)
    shift = rng.standard_normal(9)
    out = np.empty((17, 9))
    colsum = np.ones(9)
    sumsq = cpu.widen_shift_rows(src, shift, out, colsum)
    expected, expected_colsum, expected_sumsq = naive.widen_shift_rows(src, shift)
    np.testing.assert_allclose(out, expected, rtol=1e-15)
    np.testing.assert_allclose(colsum, 1 + expected_colsum, rtol=1e-12)
    np.testing.assert_allclose(sumsq, expected_sumsq, rtol=1e-12)


def test_widen_accepts_non_contiguous_rows():
    src = np.asfortranarray(np.arange(40.0).reshape(8, 5))[::2]
    out = np.empty((4, 5))
    cpu.widen_shift_rows(src, np.zeros(5), out, np.zeros(5))
    np.testing.assert_array_equal(out, src)


@pytest.mark.parametrize("n", [1, 7, 300])
def test_power_block_matches_dense_product(n, monkeypatch):
    # A tiny sub-block size forces several sub-blocks per block.
    monkeypatch.setattr(cpu, "SUB_BLOCK_BYTES", 8 * n * 5)
    monkeypatch.setattr(cpu, "MIN_SUB_BLOCK_ROWS", 5)
    rng = np.random.default_rng(n)
    block = rng.standard_normal((23, n)).astype(np.float32)
    X = np.asfortranarray(rng.standard_normal((n, 4)))
    shift = rng.standard_normal(n)
    Z = np.asfortranarray(rng.standard_normal((n, 4)))
    Z0 = Z.copy()
    stats = cpu.BlockStats.zeros(n)
    cpu.power_block(block, 0, X, shift, Z, stats, cpu.SubBlocks(n))
    expected = Z0 + naive.fused_power_product(block, X, shift)
    np.testing.assert_allclose(Z, expected, rtol=1e-12, atol=1e-12)
    assert stats.rows == 23
    np.testing.assert_allclose(stats.colsum, (block - shift).sum(axis=0), rtol=1e-10)


def test_sub_blocks_of_a_wide_matrix_keep_enough_rows(monkeypatch):
    """A sub-block of SUB_BLOCK_BYTES would hold a single row of a wide A; it keeps
    MIN_SUB_BLOCK_ROWS, and the plan counts its bytes."""
    from ooc_svd.plan import _fixed_bytes

    n = 1_000_000
    assert cpu.sub_block_rows(n) == cpu.MIN_SUB_BLOCK_ROWS
    assert cpu.sub_block_rows(100) == cpu.SUB_BLOCK_BYTES // 800  # a tall A's: 1 MB of rows
    assert cpu.SubBlocks(100_000).buffer.nbytes == cpu.sub_block_bytes(100_000)
    fixed = {method: _fixed_bytes(n, 20, method) for method in ("randomized", "krylov")}
    monkeypatch.setattr(cpu, "MIN_SUB_BLOCK_ROWS", 2 * cpu.MIN_SUB_BLOCK_ROWS)
    for method, before in fixed.items():
        assert _fixed_bytes(n, 20, method) - before == 8 * n * cpu.MIN_SUB_BLOCK_ROWS // 2


def test_block_times_and_transposed_products():
    rng = np.random.default_rng(3)
    block = rng.standard_normal((31, 12))
    X = np.asfortranarray(rng.standard_normal((12, 5)))
    Q = rng.standard_normal((31, 5))
    shift = np.full(12, 0.5)
    subs = cpu.SubBlocks(12)
    stats = cpu.BlockStats.zeros(12)
    np.testing.assert_allclose(
        cpu.block_times(block, 0, X, shift, stats, subs), (block - 0.5) @ X, rtol=1e-12
    )
    np.testing.assert_allclose(
        cpu.transposed_block_times(block, 0, Q, shift, stats, subs),
        (block - 0.5).T @ Q,
        rtol=1e-12,
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_value_names_its_row(bad):
    block = np.ones((50, 4))
    block[37, 2] = bad
    subs = cpu.SubBlocks(4)
    with pytest.raises(NonFiniteError, match="first at row 1037"):
        cpu.power_block(
            block, 1000, np.ones((4, 2), order="F"), np.zeros(4), np.zeros((4, 2), order="F"),
            cpu.BlockStats.zeros(4), subs,
        )


def test_prefetch_row_changes_nothing_and_takes_only_c_ordered_rows():
    import numba

    from ooc_svd.kernels.prefetch import prefetch_row

    @numba.njit
    def prefetched_sum(matrix, rows):
        total = 0.0
        for r in rows:
            prefetch_row(matrix, r)
            for c in range(matrix.shape[1]):
                total += matrix[r, c]
        return total

    matrix = np.arange(7 * 13, dtype=np.float64).reshape(7, 13)  # rows of 1.6 cache lines
    for rows in (np.arange(7, dtype=np.int32), np.array([6, 0, 3], dtype=np.int64)):
        assert prefetched_sum(matrix, rows) == matrix[rows].sum()
    assert prefetched_sum(matrix[:, :0].copy(), np.arange(7)) == 0.0  # empty rows
    with pytest.raises(numba.core.errors.TypingError):
        prefetched_sum(np.asfortranarray(matrix), np.arange(7))


@pytest.mark.parametrize("order", ["F", "C"])
def test_subtract_outer_updates_in_place(order):
    rng = np.random.default_rng(5)
    Z = np.asarray(rng.standard_normal((50, 7)), order=order)
    x, y = rng.standard_normal(50), rng.standard_normal(7)
    expected = Z - np.outer(x, y)
    cpu.subtract_outer(Z, x, y)
    np.testing.assert_allclose(Z, expected, rtol=0, atol=1e-14)
    cpu.subtract_outer(Z, np.zeros(50), y)  # no shift: nothing to do
    np.testing.assert_allclose(Z, expected, rtol=0, atol=1e-14)
