"""End-to-end accuracy against LAPACK's SVD on matrices with known spectra."""

import naive
import numpy as np
import pytest

import ooc_svd
from ooc_svd.units import format_bytes

M, N = 700, 120

SPECTRA = {
    # name: (singular values, k)
    "fast_decay": (np.logspace(0, -8, N), 10),
    "slow_decay": (1.0 / np.arange(1, N + 1), 10),
    "rank_deficient": (np.r_[np.linspace(3, 1, 5), np.zeros(N - 5)], 8),
    "ill_conditioned": (np.r_[np.logspace(0, -10, 12), np.zeros(N - 12)], 12),
}

# Randomized subspace iteration (niter=2, oversampling 10): the relative error allowed in
# the singular values, and the factor by which the reconstruction error may exceed the
# optimal rank-k error. The Halko et al. bounds are far looser; these are ten times the
# worst seen over 20 seeds. Rank-deficient spectra (rank <= l) are captured exactly.
RANDOMIZED = {
    "fast_decay": {"values": 1e-5, "excess": 5e-6},  # worst seen: 1.1e-6, 4.6e-7
    "slow_decay": {"values": 0.015, "excess": 0.0025},  # worst seen: 1.4e-3, 2.4e-4
    "rank_deficient": {"values": 0.0, "excess": 1e-10},
    "ill_conditioned": {"values": 0.0, "excess": 1e-10},
}


def error_bounds(method, spectrum, dtype, S_exact):
    """Per-method bounds: on |S - S_exact| (absolute, per value), on ||U^T U - I||, and on
    the reconstruction error beyond the optimal one (as a factor, plus a floor / ||A||)."""
    eps = np.finfo(dtype).eps
    sigma_1 = S_exact[0]
    if method in ("randomized", "krylov"):
        allowed = RANDOMIZED[spectrum]
        values = 100 * eps * sigma_1 + allowed["values"] * S_exact
        return values, 50 * eps, allowed["excess"], 100 * eps
    # exact and gram: V_k of the factored R (or G), then the final pass's Rayleigh-Ritz
    # step, whose values are within rounding of sigma_1 even where G's eigenvalues are not.
    return 100 * eps * sigma_1, 50 * eps, 1e-10, 100 * eps


@pytest.mark.parametrize("method", ["randomized", "krylov", "exact", "gram"])
@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_exact_svd(zarr_matrix, block_rows, method, spectrum, dtype):
    singular_values, k = SPECTRA[spectrum]
    block_rows(128, N, np.dtype(dtype).itemsize)
    A = naive.matrix_with_spectrum(M, N, singular_values, dtype=dtype, seed=7)
    result = ooc_svd.svd(zarr_matrix(A, chunk_rows=64), k, method=method, memory_limit="16MB")
    assert result.plan.method == result.method == method and len(result.plan.blocks) > 1
    A64 = A.astype(np.float64)
    _, S_exact, _ = naive.truncated_svd(A64, k)
    U, S, V = (np.asarray(x, dtype=np.float64) for x in result)
    assert U.shape == (M, k) and S.shape == (k,) and V.shape == (N, k)
    assert result.U.dtype == dtype and result.S.dtype == dtype

    values, orthogonality, excess, floor = error_bounds(method, spectrum, dtype, S_exact)
    eps = np.finfo(dtype).eps
    # Orthonormal in every column, also past the numerical rank.
    np.testing.assert_allclose(V.T @ V, np.eye(k), atol=50 * eps)
    np.testing.assert_allclose(U.T @ U, np.eye(k), atol=orthogonality)
    assert np.all(np.abs(S - S_exact) <= values)

    optimal = np.sqrt(np.sum(np.linalg.svd(A64, compute_uv=False)[k:] ** 2))
    error = np.linalg.norm(A64 - (U * S) @ V.T)
    assert error <= optimal * (1 + excess) + floor * np.linalg.norm(A64)


