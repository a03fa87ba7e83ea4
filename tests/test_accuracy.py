"""Fixed-accuracy rank, energy helpers, low-rank factors and the spectral error estimate."""

import naive
import numpy as np
import pytest

import ooc_svd
from ooc_svd import InputError, rank_for_energy


def minimal_rank(A, tol, mean=None):
    """The smallest r with ||A - A_r||_F <= tol ||A||_F, from LAPACK's full spectrum (the
    tail sums of its squares, which do not cancel)."""
    S = np.linalg.svd(A - (0 if mean is None else mean), compute_uv=False)
    tail = np.sqrt(np.append(np.cumsum(S[::-1] ** 2)[::-1][1:], 0.0) / np.sum(S**2))
    return int(np.flatnonzero(tail <= tol)[0]) + 1


@pytest.mark.parametrize("method", ["exact", "gram", "randomized"])
@pytest.mark.parametrize("tol", [0.3, 0.05, 1e-3])
def test_tolerance_mode_reaches_the_residual_with_a_near_minimal_rank(method, tol):
    A = naive.matrix_with_spectrum(1500, 90, 1.0 / np.arange(1, 91) ** 1.2, seed=3)
    result = ooc_svd.svd(A, tol=tol, method=method, niter=2)
    direct = np.linalg.norm(A - (result.U * result.S) @ result.V.T) / np.linalg.norm(A)
    assert direct <= tol * (1 + 1e-9)
    # ||A||^2 - sum S^2 is exact to about eps ||A||^2: a residual near zero (the full rank,
    # which tol=1e-3 takes here) is known to about sqrt(eps) ||A|| only.
    assert result.residual == pytest.approx(direct, rel=1e-6, abs=1e-7)
    best = minimal_rank(A, tol)
    if method == "randomized":
        # At most one growth block more than the exact minimal rank.
        assert best <= result.rank <= best + ooc_svd.plan.GROWTH_BLOCK
        assert result.passes <= result.plan.passes
    else:
        assert result.rank == best and result.passes == 2


def test_a_tolerance_below_the_cancellation_floor_still_gives_the_minimal_rank():
    """||A||^2 - sum S^2 cancels to about 1e-16 ||A||^2, so tol=1e-10 needs the whole
    spectrum's tail: the exact method has it to eps sigma_1, and gets the minimal rank and
    its residual; gram knows its tail to sqrt(n eps) only, and either meets the tol or says
    that it did not."""
    A = naive.matrix_with_spectrum(400, 40, np.logspace(0, -12, 40), seed=6)
    tol = 1e-10
    best = minimal_rank(A, tol)
    exact = ooc_svd.svd(A, tol=tol, method="exact")
    direct = np.linalg.norm(A - (exact.U * exact.S) @ exact.V.T) / np.linalg.norm(A)
    assert exact.rank == best and exact.note == ""
    assert exact.residual <= tol and exact.residual == pytest.approx(direct, rel=1e-3)
    gram = ooc_svd.svd(A, tol=tol, method="gram")
    direct = np.linalg.norm(A - (gram.U * gram.S) @ gram.V.T) / np.linalg.norm(A)
    assert gram.rank >= best and (direct <= tol or "cannot be confirmed" in gram.note)
    # A wide matrix: G's eigenvalues past m are rounding, not residual.
    wide = np.random.default_rng(6).standard_normal((30, 200))
    full = ooc_svd.svd(wide, tol=1e-9, method="gram")
    assert full.rank == 30 and full.residual < 1e-9 and full.note == ""


def test_tolerance_mode_with_centering_and_cap():
    A = naive.matrix_with_spectrum(800, 60, np.logspace(0, -4, 60), seed=4) + 7.0
    result = ooc_svd.svd(A, tol=1e-2, center=True)
    assert result.rank == minimal_rank(A, 1e-2, mean=A.mean(axis=0)) and result.note == ""
    capped = ooc_svd.svd(A, tol=1e-6, max_rank=5, center=True)
    assert capped.rank == 5 and capped.residual > 1e-6
    assert f"the residual {capped.residual:.3g} exceeds tol=1e-06 at rank 5" in capped.note


