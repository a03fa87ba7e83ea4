"""CPU CSR kernels on one in-memory block, with and without prefetching the rows of X and Z.

    python benchmarks/bench_csr_kernels.py [--rows 100000] [--cols 200000] [--row-nnz 50]
                                           [--basis 30] [--column-exponents 0 1]
                                           [--ahead 0 4 8 16 32]

Each non-zero of a CSR block reads a row of X (or adds into a row of Z) at a random place
in memory. This times the kernels of ``ooc_svd.kernels.csr`` that prefetch those rows (the
fused power kernel and Y = A X) on the same block, for each prefetch distance (``ahead``
non-zeros; 0 turns prefetching off), in one process, with uniform columns (exponent 0)
and column j drawn with probability ~ (j + 1) ** -exponent.
Also, for scale, the power kernel on a block whose columns all lie in the first 256 (or
all --cols, if fewer), whose rows of X and Z stay in cache: what the arithmetic alone
allows. Prints M non-zeros/s, best of --repeats, and each rate's ratio to the first --ahead
(0 by default: no prefetching).
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np

from ooc_svd.kernels import csr


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--cols", type=int, default=200_000)
    parser.add_argument("--row-nnz", type=int, default=50)
    parser.add_argument("--basis", type=int, default=30, help="l = k + p")
    parser.add_argument("--column-exponents", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--ahead", type=int, nargs="+", default=[0, 4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


def block(rows: int, n: int, row_nnz: int, exponent: float, seed: int = 0):
    """(data float32, indices int32 sorted within rows, indptr int64) of a CSR block."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -exponent)
    columns = np.searchsorted(cdf / cdf[-1], rng.random(rows * row_nnz))
    indices = np.sort(columns.reshape(rows, row_nnz), axis=1).reshape(-1).astype(np.int32)
    data = rng.standard_normal(rows * row_nnz, dtype=np.float32)
    return data, indices, np.arange(rows + 1, dtype=np.int64) * row_nnz


def best_of(function, repeats: int) -> float:
    function()  # compiles, and brings the block into memory
    best = np.inf
    for _ in range(repeats):
        began = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - began)
    return best


def kernel_calls(data, indices, indptr, n: int, l: int):
    """name -> function(ahead) running one kernel over the block."""
    threads = numba.get_num_threads()
    rows = indptr.size - 1
    rng = np.random.default_rng(1)
    Z_parts, colsum_parts = np.zeros((threads, n, l)), np.zeros((threads, n))
    ysum_parts, shifted = np.zeros((threads, l)), np.zeros(l)
    X = rng.standard_normal((n, l))
    Y = np.empty((rows, l), order="F")
    row_bounds = csr.thread_bounds(indptr, threads)
    return {
        "power (fused)": lambda ahead: csr.csr_power_kernel(
            data, indices, indptr, row_bounds, X, shifted, Z_parts, colsum_parts, ysum_parts,
            ahead),
        "Y = A X": lambda ahead: csr.csr_times_kernel(
            data, indices, indptr, row_bounds, X, shifted, Y, ahead),
    }


def main() -> None:
    args = parse_args()
    l = args.basis
    print(f"{args.rows} rows x {args.cols} columns, {args.row_nnz} non-zeros a row, l = {l}, "
          f"{numba.get_num_threads()} threads; M non-zeros/s (ratio to ahead = "
          f"{args.ahead[0]})\n")
    print("| columns | kernel | " + " | ".join(f"ahead {a}" for a in args.ahead) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in args.ahead) + " |")
    cases = [(f"~ (j+1)^-{e:g}" if e else "uniform", block(args.rows, args.cols,
                                                              args.row_nnz, e))
             for e in args.column_exponents]
    data, _, indptr = cases[0][1]
    first = min(256, args.cols)  # columns whose rows of X and Z stay in cache
    cached = np.random.default_rng(2).integers(0, first, data.size).astype(np.int32)
    cases.append((f"first {first} only (in cache)", (data, np.sort(cached.reshape(
        args.rows, args.row_nnz), axis=1).reshape(-1), indptr)))
    for label, (data, indices, indptr) in cases:
        calls = kernel_calls(data, indices, indptr, args.cols, l)
        if label.startswith("first "):
            calls = {"power (fused)": calls["power (fused)"]}
        for name, call in calls.items():
            rates = [data.size / best_of(lambda c=call, a=ahead: c(a), args.repeats) / 1e6
                     for ahead in args.ahead]
            cells = [f"{rate:.1f} ({rate / rates[0]:.2f})" for rate in rates]
            print(f"| {label} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
