"""Accuracy against passes over A: subspace iteration, block Krylov, svds, randomized_svd.

    python benchmarks/bench_krylov.py --store /data/flat.zarr [--shape 100000 1000]
        [--decay 0.005] [--k 20] [--oversample 10] [--plot benchmarks/krylov_accuracy.png]
    python benchmarks/bench_krylov.py --sparse --store /data/sparse.zarr \
        --shape 1000000 100000 --nnz 38000000 --plot benchmarks/krylov_accuracy_sparse.png

On a dense store with a flat spectrum (singular values exp(-decay j)), or a sparse CSR store
with power-law column frequencies (``--sparse``), generated when absent. The dense reference
is the eigenvalues of A^T A accumulated in float64; the sparse one is scipy's svds (ARPACK)
at tol=0 on a float64 copy, i.e. to float64 precision.
For ooc_svd a pass is a read of the store; for scipy's svds (ARPACK) each product with A or
A^T counts as one pass, since out of core each would be a read; scikit-learn's
randomized_svd makes 2 n_iter + 2 products. Error: max relative error of the top-k singular
values against that reference.
"""

from __future__ import annotations

import argparse
import os

import numpy as np


def reference(A: np.ndarray, k: int) -> np.ndarray:
    gram = np.zeros((A.shape[1], A.shape[1]))
    for start in range(0, A.shape[0], 20_000):
        block = A[start : start + 20_000].astype(np.float64)
        gram += block.T @ block
    return np.sqrt(np.maximum(np.linalg.eigvalsh(gram)[::-1][:k], 0))


def error(S, S_exact) -> float:
    return float(np.max(np.abs(np.asarray(S)[: S_exact.size] - S_exact) / S_exact))


def svds_points(A: np.ndarray, k: int, S_exact: np.ndarray) -> list[tuple[int, float]]:
    """(products, error) for ARPACK at a few tolerances, counting every product."""
    from scipy.sparse.linalg import LinearOperator, svds

    points = []
    for tol in (1e-2, 1e-4, 1e-6, 0):
        calls = [0]

        def matvec(x, calls=calls):
            calls[0] += 1
            return A @ x

        def rmatvec(y, calls=calls):
            calls[0] += 1
            return A.T @ y

        operator = LinearOperator(A.shape, matvec=matvec, rmatvec=rmatvec, dtype=A.dtype)
        S = np.sort(svds(operator, k=k, tol=tol, solver="arpack", random_state=0,
                         return_singular_vectors=False))[::-1]
        points.append((calls[0], error(S, S_exact)))
    return points


def load_matrix(args: argparse.Namespace):
    """The matrix in memory (numpy or scipy.sparse CSR) and its top-k singular values."""
    import zarr

    if not args.sparse:
        if not os.path.exists(args.store):
            from ooc_svd.synthetic import write_dense_matrix

            write_dense_matrix(args.store, tuple(args.shape), decay=args.decay,
                               chunk_rows=10_000)
        A = zarr.open_array(args.store, mode="r")[:]
        return A, reference(A, args.k)
    import scipy.sparse
    from scipy.sparse.linalg import svds

    if not os.path.exists(args.store):
        from ooc_svd.synthetic import write_sparse_matrix

        write_sparse_matrix(args.store, tuple(args.shape), nnz=args.nnz)
    group = zarr.open_group(args.store, mode="r")
    A = scipy.sparse.csr_matrix((group["data"][:], group["indices"][:], group["indptr"][:]),
                                shape=tuple(group.attrs["shape"]))
    # In float64: svds on the float32 matrix computes in float32, accurate to about 1e-7.
    S = svds(A.astype(np.float64), k=args.k, tol=0, solver="arpack", random_state=0,
             return_singular_vectors=False)
    return A, np.sort(S)[::-1]


def main() -> None:
    import ooc_svd

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--shape", type=int, nargs=2, default=(100_000, 1000))
    parser.add_argument("--decay", type=float, default=0.005)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--oversample", type=int, default=10)
    parser.add_argument("--max-niter", type=int, default=6)
    parser.add_argument("--sparse", action="store_true", help="a sparse CSR store")
    parser.add_argument("--nnz", type=int, default=38_000_000, help="non-zeros (sparse)")
    parser.add_argument("--plot", default=None,
                        help="also draw the curves into this PNG (needs matplotlib)")
    args = parser.parse_args()
    A, S_exact = load_matrix(args)
    k, p = args.k, args.oversample

    curves: dict[str, list[tuple[int, float]]] = {"subspace iteration (ooc_svd randomized)": [],
                                                   "block Krylov (ooc_svd krylov)": [],
                                                   "scikit-learn randomized_svd": []}
    for q in range(args.max_niter + 1):
        for name, method in (("subspace iteration (ooc_svd randomized)", "randomized"),
                             ("block Krylov (ooc_svd krylov)", "krylov")):
            result = ooc_svd.svd(args.store, k, oversample=p, niter=q, method=method,
                                 memory_limit="1GB")
            curves[name].append((result.passes, error(result.S, S_exact)))
        try:
            from sklearn.utils.extmath import randomized_svd

            _, S, _ = randomized_svd(A, k, n_oversamples=p, n_iter=q, random_state=0)
            curves["scikit-learn randomized_svd"].append((2 * q + 2, error(S, S_exact)))
        except ImportError:
            pass
    curves["scipy svds (ARPACK), tol 1e-2 .. 0"] = svds_points(A, k, S_exact)

    m, n = A.shape
    if args.sparse:
        title = f"{m} x {n} sparse, {A.nnz} non-zeros, power-law columns, k={k}"
    else:
        title = f"{m} x {n}, flat spectrum exp(-{args.decay} j), k={k}"
    print(f"{title} (float32), oversample={p}\n")
    print("| method | passes | max rel err top-k |")
    print("|---|---|---|")
    for name, points in curves.items():
        for passes, err in points:
            print(f"| {name} | {passes} | {err:.1e} |")
    if args.plot:
        plot(curves, args.plot, title)


def plot(curves, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        passes, errors = zip(*sorted(points), strict=True)
        axes.semilogy(passes, np.maximum(errors, 1e-16), marker="o", label=name)
    axes.set_xscale("log")
    axes.set_xlabel("passes over A (products with A or A^T)")
    axes.set_ylabel("max relative error, top-k singular values")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