def test_a_tol_below_the_methods_rounding_is_not_blamed_on_the_cap():
    """The best rank-25 residual is 4.5e-11, below tol: the cap did not stop the run
    short, the gram method's rounding hides whether it got there (its vectors, accurate to
    eps (sigma_1 / sigma_25)^2, leave 2.5e-10). The note says so, not 'raise max_rank'."""
    A = naive.matrix_with_spectrum(400, 30, np.logspace(0, -12, 30), seed=3)
    result = ooc_svd.svd(A, tol=1e-10, max_rank=25, method="gram")
    direct = np.linalg.norm(A - (result.U * result.S) @ result.V.T) / np.linalg.norm(A)
    assert result.rank == 25 and direct < result.residual and result.residual > 1e-10
    assert "within the gram method's rounding" in result.note
    assert ("tol=1e-10 cannot be confirmed: the exact method resolves smaller residuals; a "
            "larger max_rank may be needed too") in result.note
    exact = ooc_svd.svd(A, tol=1e-10, max_rank=25, method="exact")
    assert exact.rank == 25 and exact.residual <= 1e-10 and exact.note == ""


def test_an_exact_residual_far_above_a_tiny_tol_at_the_cap_is_said():
    """The exact method resolves residuals to a few eps: stopped at the cap with a residual
    5000 times tol=1e-12, it says so (a slack of 4 eps in squared units, absolute, once hid
    every residual below 3e-8)."""
    A = naive.matrix_with_spectrum(600, 40, np.logspace(0, -12, 40), seed=3)
    result = ooc_svd.svd(A, tol=1e-12, max_rank=27, method="exact")
    assert result.rank == 27 and result.residual > 1e3 * 1e-12
    assert f"the residual {result.residual:.3g} exceeds tol=1e-12 at rank 27, the cap" \
        in result.note
    full = ooc_svd.svd(A, tol=1e-12, max_rank=40, method="exact")
    assert full.residual <= 1e-12 and full.note == ""


def test_a_tol_within_the_randomized_methods_rounding_takes_the_cap():
    """The randomized method measures its residual as ||A||^2 - sum S^2, whose rounding
    leaves relative residuals below about 1.5e-5 unresolved: it stopped at an arbitrary rank
    below that (76 where this matrix needs 83 for 1e-8) and reported a residual of 0, and
    returned a rank one short for 1e-7 (72, where 73 is needed). Now a rank is taken only
    with that margin: a tol within it grows the basis to the cap, and the note says the tol
    is not confirmed there. 'auto' plans the exact method instead, which resolves it."""
    A = naive.matrix_with_spectrum(1500, 150, 0.8 ** np.arange(150), seed=8)
    for tol in (3e-5, 1e-4):
        result = ooc_svd.svd(A, tol=tol, method="randomized")
        direct = np.linalg.norm(A - (result.U * result.S) @ result.V.T) / np.linalg.norm(A)
        assert minimal_rank(A, tol) <= result.rank and direct <= tol and result.note == ""
    for tol in (1e-5, 1e-7, 1e-8):  # 1e-5: above the rounding (8e-6), within twice it
        capped = ooc_svd.svd(A, tol=tol, max_rank=100, method="randomized")
        assert capped.rank == 100 and capped.passes == capped.plan.passes
        assert f"tol={tol:g} cannot be confirmed: the exact method resolves smaller" \
            in capped.note
    result = ooc_svd.svd(A, tol=1e-8)
    assert result.method == "exact" and result.rank == minimal_rank(A, 1e-8) == 83
    assert "of the methods that resolve tol=1e-08" in result.plan.reason
    assert "tol=1e-08, rank <= 150" in result.plan.describe()
    # gram's tail is known to about 4 sqrt(n eps) ||A|| (7.3e-7 at n = 150): auto takes it
    # for a tol of twice that or more.
    assert ooc_svd.svd_plan(A, tol=1.4e-6).method == "exact"
    assert ooc_svd.svd_plan(A, tol=1.6e-6).method == "gram"
    # Rank min(m, n) is exact: so is its zero residual, whatever the tol.
    wide = np.random.default_rng(8).standard_normal((30, 5000))
    full = ooc_svd.svd(wide, tol=1e-10)
    direct = np.linalg.norm(wide - (full.U * full.S) @ full.V.T) / np.linalg.norm(wide)
    assert full.method == "randomized" and full.rank == 30 and full.note == ""
    assert full.residual == 0 and direct < 1e-13