@pytest.mark.parametrize("method", ["randomized", "krylov", "exact", "gram"])
@pytest.mark.parametrize("niter", [0, 2])
@pytest.mark.parametrize("mean_given", [False, True])
def test_centered_equals_svd_of_centered_matrix(
    zarr_matrix, block_rows, method, niter, mean_given
):
    block_rows(100, 40)
    rng = np.random.default_rng(3)
    # A large offset: centering must not cancel the variance away.
    A = naive.matrix_with_spectrum(500, 40, np.logspace(0, -6, 40), seed=2) + 1000.0
    A += rng.standard_normal(40)
    mean = A.mean(axis=0)
    path = zarr_matrix(A, chunk_rows=50)
    kwargs = {"mean": mean} if mean_given else {"center": True}
    result = ooc_svd.svd(path, 6, method=method, niter=niter, memory_limit="8MB", **kwargs)
    U_exact, S_exact, V_exact = naive.truncated_svd(A, 6, mean=mean)
    np.testing.assert_allclose(result.mean, mean, rtol=1e-13)
    np.testing.assert_allclose(result.S, S_exact, rtol=1e-9 if niter else 1e-3)
    if niter or method == "exact":
        assert naive.subspace_distance(result.V, V_exact) < 1e-6
        assert naive.subspace_distance(result.U, U_exact) < 1e-6
    Ac = A - mean
    direct = np.linalg.norm(Ac - (result.U * result.S) @ result.V.T) / np.linalg.norm(Ac)
    assert result.residual == pytest.approx(direct, rel=1e-6, abs=1e-9)


def test_same_seed_same_result_for_any_block_size(zarr_matrix, block_rows):
    A = naive.matrix_with_spectrum(2000, 60, 1.0 / np.arange(1, 61) ** 1.5, seed=4)
    path = zarr_matrix(A, chunk_rows=40)
    results = []
    for rows in (40, 120, 440, 2000):
        block_rows(rows, 60)
        results.append(ooc_svd.svd(path, 8, method="randomized", center=True, seed=11))
        assert results[-1].plan.block_rows == rows
    reference = results[0]
    for other in results[1:]:
        np.testing.assert_allclose(other.S, reference.S, rtol=1e-10)
        np.testing.assert_allclose(other.V, reference.V, rtol=0, atol=1e-10)
        np.testing.assert_allclose(other.U, reference.U, rtol=0, atol=1e-10)


def test_signs_do_not_follow_rounding_where_entries_of_v_tie(block_rows):
    """Centering makes a one-hot feature's two columns exact negatives, so V's largest
    entries come in pairs of opposite signs: the sign rule takes the first of them, where
    the largest by a last bit followed the block layout and the method."""
    rng = np.random.default_rng(0)
    m = 40_000
    x = (rng.random(m) < 0.3).astype(np.float64)
    A = np.column_stack([x, 1 - x, 0.1 * rng.standard_normal((m, 3))])
    results = []
    for method in ("exact", "gram", "randomized"):
        for rows in (m, 3000, 1000):
            block_rows(rows, 5)
            results.append(ooc_svd.svd(A, 2, center=True, method=method))
    first = results[0]
    assert first.V[0, 0] > 0 and first.V[1, 0] == pytest.approx(-first.V[0, 0])
    for result in results[1:]:
        np.testing.assert_allclose(result.V, first.V, atol=1e-8)
        np.testing.assert_allclose(result.U[:100], first.U[:100], atol=1e-8)
    # Within the tie tolerance the first entry decides; beyond it, the largest.
    V = np.array([[0.5, 0.5], [-0.5 * (1 + 1e-13), -0.5 * (1 + 1e-5)]])
    signed, _ = ooc_svd.engine.normalize_signs(V, np.ones((3, 2)))
    np.testing.assert_array_equal(np.sign(signed), [[1, -1], [-1, 1]])


