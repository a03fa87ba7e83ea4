"""Streaming TSQR algebra: Q^T Q = I, Q R = Y, B = Q^T A, and the backward U sweep."""

import numpy as np
import pytest
import scipy.linalg

from ooc_svd.tsqr import (
    MergeFactors,
    StreamingTSQR,
    assemble_left_vectors,
    householder_r,
    local_qr,
    merged_bt,
)


def stream(Y, A, boundaries):
    """Run the streaming TSQR over row blocks; return it and the local Q_i."""
    tsqr, local_qs, merges = StreamingTSQR(), [], []
    for start, stop in zip(boundaries[:-1], boundaries[1:], strict=True):
        Q_i, R_i = local_qr(Y[start:stop].copy(order="F"))
        local_qs.append(Q_i)
        merges.append(tsqr.add_block(R_i, A[start:stop].T @ Q_i))
    return tsqr, (local_qs, merges)


def explicit_q(tsqr, factors, width):
    """Q itself, via the backward sweep applied to the identity."""
    local_qs, merges = factors
    pieces = {}
    assemble_left_vectors(tsqr.blocks, np.eye(width), local_qs.__getitem__, merges.__getitem__,
                          lambda i, rows: pieces.__setitem__(i, rows))
    return np.vstack([pieces[i] for i in range(len(local_qs))])


@pytest.mark.parametrize(
    "boundaries",
    [
        [0, 200],  # one block
        [0, 50, 100, 150, 200],  # equal blocks
        [0, 3, 60, 61, 200],  # blocks with fewer rows than columns
    ],
)
def test_tsqr_factors_and_projection(boundaries):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((200, 30))
    Y = A @ rng.standard_normal((30, 8))
    tsqr, factors = stream(Y, A, boundaries)
    Q = explicit_q(tsqr, factors, tsqr.R.shape[0])
    np.testing.assert_allclose(Q.T @ Q, np.eye(Q.shape[1]), atol=1e-13)
    np.testing.assert_allclose(Q @ tsqr.R, Y, atol=1e-12)
    np.testing.assert_allclose(tsqr.BT.T, Q.T @ A, atol=1e-12)
    assert np.allclose(tsqr.R, np.triu(tsqr.R))


def test_tsqr_of_rank_deficient_y_keeps_q_orthonormal():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((120, 10))
    Y = np.repeat(A[:, :2], 4, axis=1)  # rank 2, eight columns
    tsqr, factors = stream(Y, A, [0, 40, 80, 120])
    Q = explicit_q(tsqr, factors, tsqr.R.shape[0])
    np.testing.assert_allclose(Q.T @ Q, np.eye(Q.shape[1]), atol=1e-13)
    np.testing.assert_allclose(Q @ tsqr.R, Y, atol=1e-12)


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize(("rows_acc", "rows_i"), [(5, 4), (5, 0), (0, 3)])
def test_merged_bt_is_the_merge_whatever_the_order_of_its_operands(order, rows_acc, rows_i):
    """B^T T + C_i^T S, F-ordered, from operands in either order and with an empty side
    (an empty block's C_i^T, or a first R without rows)."""
    rng = np.random.default_rng(0)
    n, r_new = 40, 5
    BT = np.asarray(rng.standard_normal((n, rows_acc)), order=order)
    CT = np.asarray(rng.standard_normal((n, rows_i)), order=order)
    factors = MergeFactors(rng.standard_normal((rows_acc, r_new)),
                           rng.standard_normal((rows_i, r_new)))
    merged = merged_bt(BT, CT, factors)
    assert merged.flags.f_contiguous and merged.shape == (n, r_new)
    np.testing.assert_allclose(merged, BT @ factors.T + CT @ factors.S, rtol=1e-13,
                               atol=1e-13)


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("boundaries", [[0, 30, 60, 90], [0, 3, 6, 9, 12], [0, 2, 30, 31]])
def test_add_local_qr_is_add_block(order, boundaries):
    """Blocks merged from their local QR and A_i^T W give add_block's R, B^T and factors,
    whether S goes into the block's product (blocks of fewer rows than the n = 8 columns:
    W = Q_i S, and B^T T is added into the product where it lies) or onto C_i^T (W = Q_i),
    with A_i^T W in either memory order."""
    rng = np.random.default_rng(6)
    m, n, l = boundaries[-1], 8, 5
    A, Y = rng.standard_normal((m, n)), rng.standard_normal((m, l))
    by_block, by_local_qr = StreamingTSQR(), StreamingTSQR()
    for start, stop in zip(boundaries[:-1], boundaries[1:], strict=True):
        Q_i, R_i = local_qr(Y[start:stop].copy(order="F"))
        expected = by_block.add_block(R_i, A[start:stop].T @ Q_i)
        asked, products = [], []

        def transposed_times(W, rows=A[start:stop], asked=asked, products=products):
            asked.append(W)
            products.append(np.asarray(rows.T @ W, order=order))
            return products[-1]

        factors = by_local_qr.add_local_qr(Q_i, R_i, transposed_times)
        assert (factors is None) == (expected is None)
        if factors is not None:
            np.testing.assert_array_equal(factors.T, expected.T)
            np.testing.assert_array_equal(factors.S, expected.S)
        folded = factors is not None and stop - start < n
        np.testing.assert_allclose(asked[0], Q_i @ factors.S if folded else Q_i,
                                   rtol=1e-14, atol=1e-14)
        in_place = np.shares_memory(by_local_qr.BT, products[0])
        assert in_place == (factors is None or folded)
    assert by_local_qr.blocks == by_block.blocks
    np.testing.assert_array_equal(by_local_qr.R, by_block.R)
    np.testing.assert_allclose(by_local_qr.BT, by_block.BT, rtol=1e-13, atol=1e-13)


def test_add_local_qr_changes_nothing_when_the_product_raises():
    """A block whose product raises (NaN or Inf in it) leaves R, B^T and the count as they
    were, so its factors reach neither."""
    rng = np.random.default_rng(7)
    tsqr = StreamingTSQR()
    A = rng.standard_normal((6, 10))
    Q_0, R_0 = local_qr(rng.standard_normal((6, 3)))
    tsqr.add_local_qr(Q_0, R_0, lambda W: A.T @ W)
    R, BT = tsqr.R.copy(), tsqr.BT.copy()

    def raising(W):
        raise ValueError("a NaN")

    with pytest.raises(ValueError, match="a NaN"):
        tsqr.add_local_qr(*local_qr(rng.standard_normal((6, 3))), raising)
    assert tsqr.blocks == 1
    np.testing.assert_array_equal(tsqr.R, R)
    np.testing.assert_array_equal(tsqr.BT, BT)


@pytest.mark.parametrize("shape", [(300, 40), (40, 40), (25, 40), (0, 5), (70, 1)])
@pytest.mark.parametrize("order", ["C", "F"])
def test_householder_r_is_lapacks_r(shape, order):
    """R of dgeqrt equals R of scipy's dgeqrf-based QR (the same reflectors, so the same
    signs) to rounding, for tall, square, wide and empty blocks of either order."""
    Y = np.random.default_rng(5).standard_normal(shape)
    expected = scipy.linalg.qr(Y, mode="r")[0][: min(shape)]
    R = householder_r(np.array(Y, order=order))
    assert R.shape == (min(shape), shape[1])
    np.testing.assert_allclose(R, expected, atol=1e-12 * np.abs(Y).max(initial=1.0))
    np.testing.assert_array_equal(R, np.triu(R))
