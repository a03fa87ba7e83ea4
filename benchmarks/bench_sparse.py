"""Sparse benchmark: ooc_svd on a CSR store against scipy's svds and scikit-learn in memory.

Every contender runs in its own subprocess, one after another on the same store, so that
peak RSS is its own. Accuracy is the max relative error of the top-k singular values
against scipy's svds with ARPACK at tol=0 on a float64 copy of the matrix (``reference``:
svds on the float32 matrix itself computes in float32, accurate to about 1e-7). The
``kernel`` contender times the fused CSR power kernel on the matrix held in memory
(non-zeros/s and bytes/s of A) next to the memory bandwidth measured in the same process.

    python benchmarks/bench_sparse.py --store /data/sparse.zarr --shape 2000000 200000 \\
        --nnz 100000000

The store is generated (ooc_svd.synthetic.write_sparse_matrix: power-law column
frequencies, float32) when it does not exist.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
from harness import parse_or_answer_child, peak_rss_bytes, publish, run_contenders

CONTENDERS = [
    "baseline",  # python with the imports only: the RSS floor of every contender
    "read",  # ooc_svd's prefetching reader over the store, no compute
    "kernel",  # the fused power kernel on the in-memory matrix, and memory bandwidth
    "ooc_randomized",
    "ooc_krylov",
    "reference",  # svds (ARPACK, tol=0) on a float64 copy: the exact top-k
    "svds_arpack",
    "svds_propack",
    "sklearn_randomized_svd",
]


def load_in_memory(store: str):
    """The store as a scipy.sparse CSR matrix (what the in-memory contenders start from)."""
    import scipy.sparse
    import zarr

    group = zarr.open_group(store, mode="r")
    m, n = group.attrs["shape"]
    return scipy.sparse.csr_matrix(
        (group["data"][:], group["indices"][:], group["indptr"][:]), shape=(m, n)
    )


def run_contender(name: str, args: argparse.Namespace) -> dict:
    """Body of one child process: run ``name`` and return its measurements."""
    import ooc_svd

    k, p, q = args.k, args.oversample, args.niter
    result: dict = {}
    began = time.perf_counter()
    if name == "baseline":
        import scipy.sparse.linalg  # noqa: F401

        import ooc_svd.kernels.csr  # noqa: F401
    elif name == "read":
        from ooc_svd.sources import open_source, prefetch_blocks

        source = open_source(args.store)
        # The blocks of the ooc contenders' runs (their oversample; method as ooc_randomized)
        plan = ooc_svd.svd_plan(args.store, k, oversample=args.oversample,
                                method="randomized", memory_limit=args.memory_limit)
        for _ in prefetch_blocks(source, plan.blocks, depth=plan.prefetch_depth):
            pass
        result["passes"] = 1
    elif name == "kernel":
        result.update(kernel_throughput(args))
    elif name.startswith("ooc_"):
        out = ooc_svd.svd(args.store, k, oversample=p, niter=q, method=name.removeprefix("ooc_"),
                          memory_limit=args.memory_limit, progress=False)
        result.update(S=out.S.tolist(), passes=out.passes, method=out.plan.method,
                      seconds_per_pass=out.seconds_per_pass, blocks=len(out.plan.blocks))
    elif name == "reference":
        from scipy.sparse.linalg import svds

        S = svds(load_in_memory(args.store).astype(np.float64), k=k, tol=0, random_state=0,
                 return_singular_vectors=False)
        result["S"] = np.sort(S)[::-1].tolist()
    elif name.startswith("svds_"):
        from scipy.sparse.linalg import svds

        A = load_in_memory(args.store)
        loaded = time.perf_counter()
        S = svds(A, k=k, solver=name.removeprefix("svds_"), random_state=0,
                 return_singular_vectors=False)
        result.update(S=np.sort(S)[::-1].tolist(), seconds_after_load=time.perf_counter() - loaded)
    elif name == "sklearn_randomized_svd":
        from sklearn.utils.extmath import randomized_svd

        A = load_in_memory(args.store)
        loaded = time.perf_counter()
        _, S, _ = randomized_svd(A, k, n_oversamples=p, n_iter=q, random_state=0)
        result.update(S=S.tolist(), passes=2 * q + 2,
                      seconds_after_load=time.perf_counter() - loaded)
    result["seconds"] = time.perf_counter() - began
    result["peak_rss_bytes"] = peak_rss_bytes()
    if name == "kernel":  # after the peak RSS and the time: its 1 GiB copy is not the kernel's
        result["memory_bandwidth"] = memory_bandwidth()
    return result


def kernel_throughput(args: argparse.Namespace) -> dict:
    """The fused power kernel over the in-memory matrix in blocks of the plan's size."""
    import ooc_svd
    from ooc_svd.kernels.backend import CPUKernels
    from ooc_svd.kernels.cpu import BlockStats
    from ooc_svd.sources import open_source

    source = open_source(load_in_memory(args.store))
    plan = ooc_svd.svd_plan(args.store, args.k, oversample=args.oversample,
                            memory_limit=args.memory_limit, method="randomized")
    blocks = [source.read(start, stop) for start, stop in plan.blocks]
    n, l = source.shape[1], plan.basis_size
    X = np.asfortranarray(np.random.default_rng(0).standard_normal((n, l)))
    kernels = CPUKernels(n)
    best = np.inf
    for _ in range(2):  # the first also compiles, when the cache is cold
        began = time.perf_counter()
        sweep = kernels.power_sweep(X, BlockStats.zeros(n))
        for index, block in enumerate(blocks):
            sweep.add(block, plan.blocks[index][0], np.zeros(n))
        sweep.result()
        best = min(best, time.perf_counter() - began)
    return {
        "kernel_seconds": best,
        "nnz_per_s": source.nnz / best,
        "bytes_per_s": source.nbytes / best,
        "basis_size": l,
    }


