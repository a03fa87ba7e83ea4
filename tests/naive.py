"""Slow, obviously correct references for the kernels and passes."""

import numpy as np


def widen_shift_rows(src, shift):
    """(float64(src) - shift, column sums, sum of squares)."""
    out = src.astype(np.float64) - shift
    return out, out.sum(axis=0), float(np.sum(out * out))


def fused_power_product(A, X, mean=None):
    """(A - 1 mean^T)^T (A - 1 mean^T) X, formed densely."""
    Ac = A.astype(np.float64) - (0 if mean is None else mean)
    return Ac.T @ (Ac @ X)


def orthonormal_basis_product(A, X, mean=None):
    """Q, R of the QR of Y = A X and B = Q^T A, all densely."""
    Ac = A.astype(np.float64) - (0 if mean is None else mean)
    Q, R = np.linalg.qr(Ac @ X)
    return Q, R, Q.T @ Ac


def with_ones(Y, width):
    """Y with columns of ones appended up to ``width`` columns."""
    return np.hstack([Y, np.ones((Y.shape[0], width - Y.shape[1]))])


def truncated_svd(A, k, mean=None):
    """Exact top-k SVD of the (centered) matrix by LAPACK."""
    Ac = A.astype(np.float64) - (0 if mean is None else mean)
    U, S, Vt = np.linalg.svd(Ac, full_matrices=False)
    return U[:, :k], S[:k], Vt[:k].T


def matrix_with_spectrum(m, n, singular_values, dtype=np.float64, seed=0):
    """A = U diag(s) V^T with random orthonormal U (m x r) and V (n x r)."""
    rng = np.random.default_rng(seed)
    r = len(singular_values)
    U, _ = np.linalg.qr(rng.standard_normal((m, r)))
    V, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return ((U * np.asarray(singular_values)) @ V.T).astype(dtype)


def subspace_distance(U1, U2):
    """sin of the largest principal angle between the column spaces of U1 and U2."""
    Q1, _ = np.linalg.qr(U1)
    Q2, _ = np.linalg.qr(U2)
    return float(np.linalg.norm(Q1 - Q2 @ (Q2.T @ Q1), 2))


def csr_block_products(A, X, Q, shift):
    """Dense references for a CSR block A (scipy.sparse): (A_s^T A_s X, A_s X, A_s^T Q,
    column sums of A_s, sum of squares of A_s) with A_s = dense(A) - 1 shift^T."""
    As = A.toarray().astype(np.float64) - shift
    return As.T @ (As @ X), As @ X, As.T @ Q, As.sum(axis=0), float(np.sum(As * As))


def csr_gram(A, shift):
    """Upper triangle of A_s^T A_s for a CSR block A (scipy.sparse), A_s = dense(A) - 1
    shift^T, entry by entry, as the sum over the rows of products of their values."""
    As = A.toarray().astype(np.float64) - shift
    n = As.shape[1]
    G = np.zeros((n, n))
    for i in range(n):
        for j in range(i, n):
            G[i, j] = sum(float(row[i]) * float(row[j]) for row in As)
    return G


def sparse_with_decay(m, n, density, decay, dtype=np.float64, seed=0):
    """A random sparse m x n CSR matrix whose columns are scaled by exp(-decay * j), so its
    spectrum decays; a few empty rows are left in."""
    import scipy.sparse

    rng = np.random.default_rng(seed)
    A = scipy.sparse.random(m, n, density=density, format="csr", random_state=seed,
                            data_rvs=rng.standard_normal)
    keep = np.ones(m)
    keep[rng.choice(m, size=max(m // 50, 1), replace=False)] = 0
    A = (scipy.sparse.diags(keep) @ A @ scipy.sparse.diags(np.exp(-decay * np.arange(n))))
    A = A.tocsr()
    A.eliminate_zeros()
    return A.astype(dtype)
