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