def test_a_sparse_centered_tol_counts_the_rounding_of_the_uncentered_rows():
    """Sparse rows are centered algebraically: ||A_c||^2 less the captured energy cancels
    to the rounding of the uncentered energy, here 1e7 times the centered one (a column of
    1000s). tol=1e-6 was taken as met at rank 6 (a residual of 6.7e-5 reported as 0); now
    the basis grows to the cap and the note says the tol cannot be confirmed."""
    import scipy.sparse

    rng = np.random.default_rng(0)
    m, n = 3000, 300
    prototypes = scipy.sparse.random(12, n, density=0.1, random_state=0, format="csr")
    groups = rng.integers(0, 12, m)
    scales = rng.standard_normal(m) * 10.0 ** (-0.7 * groups)
    A = scipy.sparse.diags(scales) @ prototypes[groups]
    A = scipy.sparse.hstack([A, np.full((m, 1), 1000.0)]).tocsr()
    result = ooc_svd.svd(A, tol=1e-6, center=True, max_rank=60, method="randomized")
    dense = A.toarray() - result.mean
    direct = np.linalg.norm(dense - (result.U * result.S) @ result.V.T) / np.linalg.norm(dense)
    assert direct <= 1e-6 or "tol=1e-06 cannot be confirmed" in result.note
    assert result.rank == 60 and "a larger max_rank may be needed too" in result.note


def test_auto_falls_back_to_the_randomized_method_when_the_exact_one_does_not_fit():
    """A tol only exact resolves, but its n x n factors exceed the limit: 'auto' runs the
    randomized method, which here reaches rank min(m, n), exactly: the result is the one
    exact would give, and no note says otherwise."""
    wide = np.random.default_rng(9).standard_normal((40, 3000))
    result = ooc_svd.svd(wide, tol=1e-9, memory_limit="60MB")
    assert result.plan.method == "randomized" and "exact would need " in result.plan.reason
    assert result.rank == 40 and result.note == ""


def test_a_requested_gram_says_when_the_spectrum_is_beyond_it():
    """eps (sigma_1 / sigma_k)^2 of 1e-8 or more: 'auto' switches to exact; a requested gram
    keeps its result and says what it could not resolve."""
    spectrum = np.r_[np.logspace(0, -9, 8), np.zeros(32)]
    A = naive.matrix_with_spectrum(2000, 40, spectrum, seed=10)
    result = ooc_svd.svd(A, 8, method="gram")
    assert result.method == "gram" and result.passes == 2
    assert "too small for the gram method's accuracy: the trailing singular" in result.note
    assert "before centering" not in result.note  # nothing was
    assert ooc_svd.svd(A, 3, method="gram").note == ""
    centered = ooc_svd.svd(A + 5.0, 8, method="gram", center=True)
    assert "(before centering) is too small for the gram method's" in centered.note


def test_a_capped_rank_is_oversampled_like_a_fixed_one():
    """tol with a binding max_rank: the randomized basis grows to max_rank + oversample, so
    the rank-5 result is as near the optimum as k=5 gives (0.6096 without oversampling)."""
    A = naive.matrix_with_spectrum(300, 80, 0.9 ** np.arange(80), seed=1)
    S = np.linalg.svd(A, compute_uv=False)
    optimal = np.sqrt(np.sum(S[5:] ** 2) / np.sum(S**2))
    fixed = ooc_svd.svd(A, 5, method="randomized")
    capped = ooc_svd.svd(A, tol=0.01, max_rank=5, method="randomized")
    assert capped.rank == 5 and capped.plan.basis_size == 15
    assert capped.residual <= max(fixed.residual, optimal) * (1 + 1e-5)


