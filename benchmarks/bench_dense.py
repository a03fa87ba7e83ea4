"""Dense benchmark: ooc_svd against a plain read, dask's svd_compressed and in-memory peers.

Every contender runs in its own subprocess, one after another on the same store, so that
peak RSS is its own; times are reported as ratios to a plain read measured in the same run.
Accuracy is the max relative error of the top-k singular values against the eigenvalues of
A^T A accumulated in float64 (accurate to eps * (sigma_1 / sigma_j)^2, far below the
errors measured).

    python benchmarks/bench_dense.py --store /data/tall.zarr --shape 4000000 256
    python benchmarks/bench_dense.py --store /data/wide.zarr --shape 500000 4096 --chunk-rows 5000

The store is generated (ooc_svd.synthetic, float32, zstd) when it does not exist.
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
    "read_sequential",  # zarr, one block after another
    "read_prefetch",  # ooc_svd's prefetching reader, no compute
    "ooc_randomized",
    "ooc_auto",
    "ooc_exact",
    "dask_compute_true",
    "dask_default",
    "sklearn_in_memory",
    "torch_in_memory",
]


def run_contender(name: str, args: argparse.Namespace) -> dict:
    """Body of one child process: run ``name`` and return its measurements."""
    import zarr

    import ooc_svd
    from ooc_svd.sources import open_dense_source, prefetch_blocks

    k, p, q = args.k, args.oversample, args.niter
    began = time.perf_counter()
    result: dict = {}
    if name == "baseline":
        import dask.array  # noqa: F401

        import ooc_svd.kernels.cpu  # noqa: F401
    elif name == "read_sequential":
        array = zarr.open_array(args.store, mode="r")
        rows = array.chunks[0]
        for start in range(0, array.shape[0], rows):
            array[start : start + rows]
        result["passes"] = 1
    elif name == "read_prefetch":
        source = open_dense_source(args.store)
        rows = int(source.chunk_rows[1])
        blocks = [(s, min(s + rows, source.shape[0])) for s in range(0, source.shape[0], rows)]
        for _ in prefetch_blocks(source, blocks, depth=2):
            pass
        result["passes"] = 1
    elif name.startswith("ooc_"):
        import shutil
        import tempfile

        method = name.removeprefix("ooc_")
        # U (m x k) goes to a store beside the input, as a run on a too-large matrix would.
        scratch = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(args.store)))
        try:
            out = ooc_svd.svd(args.store, k, oversample=p, niter=q, method=method,
                              memory_limit=args.memory_limit, progress=False,
                              out=os.path.join(scratch, "result.zarr"), scratch_dir=scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        result.update(S=out.S.tolist(), passes=out.passes, method=out.plan.method,
                      seconds_per_pass=out.seconds_per_pass, residual=out.residual)
    elif name.startswith("dask_"):
        import dask
        import dask.array as da

        x = da.from_zarr(args.store)
        u, s, v = da.linalg.svd_compressed(x, k, n_power_iter=q, n_oversamples=p,
                                           compute=name == "dask_compute_true", seed=0)
        _, S, _ = dask.compute(u, s, v)
        result.update(S=np.asarray(S).tolist(), passes=2 * q + 2)
    elif name == "sklearn_in_memory":
        from sklearn.utils.extmath import randomized_svd

        A = zarr.open_array(args.store, mode="r")[:]
        loaded = time.perf_counter()
        _, S, _ = randomized_svd(A, k, n_oversamples=p, n_iter=q, random_state=0)
        result.update(S=S.tolist(), passes=2 * q + 2,
                      seconds_after_load=time.perf_counter() - loaded)
    elif name == "torch_in_memory":
        import torch

        A = torch.from_numpy(zarr.open_array(args.store, mode="r")[:])
        loaded = time.perf_counter()
        _, S, _ = torch.svd_lowrank(A, q=k + p, niter=q)
        result.update(S=S[:k].tolist(), passes=2 * q + 2,
                      seconds_after_load=time.perf_counter() - loaded)
    result["seconds"] = time.perf_counter() - began
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def reference_singular_values(store: str, k: int) -> np.ndarray:
    """Top-k singular values from the eigenvalues of A^T A, accumulated blockwise in float64."""
    import zarr

    array = zarr.open_array(store, mode="r")
    gram = np.zeros((array.shape[1], array.shape[1]))
    rows = array.chunks[0]
    for start in range(0, array.shape[0], rows):
        block = array[start : start + rows].astype(np.float64)
        gram += block.T @ block
    eigenvalues = np.linalg.eigvalsh(gram)[::-1][:k]
    return np.sqrt(np.maximum(eigenvalues, 0))


def available(name: str) -> bool:
    module = {"sklearn_in_memory": "sklearn", "torch_in_memory": "torch"}.get(name)
    if module is None:
        return True
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--shape", type=int, nargs=2, default=(4_000_000, 256))
    parser.add_argument("--chunk-rows", type=int, default=50_000)
    parser.add_argument("--decay", type=float, default=0.05)
    parser.add_argument("--rank", type=int, default=None, help="rank of a generated store")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--oversample", type=int, default=10)
    parser.add_argument("--niter", type=int, default=2)
    parser.add_argument("--memory-limit", default="250MB")
    parser.add_argument("--only", nargs="*", default=None, choices=CONTENDERS,
                        help="contenders to run")
    args = parse_or_answer_child(parser, run_contender)
    if args is None:
        return

    if not os.path.exists(args.store):
        from ooc_svd.synthetic import write_dense_matrix

        print(f"generating {args.store} {tuple(args.shape)} ...", file=sys.stderr)
        write_dense_matrix(args.store, tuple(args.shape), rank=args.rank, decay=args.decay,
                           chunk_rows=args.chunk_rows)
    import zarr

    array = zarr.open_array(args.store, mode="r")
    args.shape, args.dtype = list(array.shape), str(array.dtype)  # an existing store's
    matrix_bytes = array.nbytes
    stored = array.nbytes_stored()
    reference = reference_singular_values(args.store, args.k)

    results = run_contenders(__file__, args.only or CONTENDERS, args, available)
    for r in results.values():
        if "S" in r:
            S = np.asarray(r["S"])[: args.k]
            r["max_rel_error"] = float(np.max(np.abs(S - reference) / reference))

    publish(args, report(args, results, matrix_bytes, stored), results)


def report(args, results: dict, matrix_bytes: int, stored: int) -> str:
    read = results.get("read_prefetch", results.get("read_sequential", {})).get("seconds")
    dask_true = results.get("dask_compute_true", {}).get("seconds")
    m, n = args.shape
    lines = [
        f"matrix {m} x {n} {args.dtype}, {matrix_bytes / 1e9:.2f} GB raw, {stored / 1e9:.2f} GB "
        f"stored; k={args.k}, oversample={args.oversample}, niter={args.niter}, "
        f"memory_limit={args.memory_limit}; {platform.node()} {os.cpu_count()} cores",
        "",
        "| contender | seconds | passes | s / pass / read | vs dask compute=True | "
        "peak RSS (MB) | RSS / matrix | max rel err top-k |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        passes = r.get("passes")
        per_pass = (
            f"{r['seconds'] / passes / read:.2f}" if read and passes else "-"
        )
        if "seconds_per_pass" in r and read:
            per_pass = " ".join(f"{s / read:.2f}" for s in r["seconds_per_pass"])
        # Against dask for the contenders that factor A, not the reads and the baseline.
        speedup = f"{dask_true / r['seconds']:.2f}x" if dask_true and "S" in r else "-"
        err = f"{r['max_rel_error']:.1e}" if "max_rel_error" in r else "-"
        label = name + (f" ({r['method']})" if "method" in r else "")
        lines.append(
            f"| {label} | {r['seconds']:.1f} | {passes or '-'} | {per_pass} | {speedup} | "
            f"{r['peak_rss_bytes'] / 1e6:.0f} | {r['peak_rss_bytes'] / matrix_bytes:.3f} | {err} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
