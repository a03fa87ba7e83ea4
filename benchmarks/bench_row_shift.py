"""svd_lowrank(A, q, niter, M) with a column M (m, 1) on a sparse A: rank-one corrections
by the kernels against the blocks of A - M densified as they are read.

    python benchmarks/bench_row_shift.py [--shape 20000 10000] [--nnz 200000] [--q 6]
                                         [--niter 2] [--repeats 2]

Both ways run the randomized method in this process on the same in-memory A (float32,
uniform columns) and M (the rows' means, float64), one after the other, --repeats times
each, alternating: seconds of each run, and the largest difference between their singular
values relative to the first. The densified way is what a run on a cluster still does, and
what every such run did before; those runs took their method from the cost model of dense
blocks, which may choose block Krylov (the same reads, wider products), where the
corrected way's follows the sparse one, as for A alone. This compares one method both ways.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse

from ooc_svd.api import _Request, _run, open_matrix
from ooc_svd.engine import fixed_rank
from ooc_svd.sources.difference import sparse_column, subtract


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=(20_000, 10_000))
    parser.add_argument("--nnz", type=int, default=200_000)
    parser.add_argument("--q", type=int, default=6)
    parser.add_argument("--niter", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    (m, n), rng = args.shape, np.random.default_rng(0)
    A = scipy.sparse.random(m, n, density=args.nnz / (m * n), random_state=rng, format="csr",
                            dtype=np.float32)
    M = (A.sum(axis=1) / n).A  # the rows' means, as a (m, 1) column
    source = open_matrix(A)[0]

    def by_the_kernels():
        result = _run(source, _Request(args.q, fixed_rank(args.q), oversample=0,
                                       niter=args.niter, method="randomized",
                                       row_shift=sparse_column(source, M)))
        return result.S

    def densified():
        difference, _ = subtract(source, M)
        request = _Request(args.q, fixed_rank(args.q), oversample=0, niter=args.niter,
                           method="randomized")  # as svd_lowrank's run on sparse A
        return _run(difference, request).S

    print(f"A: {m} x {n}, {A.nnz} non-zeros (float32); M: a column; q={args.q}, "
          f"niter={args.niter}\n")
    print("| way | seconds |")
    print("| --- | --- |")
    results = {}
    for _ in range(args.repeats):
        for name, run in (("rank-one corrections", by_the_kernels), ("densified", densified)):
            began = time.perf_counter()
            results[name] = run()
            print(f"| {name} | {time.perf_counter() - began:.2f} |")
    first, second = results.values()
    print(f"\nmax |S difference| / S_1: {np.max(np.abs(first - second)) / first[0]:.1e}")


if __name__ == "__main__":
    main()
