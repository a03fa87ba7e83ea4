"""The Gram matrix of a CSR block: the sparse kernel (products of the pairs of each row's
non-zeros) against densifying the rows for dsyrk, on the same block, in one process.

    python benchmarks/bench_sparse_gram.py --shape 200000 1000 --row-nnz 20

Uniform random positions; each way runs once to compile, then is timed.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import scipy.sparse

from ooc_svd.kernels.cpu import BlockStats, SubBlocks, densified_gram_block
from ooc_svd.kernels.csr import gram_into
from ooc_svd.sources.csr import CSRBlock, row_pairs


def densified_gram(block: CSRBlock, G: np.ndarray) -> None:
    """What gram_block does with rows too dense for the pairs kernel."""
    n = block.shape[1]
    densified_gram_block(block, 0, np.zeros(n), G, BlockStats.zeros(n), SubBlocks(n))


def timed(function, block: CSRBlock) -> tuple[float, np.ndarray]:
    n = block.shape[1]
    G = np.zeros((n, n), order="F")
    function(block, G)  # compiles
    G[...] = 0
    began = time.perf_counter()
    function(block, G)
    return time.perf_counter() - began, G


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=(200_000, 1000))
    parser.add_argument("--row-nnz", type=float, nargs="+", default=[5, 20, 100])
    args = parser.parse_args()
    m, n = args.shape
    print(f"{m} x {n} CSR block, float32 values, {os.cpu_count()} cores")
    print("| non-zeros a row | pairs | sparse kernel (s) | densified + dsyrk (s) | ratio | "
          "max rel diff |")
    print("|---|---|---|---|---|---|")
    for per_row in args.row_nnz:
        A = scipy.sparse.random(m, n, density=per_row / n, format="csr", random_state=0,
                                dtype=np.float32)
        block = CSRBlock.from_scipy(A)
        sparse_s, G_sparse = timed(
            lambda b, G: gram_into(b, 0, np.zeros(n), G, BlockStats.zeros(n)), block)
        dense_s, G_dense = timed(densified_gram, block)
        diff = np.abs(np.triu(G_sparse) - np.triu(G_dense)).max() / np.abs(G_dense).max()
        print(f"| {per_row:g} | {row_pairs(block.indptr):.3g} | {sparse_s:.3f} | "
              f"{dense_s:.3f} | {dense_s / sparse_s:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