def test_tolerance_arguments_are_checked():
    A = np.random.default_rng(0).standard_normal((50, 10))
    for kwargs, message in [
        ({}, "give either k"),
        ({"k": 3, "tol": 0.1}, "give k .* or tol .*, not both"),
        ({"tol": 1.5}, r"tol=1.5 must be a relative residual between 0 and 1 \(exclusive\)"),
        ({"tol": 0}, r"tol=0 must be a relative residual between 0 and 1"),
        ({"tol": -1.0}, r"tol=-1.0 must be a relative residual between 0 and 1"),
        ({"tol": "0.1"}, "tol must be a number, not '0.1'"),
        ({"tol": True}, "tol must be a number, not True"),
        ({"tol": "0.1"}, "tol must be a number, not '0.1'"),
        ({"tol": float("nan")}, r"tol=nan must be a relative residual between 0 and 1"),
        ({"tol": 0.1, "max_rank": 0}, "max_rank=0 must be >= 1"),
        ({"k": 3, "max_rank": 4}, "max_rank applies to the fixed-accuracy mode"),
        ({"tol": 0.1, "method": "krylov"}, "tol .* works with 'exact', 'gram' and 'randomized'"),
    ]:
        with pytest.raises(InputError, match=message):
            ooc_svd.svd(A, **kwargs)
    # A cap beyond min(m, n) = 10 is that: the rank of the whole spectrum if tol needs it.
    assert ooc_svd.svd(A, tol=1e-9, max_rank=11).rank == 10


def test_explained_variance_and_rank_for_energy():
    A = naive.matrix_with_spectrum(400, 30, np.linspace(3, 0.1, 30), seed=5) + 2.0
    result = ooc_svd.svd(A, 29, center=True, method="exact")
    centered = A - A.mean(axis=0)
    pca_variance = np.linalg.svd(centered, compute_uv=False) ** 2 / (400 - 1)
    np.testing.assert_allclose(result.explained_variance, pca_variance[:29], rtol=1e-10)
    total = np.sum(pca_variance)
    np.testing.assert_allclose(result.explained_variance_ratio, pca_variance[:29] / total,
                               rtol=1e-10)
    energy = np.cumsum(pca_variance) / total
    for fraction in (0.5, 0.9, 0.99):
        assert result.rank_for_energy(fraction) == np.flatnonzero(energy >= fraction)[0] + 1
    few = ooc_svd.svd(A, 3, center=True)
    with pytest.raises(InputError, match="recompute with tol="):
        few.rank_for_energy(0.999)
    assert rank_for_energy([2.0, 1.0], 5.0, 1.0) == 2
    # A complete float32 spectrum holds all the energy, to its squares' rounding.
    single = np.random.default_rng(0).standard_normal((500, 20)).astype(np.float32)
    assert ooc_svd.svd(single, 20, method="exact").rank_for_energy(1.0) == 20
    # The advised tol keeps at least the fraction: rounded down (sqrt(0.05) = 0.2236...).
    with pytest.raises(InputError, match=r"recompute with tol=0\.223 to"):
        rank_for_energy([1.0], 2.0, 0.95)
    with pytest.raises(InputError, match=r"recompute with the full rank"):
        rank_for_energy([1.0], 2.0, 1.0)


def test_low_rank_factors_of_the_ten_by_ten_rank_two_example():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((10, 2)) @ rng.standard_normal((2, 10))
    factors = ooc_svd.low_rank_factors(W)
    B, A = factors
    assert factors.rank == 2 == np.linalg.matrix_rank(W)
    assert B.shape == (10, 2) and A.shape == (2, 10)
    assert (factors.parameters_before, factors.parameters_after) == (100, 40)
    np.testing.assert_allclose(B @ A, W, atol=20 * np.finfo(float).eps * np.abs(W).max())
    assert factors.relative_error < 1e-14