def test_notes_say_what_the_power_passes_and_the_residual_cannot_resolve():
    """Singular values below about 1e-7 sigma_1 are rounded away in A^T A X (they keep the
    accuracy of niter=0), and a residual found as ||A||^2 - sum S^2 below its rounding
    (here 0.0 for a true 3e-9) is no exact factorization: both are said. Neither is said
    for a tail above the floor, for exact, or for data of lower rank than k."""
    rng = np.random.default_rng(3)
    m, n, k = 3000, 200, 6
    U = np.linalg.qr(rng.standard_normal((m, n)))[0]
    V = np.linalg.qr(rng.standard_normal((n, n)))[0]
    for scale, said in ((1e-9, True), (1e-4, False)):
        A = (U * np.r_[1.0, scale * np.logspace(0, -3, n - 1)]) @ V.T
        for method in ("randomized", "krylov"):
            note = ooc_svd.svd(A, k, method=method, niter=2).note
            assert ("sigma_2 and those after it lie below 1e-07 sigma_1" in note) == said
            assert ("lies within the rounding of ||A||_F^2 - sum S^2" in note) == said
        assert "sigma_2 and those" not in ooc_svd.svd(A, k, method="randomized", niter=0).note
        exact = ooc_svd.svd(A, k, method="exact")
        assert exact.note == "" and exact.residual == pytest.approx(
            np.linalg.norm(A - (exact.U * exact.S) @ exact.V.T) / np.linalg.norm(A), rel=1e-3)
    low_rank = rng.standard_normal((500, 5)) @ rng.standard_normal((5, 40))
    assert ooc_svd.svd(low_rank, 8, method="randomized").note == ""
    # gram's tail sums G's eigenvalues, to about sqrt(n eps) sigma_1: a rank-3 matrix's
    # residual of 1e-8 is rounding, and said to be.
    rank_three = (U[:, :3] * [3.0, 2.0, 1.0]) @ V[:3]
    gram = ooc_svd.svd(rank_three, 3, method="gram")
    assert gram.residual > 1e-12 and "lies within the rounding of the squares of the " \
        "singular values past the rank" in gram.note
    # Where the exact method is out of reach (n > 4096), the note does not offer it.
    wide = np.outer(rng.standard_normal(300), rng.standard_normal(5000))
    wide += 1e-10 * np.abs(wide).max() * rng.standard_normal(wide.shape)
    note = ooc_svd.svd(wide, 3, method="randomized").note
    assert "sigma_2 and those after it lie below" in note and "exact" not in note


def test_a_method_auto_took_for_lack_of_memory_is_said(zarr_matrix):
    """'auto' prefers gram here; in chunks of 1000 rows its need exceeds the limit and it
    runs randomized, in chunks of 7 it fits: the chunking alone changes the result, as
    the note says (and how much memory gram needs). (Where the basis spans every row or
    column, it is not said: test_accuracy's fall back to the randomized method.)"""
    A = naive.matrix_with_spectrum(3000, 300, 0.98 ** np.arange(300), seed=0)
    large = ooc_svd.svd(zarr_matrix(A, chunk_rows=1000, name="large.zarr"), 10,
                        memory_limit="12MB")
    small = ooc_svd.svd(zarr_matrix(A, chunk_rows=7, name="small.zarr"), 10,
                        memory_limit="12MB")
    assert (large.method, small.method) == ("randomized", "gram")
    needed = format_bytes(large.plan.preferred[1], round_up=True)
    assert f"method 'auto' preferred gram, which would need {needed} (memory_limit is " \
           "12 MB), and ran randomized" in large.note
    assert small.note == "" and small.plan.preferred is None
    np.testing.assert_allclose(small.S, np.linalg.svd(A, compute_uv=False)[:10], rtol=1e-12)


def test_seed_matters_and_power_iterations_help():
    A = naive.matrix_with_spectrum(800, 100, 1.0 / np.arange(1, 101), seed=5)
    _, S_exact, _ = naive.truncated_svd(A, 10)

    def error(niter, seed):
        result = ooc_svd.svd(A, 10, method="randomized", niter=niter, seed=seed)
        return np.max(np.abs(result.S - S_exact) / S_exact), result.S

    error_0, S_a = error(0, 1)
    error_3, S_b = error(3, 1)
    _, S_c = error(3, 2)
    assert error_3 < error_0 / 10
    assert not np.allclose(S_b, S_c, rtol=1e-12)