def memory_bandwidth() -> float:
    """Bytes/s of a large copy (read + write) with numpy, the best of three."""
    source = np.ones(1 << 27)  # 1 GiB
    target = np.empty_like(source)
    best = np.inf
    for _ in range(3):
        began = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - began)
    return 2 * source.nbytes / best


def available(name: str) -> bool:
    import importlib.util

    if name == "sklearn_randomized_svd":
        return importlib.util.find_spec("sklearn") is not None
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--shape", type=int, nargs=2, default=(2_000_000, 200_000))
    parser.add_argument("--nnz", type=int, default=100_000_000)
    parser.add_argument("--column-exponent", type=float, default=1.0)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--oversample", type=int, default=10)
    parser.add_argument("--niter", type=int, default=4)
    parser.add_argument("--memory-limit", default="1GB")
    parser.add_argument("--only", nargs="*", default=None, choices=CONTENDERS,
                        help="contenders to run")
    args = parse_or_answer_child(parser, run_contender)
    if args is None:
        return
    if not os.path.exists(args.store):
        from ooc_svd.synthetic import write_sparse_matrix

        print(f"generating {args.store} ...", file=sys.stderr)
        began = time.perf_counter()
        write_sparse_matrix(args.store, tuple(args.shape), nnz=args.nnz,
                            column_exponent=args.column_exponent)
        print(f"generated in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    results = run_contenders(__file__, args.only or CONTENDERS, args, available)
    reference = results.get("reference", {}).get("S")
    for r in results.values():
        if reference is not None and "S" in r:
            S, exact = np.asarray(r["S"])[: args.k], np.asarray(reference)
            r["max_rel_error"] = float(np.max(np.abs(S - exact) / exact))
    publish(args, report(args, results), results)


def report(args, results: dict) -> str:
    from ooc_svd.sources import open_source

    source = open_source(args.store)
    m, n = source.shape
    read = results.get("read", {}).get("seconds")
    lines = [
        f"matrix {m} x {n}, {source.nnz} non-zeros ({source.dtype}), {source.nbytes / 1e9:.2f} "
        f"GB raw, {source.stored_bytes / 1e9:.2f} GB stored; k={args.k}, "
        f"oversample={args.oversample}, niter={args.niter}, memory_limit={args.memory_limit}; "
        f"{platform.node()} {os.cpu_count()} cores",
        "",
        "| contender | seconds | passes | s / pass / read | peak RSS (MB) | RSS / matrix | "
        "max rel err top-k |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        passes = r.get("passes")
        per_pass = "1.00" if name == "read" else "-"  # the unit of the column
        if "seconds_per_pass" in r and read:
            per_pass = " ".join(f"{s / read:.2f}" for s in r["seconds_per_pass"])
        err = f"{r['max_rel_error']:.1e}" if "max_rel_error" in r else "-"
        label = name + (f" ({r['method']})" if "method" in r else "")
        lines.append(
            f"| {label} | {r['seconds']:.1f} | {passes or '-'} | {per_pass} | "
            f"{r['peak_rss_bytes'] / 1e6:.0f} | {r['peak_rss_bytes'] / source.nbytes:.3f} | "
            f"{err} |"
        )
    kernel = results.get("kernel")
    if kernel:
        lines += [
            "",
            f"fused CSR power kernel (l={kernel['basis_size']}, in memory): "
            f"{kernel['nnz_per_s'] / 1e6:.1f} M non-zeros/s, {kernel['bytes_per_s'] / 1e9:.2f} "
            f"GB/s of A; memory bandwidth (copy) {kernel['memory_bandwidth'] / 1e9:.1f} GB/s "
            f"(ratio {kernel['bytes_per_s'] / kernel['memory_bandwidth']:.3f})",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
