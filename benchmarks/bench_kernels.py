"""Kernel throughputs on one in-memory row block: what the planner's cost model assumes.

    python benchmarks/bench_kernels.py [--rows 50000] [--cols 256] [--basis 30] [--threads 1]
        [--factor-sizes 500 1000 2000]

Measures, with BLAS limited to --threads threads (1 is what a pass gives BLAS on two cores
beside a decompressing reader): the float32 -> float64 widening kernel, the fused power
products (Y = A X, Z += A^T Y), dsyrk (G += A^T A) and Householder QR of the block, as
seconds per block and flop/s, next to the constants in ooc_svd/plan.py. Then, with BLAS's
every thread (the engine factors between passes), the n x n factorizations of the exact
and gram methods (SVD of R, eigendecomposition of G) at each --factor-sizes n, in n^3 per
second.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from ooc_svd import plan
from ooc_svd.kernels import cpu
from ooc_svd.tsqr import householder_r


def best_of(function, repeats: int = 5) -> float:
    function()  # compile / warm up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        function()
        times.append(time.perf_counter() - began)
    return min(times)


def householder_flops(rows: int, cols: int) -> float:
    """Flops of the Householder QR of a rows x cols matrix (R only): 2 m n^2 - 2 n^3 / 3
    with m >= n the longer side and n the shorter."""
    m, n = max(rows, cols), min(rows, cols)
    return 2.0 * m * n * n - 2 / 3 * n**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--cols", type=int, default=256)
    parser.add_argument("--basis", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--factor-sizes", type=int, nargs="*", default=[500, 1000, 2000])
    args = parser.parse_args()
    b, n, l = args.rows, args.cols, args.basis
    rng = np.random.default_rng(0)
    block = rng.standard_normal((b, n)).astype(np.float32)
    X = np.asfortranarray(rng.standard_normal((n, l)))
    shift = np.zeros(n)
    subs = cpu.SubBlocks(n)

    def widen():
        stats = cpu.BlockStats.zeros(n)
        for _ in subs.sweep(block, 0, shift, stats):
            pass

    def fused():
        cpu.power_block(block, 0, X, shift, np.zeros((n, l), order="F"),
                        cpu.BlockStats.zeros(n), subs)

    def gram():
        cpu.gram_block(block, 0, shift, np.zeros((n, n), order="F"), cpu.BlockStats.zeros(n),
                       subs)

    wide = block[: max(4 * n, 1)].astype(np.float64)

    def householder():  # the exact method's TSQR pass factors such stacks
        householder_r(wide.copy(order="F"))  # it overwrites its input

    with threadpool_limits(args.threads, user_api="blas"):
        rows = [
            ("widen f32 -> f64 (+ column sums)", best_of(widen), b * n * 4, 0.0, None),
            ("fused products, incl. widening", best_of(fused), b * n * 4, 4.0 * b * n * l,
             plan.GEMM_FLOPS_PER_S),
            ("dsyrk G += A^T A, incl. widening", best_of(gram), b * n * 4, 1.0 * b * n * n,
             plan.SYRK_FLOPS_PER_S),
            (f"Householder QR of {wide.shape[0]} x {n}", best_of(householder),
             wide.nbytes, householder_flops(*wide.shape), plan.QR_FLOPS_PER_S),
        ]
    print(f"block {b} x {n} float32, basis l={l}, BLAS threads={args.threads}\n")
    print("| kernel | seconds | GB/s of input | GFLOP/s | cost model GFLOP/s |")
    print("|---|---|---|---|---|")
    for name, seconds, nbytes, flops, assumed in rows:
        rate = f"{flops / seconds / 1e9:.1f}" if flops else "-"
        model = f"{assumed / 1e9:.0f}" if assumed else "-"
        print(f"| {name} | {seconds:.4f} | {nbytes / seconds / 1e9:.2f} | {rate} | {model} |")
    print_factorizations(args.factor_sizes)


def print_factorizations(sizes: list[int]) -> None:
    """Seconds of the exact and gram methods' n x n factorizations, as the engine calls
    them, against the cost model's n^3 per second."""
    import scipy.linalg

    if not sizes:
        return
    print("\n| factorization | n | seconds | n^3 per s | cost model n^3 per s |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(1)
    for n in sizes:
        R = np.triu(rng.standard_normal((n, n)))
        G = R.T @ R
        rows = [
            ("SVD of R (exact)", plan.SVD_CUBES_PER_S, lambda R=R: scipy.linalg.svd(
                R.copy(), full_matrices=False, overwrite_a=True, check_finite=False)),
            ("eigh of G (gram)", plan.EIGH_CUBES_PER_S, lambda G=G: scipy.linalg.eigh(
                G.copy(), overwrite_a=True, check_finite=False)),
        ]
        for name, assumed, factor in rows:
            seconds = best_of(factor, repeats=3)
            print(f"| {name} | {n} | {seconds:.3f} | {n**3 / seconds:.2g} | {assumed:.2g} |")


if __name__ == "__main__":
    main()