def test_residual_is_the_direct_frobenius_residual():
    A = naive.matrix_with_spectrum(300, 50, 1.0 / np.arange(1, 51), seed=6)
    for method in ("randomized", "krylov", "exact", "gram"):
        result = ooc_svd.svd(A, 5, method=method)
        direct = np.linalg.norm(A - (result.U * result.S) @ result.V.T) / np.linalg.norm(A)
        assert result.residual == pytest.approx(direct, rel=1e-8)
        assert result.frobenius_norm == pytest.approx(np.linalg.norm(A), rel=1e-12)


def test_wide_matrix():
    A = naive.matrix_with_spectrum(60, 500, np.logspace(0, -5, 60), seed=8)
    result = ooc_svd.svd(A, 5)
    _, S_exact, V_exact = naive.truncated_svd(A, 5)
    np.testing.assert_allclose(result.S, S_exact, rtol=1e-8)
    assert naive.subspace_distance(result.V, V_exact) < 1e-4


def test_rank_deficient_exact_mode_reports_rank():
    A = naive.matrix_with_spectrum(300, 40, [5.0, 3.0, 1.0], seed=9)
    result = ooc_svd.svd(A, 6, method="exact")
    assert result.numerical_rank == 3
    np.testing.assert_allclose(result.S[:3], [5, 3, 1], rtol=1e-12)
    assert np.all(result.S[3:] < 1e-12)
    np.testing.assert_allclose(result.U.T @ result.U, np.eye(6), atol=1e-12)


@pytest.mark.parametrize("method", ["randomized", "krylov", "exact", "gram"])
def test_the_numerical_rank_of_float32_data_counts_at_its_own_precision(method):
    """Directions below float32's rounding are noise (every method counted all k of them
    with float64's eps); here numpy's matrix_rank agrees."""
    A = naive.matrix_with_spectrum(1000, 60, np.logspace(0, -1, 7), seed=4).astype(np.float32)
    result = ooc_svd.svd(A, 20, method=method)
    assert result.numerical_rank == np.linalg.matrix_rank(A) == 7
    # In float64 the float32 rounding of those values is data: numpy counts 60 directions.
    widened = A.astype(np.float64)
    assert ooc_svd.svd(widened, 20, method=method).numerical_rank == 20
    assert np.linalg.matrix_rank(widened) == 60


def test_auto_falls_back_from_gram_to_exact_on_ill_conditioned_float64():
    spectrum = np.r_[np.logspace(0, -9, 8), np.zeros(32)]
    A = naive.matrix_with_spectrum(2000, 40, spectrum, seed=10)
    result = ooc_svd.svd(A, 8)
    assert result.plan.method == "gram" and "takes over after its pass" in result.plan.reason
    assert result.method == "exact" and "switched to the exact method" in result.note
    assert result.passes == 3 == result.plan.most_passes == result.plan.passes + 1
    requested = ooc_svd.svd_plan(A, 8, method="gram")  # no fallback, so no pass more
    assert "takes over" not in requested.describe()
    assert requested.most_passes == requested.passes == 2
    np.testing.assert_allclose(result.S, spectrum[:8], rtol=1e-6)
    # float32 data is held to its own rounding unit, relative to sigma_k (see the next test)
    result = ooc_svd.svd(A.astype(np.float32), 8)
    assert result.method == "exact" and result.passes == 3
    modest = naive.matrix_with_spectrum(2000, 40, np.logspace(0, -4, 40), seed=10)
    result = ooc_svd.svd(modest.astype(np.float32), 8)  # sigma_1 / sigma_8 ~ 5
    assert result.method == "gram" and result.passes == 2 and result.note == ""