@pytest.mark.parametrize(
    ("shape", "rank", "dtype"),
    [((60, 40), 7, np.float64), ((40, 60), 5, np.float64), ((300, 5000), 3, np.float64),
     ((80, 30), 4, np.float32)],
)
def test_low_rank_factors_follow_matrix_rank(shape, rank, dtype):
    rng = np.random.default_rng(1)
    W = (rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1])))
    W = W.astype(dtype)
    factors = ooc_svd.low_rank_factors(W)
    assert factors.rank == np.linalg.matrix_rank(W) == rank
    scale = np.abs(W).max()
    np.testing.assert_allclose(factors.B @ factors.A, W, atol=1e3 * np.finfo(dtype).eps * scale)
    assert ooc_svd.low_rank_factors(W, rank=2).rank == 2
    loose = ooc_svd.low_rank_factors(W, rtol=0.5)
    S = np.linalg.svd(W.astype(float), compute_uv=False)
    assert loose.rank == np.count_nonzero(0.5 * S[0] < S)


def test_the_rank_of_low_precision_data_does_not_vanish_with_many_rows():
    """numpy's max(m, n) eps S_max reaches S_max at m = 1/eps: float16 data of 1024 rows,
    float32 data of 8.4 million. The rounding of the values, eps ||W||_F, does not grow
    with m."""
    from ooc_svd.engine import numerical_rank, rank_tolerance

    rng = np.random.default_rng(2)
    W = (rng.standard_normal((2000, 5)) @ rng.standard_normal((5, 50))).astype(np.float16)
    factors = ooc_svd.low_rank_factors(W)
    assert factors.rank == 5 and factors.relative_error < 1e-3
    assert ooc_svd.svd(W, 8, method="exact").numerical_rank == 5
    # A float32 matrix of 9 million rows and rank 2 (singular values 5195 and 2999)
    S, shape, eps32 = np.array([5195.0, 2999.0, 1e-4]), (9_000_000, 3), np.finfo("f4").eps
    assert 1e-4 < rank_tolerance(S[0], float(np.sqrt(S @ S)), shape, eps32) < 1e-2
    assert numerical_rank(S, shape, eps32, float(np.sqrt(S @ S))) == 2
    assert max(shape) * eps32 * S[0] > S[0]  # numpy's tolerance: rank 0
    # Centered float32 data of a mean 1e6 x its spread: ||A||_F is the mean's, numpy's
    # tolerance the smaller one, and every direction of the spread counts.
    A = (1e6 + rng.standard_normal((3000, 100))).astype(np.float32)
    assert ooc_svd.svd(A, 100, center=True, method="exact").numerical_rank == 100


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_numerical_rank_of_centered_data_leaves_out_the_rounding_of_its_values(dtype):
    """A rank-5 spread on a mean of 1e6: rounding the stored values (0.06 apart in float32,
    1.2e-10 in float64) and the float64 centering make directions that numpy's rule on the
    centered matrix, relative to its S_max of the spread, counts as rank."""
    from ooc_svd.engine import rank_tolerance, rounding_unit

    rng = np.random.default_rng(3)
    m, n, rank = 1000, 40, 5
    A = (1e6 + rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))).astype(dtype)
    result = ooc_svd.svd(A, n, center=True, method="exact")
    centered = A.astype(np.float64) - A.astype(np.float64).mean(axis=0)
    assert np.linalg.matrix_rank(centered) == n  # numpy counts the rounding
    assert result.numerical_rank == rank
    assert ooc_svd.svd(A, n, method="exact").numerical_rank == rank + 1  # and the mean
    if dtype == np.float64:  # the same at 1e153, whose m ||mu||^2 overflows float64
        huge = (A - 1e6) * 1e147 + 1e153
        assert ooc_svd.svd(huge, 8, center=True, method="exact").numerical_rank == rank
    # Uncentered, the added floors are below the other bounds and change nothing, on
    # small shapes too (where sqrt(m) + sqrt(n) exceeds sqrt(m n)).
    eps, eps64 = rounding_unit(A.dtype), np.finfo(np.float64).eps
    for W in (A, A[:2, :2], A[:3, :3], A[:8, :2], A[:, :1]):
        S = np.linalg.svd(W.astype(np.float64), compute_uv=False)
        norm, shape = float(np.linalg.norm(W.astype(np.float64))), W.shape
        uncentered = max(min(eps / 2 * norm, max(shape) * eps * S[0]),
                         max(shape) * eps64 * S[0])
        assert rank_tolerance(S[0], norm, shape, eps) == pytest.approx(uncentered, rel=1e-12)


