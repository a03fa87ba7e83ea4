"""Error estimates that cost extra passes, and low-rank factorizations W ~= B A."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .passes import PassContext, residual_power_pass
from .sketch import gaussian_test_matrix


def spectral_residual_estimate(
    context: PassContext, U: Any, S: np.ndarray, V: np.ndarray, iterations: int, seed: int
) -> float:
    """Estimate ||A - 1 mu^T - U diag(S) V^T||_2 by power iteration on R^T R.

    Each iteration is one read of A (and of U), which gives z = R^T R x for the unit x of
    the iteration: sqrt(||z||) never exceeds ||R||_2 (nor falls below the Rayleigh
    quotient's sqrt(x^T z), from the same read) and converges to it, its gap after t
    iterations shrinking like (sigma_2(R) / sigma_1(R))^(2t).
    """
    n = V.shape[0]
    x = gaussian_test_matrix(n, 1, seed, stream=1 << 20)
    x /= np.linalg.norm(x)
    estimate = 0.0
    for _ in range(iterations):
        z = residual_power_pass(context, x, U, S, V)
        norm = float(np.linalg.norm(z))
        if norm == 0:
            return 0.0
        estimate = float(np.sqrt(norm))
        x = np.asfortranarray(z / norm)
    return estimate


@dataclass
class LowRankFactors:
    """W ~= B @ A with B = U_r diag(S_r) (m x r) and A = V_r^T (r x n).

    Unpacks as ``B, A = factors``.
    """

    B: Any
    A: np.ndarray
    rank: int
    parameters_before: int
    parameters_after: int
    # ||W - W_r||_F / ||W||_F of the best rank-r approximation W_r, from the tail of W's
    # spectrum in float64: B A, rounded to W's dtype, is off from W_r by that rounding more.
    relative_error: float

    def __iter__(self):
        return iter((self.B, self.A))