def test_auto_does_not_keep_gram_on_float32_columns_of_very_different_scales():
    """float32 values are rounded each relative to itself: with one column 1e8 times and
    one 1e-8 times the others, the exact method finds sigma_2 and sigma_3 to float32's
    precision, far below eps32 * sigma_1, and G cannot."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((2000, 10))
    A[:, 0] *= 1e8
    A[:, 1] *= 1e-8
    A = A.astype(np.float32)
    reference = np.linalg.svd(A.astype(np.float64), compute_uv=False)[:3]
    result = ooc_svd.svd(A, 3)
    assert result.method == "exact" and "switched to the exact method" in result.note
    np.testing.assert_allclose(result.S, reference, rtol=1e-6)
    well_conditioned = ooc_svd.svd(naive.matrix_with_spectrum(2000, 40, np.logspace(0, -2, 40)), 8)
    assert well_conditioned.method == "gram" and well_conditioned.passes == 2


@pytest.mark.parametrize("niter", [4, 6])
def test_block_krylov_is_far_more_accurate_on_a_flat_spectrum(zarr_matrix, niter):
    flat = 1.0 / (1.0 + np.arange(300) / 100.0)
    A = naive.matrix_with_spectrum(3000, 300, flat, seed=1)
    _, S_exact, _ = naive.truncated_svd(A, 20)
    path = zarr_matrix(A, chunk_rows=500)

    def error(method):
        result = ooc_svd.svd(path, 20, method=method, niter=niter, memory_limit="64MB")
        assert result.passes == niter + 1
        return np.max(np.abs(result.S - S_exact) / S_exact), result

    subspace, _ = error("randomized")
    krylov, result = error("krylov")
    assert krylov * 100 <= subspace
    assert result.plan.krylov_width == (niter + 1) * 30
    np.testing.assert_allclose(result.U.T @ result.U, np.eye(20), atol=1e-12)


def test_block_krylov_drops_dependent_blocks_of_a_rank_deficient_matrix():
    A = naive.matrix_with_spectrum(2000, 200, [3.0, 2.0, 1.5, 1.0, 0.5], seed=2)
    result = ooc_svd.svd(A, 4, method="krylov", niter=5)
    np.testing.assert_allclose(result.S, [3.0, 2.0, 1.5, 1.0], rtol=1e-12)
    np.testing.assert_allclose(result.U.T @ result.U, np.eye(4), atol=1e-12)
    assert result.residual == pytest.approx(0.5 / np.sqrt(9 + 4 + 2.25 + 1 + 0.25), rel=1e-9)


@pytest.mark.parametrize("shape", [(2000, 64), (60, 500)])
def test_block_krylov_basis_is_orthonormal_and_no_wider_than_planned(shape, monkeypatch):
    """(q + 1) l = 98 columns exceed min(m, n): the final pass gets an orthonormal basis
    of at most min(m, n) columns, the width its memory was planned for."""
    import ooc_svd.engine

    bases, final_pass = [], ooc_svd.engine._final_pass

    def spy(context, plan, X, *args):
        bases.append((X.copy(), plan.krylov_width))
        return final_pass(context, plan, X, *args)

    monkeypatch.setattr(ooc_svd.engine, "_final_pass", spy)
    A = naive.matrix_with_spectrum(*shape, 1.0 / np.arange(1, min(shape) + 1), seed=4)
    result = ooc_svd.svd(A, 4, oversample=10, method="krylov", niter=6)
    (basis, width), = bases
    assert width == min(shape) and basis.shape[1] <= width
    np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-12)
    np.testing.assert_allclose(result.S, naive.truncated_svd(A, 4)[1], rtol=1e-10)


def test_extend_basis_keeps_only_new_directions():
    from ooc_svd.engine import extend_basis

    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.standard_normal((50, 4)))
    inside = basis @ rng.standard_normal((4, 3))  # in the span: all dropped
    new = rng.standard_normal((50, 2))
    extended = extend_basis(basis, np.hstack([inside, new]))
    assert extended.shape == (50, 6)
    np.testing.assert_allclose(extended.T @ extended, np.eye(6), atol=1e-14)