def test_low_rank_factors_of_a_wide_matrix_in_memory_factor_its_transpose(tmp_path):
    """More than 4096 columns: W^T is factored when W is in memory (dense or sparse); a
    wide W with out, or too wide both ways, is refused naming the limit."""
    import scipy.sparse

    W = scipy.sparse.random(30, 5000, density=0.01, random_state=3, format="csr")
    factors = ooc_svd.low_rank_factors(W)
    assert factors.rank == np.linalg.matrix_rank(W.toarray()) == 30
    assert factors.B.shape == (30, 30) and factors.A.shape == (30, 5000)
    np.testing.assert_allclose(factors.B @ factors.A, W.toarray(), atol=1e-12)
    with pytest.raises(InputError, match="n may not exceed 4096; for W held in memory and "
                                         "without out"):
        ooc_svd.low_rank_factors(W.toarray(), out=str(tmp_path / "f.zarr"))
    with pytest.raises(InputError, match="n may not exceed 4096; svd"):
        ooc_svd.low_rank_factors(scipy.sparse.random(4100, 4100, density=1e-4, format="csr"))


def test_low_rank_factors_out_of_core(tmp_path, zarr_matrix):
    rng = np.random.default_rng(2)
    W = rng.standard_normal((3000, 6)) @ rng.standard_normal((6, 50))
    out = str(tmp_path / "factors.zarr")
    factors = ooc_svd.low_rank_factors(zarr_matrix(W, chunk_rows=250), out=out,
                                       memory_limit="8MB")
    assert factors.rank == 6 and factors.B.shape == (3000, 6)
    np.testing.assert_allclose(factors.B[:] @ factors.A, W, atol=1e-10 * np.abs(W).max())


def test_spectral_error_estimate():
    A = naive.matrix_with_spectrum(600, 50, 1.0 / np.arange(1, 51), seed=6)
    result = ooc_svd.svd(A, 5, method="randomized", spectral_iters=8)
    true = np.linalg.norm(A - (result.U * result.S) @ result.V.T, 2)
    assert result.passes == 3 + 8 == result.plan.passes
    assert "11 passes (8 of them for the spectral error estimate)" in result.plan.describe()
    assert 0.9 * true <= result.spectral_error <= true * (1 + 1e-10)
    # One read gives z = R^T R x: sqrt(||z||) (0.41 of the norm here), not the Rayleigh
    # quotient of x (0.31), which would leave that read unused.
    once = ooc_svd.svd(A, 5, method="randomized", spectral_iters=1)
    assert 0.35 * true <= once.spectral_error <= true * (1 + 1e-10)
    centered = ooc_svd.svd(A + 3.0, 5, center=True, method="gram", spectral_iters=8)
    assert centered.passes == 2 + 8 == ooc_svd.svd_plan(A, 5, method="gram",
                                                        spectral_iters=8).passes
    Ac = A + 3.0 - centered.mean
    true = np.linalg.norm(Ac - (centered.U * centered.S) @ centered.V.T, 2)
    assert 0.9 * true <= centered.spectral_error <= true * (1 + 1e-10)


def test_low_rank_factors_arguments_are_checked():
    W = np.ones((20, 10))
    for options, message in (({"rank": 2, "rtol": 0.1}, "give rank or rtol, not both"),
                             ({"rtol": "a"}, "rtol must be a number, not 'a'"),
                             ({"rtol": -1.0}, "rtol=-1.0 must be a finite number >= 0"),
                             ({"rtol": np.nan}, "rtol=nan must be a finite number >= 0"),
                             ({"rank": 11}, r"rank=11 exceeds min\(m, n\) = 10")):
        with pytest.raises(InputError, match=message):
            ooc_svd.low_rank_factors(W, **options)
