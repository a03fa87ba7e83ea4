"""Distributed benchmark: ooc_svd's passes on a dask LocalCluster against the local run and
against dask's svd_compressed on the same cluster.

For each worker count (processes with one thread each) a fresh LocalCluster runs ooc_svd's
randomized method (q + 1 reads of A, each a map over groups of row blocks and a tree
reduction) and dask.array.linalg.svd_compressed(compute=True) at the same k, oversampling and
power iterations (2q + 2 reads). The local backend and a plain prefetching read of the store
run in this process; times are reported as ratios to that read. Accuracy is the max
relative error of the top-k singular values against the gram method (exact to float64
rounding of A^T A on these spectra).

    python benchmarks/bench_distributed.py --store /data/tall.zarr --shape 1000000 256

The store is generated (ooc_svd.synthetic, float32, zstd) when it does not exist.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="zarr array (generated if missing)")
    parser.add_argument("--shape", type=int, nargs=2, default=(1_000_000, 256), metavar=("M", "N"))
    parser.add_argument("--chunk-rows", type=int, default=25_000)
    parser.add_argument("--decay", type=float, default=0.05)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--oversample", type=int, default=10)
    parser.add_argument("--niter", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="worker processes (one thread each) of each LocalCluster")
    parser.add_argument("--memory-limit", default="1GB")
    parser.add_argument("--skip-dask", action="store_true", help="no svd_compressed runs")
    parser.add_argument("--skip-reference", action="store_true", help="no accuracy column")
    return parser.parse_args()


def plain_read_seconds(store: str) -> float:
    """One read of the store with ooc_svd's prefetching reader and no compute."""
    from ooc_svd.sources import open_dense_source, prefetch_blocks

    source = open_dense_source(store)
    rows = int(source.chunk_rows[1])
    blocks = [(s, min(s + rows, source.shape[0])) for s in range(0, source.shape[0], rows)]
    began = time.perf_counter()
    for _ in prefetch_blocks(source, blocks, depth=2):
        pass
    return time.perf_counter() - began


def warm_up() -> None:
    """Load the compiled kernels for float32 blocks, so compilation is not timed."""
    import ooc_svd

    A = np.random.default_rng(0).standard_normal((3000, 40)).astype(np.float32)
    ooc_svd.svd(A, 3, method="randomized", center=True, progress=False)


def run_ooc(args: argparse.Namespace, client=None) -> dict:
    import ooc_svd

    began = time.perf_counter()
    result = ooc_svd.svd(args.store, args.k, oversample=args.oversample, niter=args.niter,
                         method="randomized", memory_limit=args.memory_limit, progress=False,
                         client=client)
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "passes": result.passes, "S": np.asarray(result.S),
            "per_pass": [record.seconds for record in result.records],
            "blocks": len(result.plan.blocks)}


def run_dask(args: argparse.Namespace, client) -> dict:
    import dask
    import dask.array as da

    A = da.from_zarr(args.store)
    began = time.perf_counter()
    u, s, v = da.linalg.svd_compressed(A, args.k, n_power_iter=args.niter,
                                       n_oversamples=args.oversample, compute=True, seed=0)
    _, S, _ = dask.compute(u, s, v, scheduler=client)
    seconds = time.perf_counter() - began
    passes = 2 * args.niter + 2
    return {"seconds": seconds, "passes": passes, "S": np.asarray(S),
            "per_pass": [seconds / passes]}


def cluster_runs(args: argparse.Namespace, workers: int) -> dict[str, dict]:
    from distributed import Client, LocalCluster

    from ooc_svd.distributed import GROUPS_PER_THREAD, tree_depth

    runs = {}
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        client.run(warm_up)  # in every worker process
        run = run_ooc(args, client)
        groups = min(run["blocks"], GROUPS_PER_THREAD * workers)
        run["note"] = f"{groups} groups, tree depth {tree_depth(groups)}"
        runs[f"ooc_svd, {workers} worker(s)"] = run
        if not args.skip_dask:
            run = run_dask(args, client)
            run["note"] = "svd_compressed(compute=True)"
            runs[f"dask, {workers} worker(s)"] = run
    return runs


def main() -> None:
    args = parse_args()
    if not os.path.exists(args.store):
        from ooc_svd.synthetic import write_dense_matrix

        print(f"generating {args.store}: {args.shape[0]} x {args.shape[1]} float32")
        write_dense_matrix(args.store, tuple(args.shape), decay=args.decay,
                           chunk_rows=args.chunk_rows)
    warm_up()
    read = plain_read_seconds(args.store)
    runs = {"ooc_svd, local": run_ooc(args)}
    runs["ooc_svd, local"]["note"] = f"{runs['ooc_svd, local']['blocks']} blocks"
    for workers in args.workers:
        runs.update(cluster_runs(args, workers))
    reference = None
    if not args.skip_reference:
        import ooc_svd

        reference = np.asarray(ooc_svd.svd(args.store, args.k, method="gram",
                                           memory_limit=args.memory_limit, progress=False).S)

    import dask
    import distributed
    import zarr

    import ooc_svd

    array = zarr.open_array(args.store, mode="r")  # an existing store's, whatever --shape says
    (m, n), dtype = array.shape, array.dtype
    print(f"\n{m} x {n} {dtype} ({array.nbytes / 1e9:.2f} GB raw), k={args.k}, "
          f"oversample={args.oversample}, niter={args.niter}; {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}; ooc_svd {ooc_svd.__version__}, "
          f"dask {dask.__version__}, distributed {distributed.__version__}")
    print(f"plain read (prefetching reader, 2 threads): {read:.1f} s\n")
    local = runs["ooc_svd, local"]["seconds"]
    print("| contender | seconds | passes | s / pass / read | vs local | max rel err top-k "
          "| note |")
    print("|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        ratios = " ".join(f"{seconds / read:.2f}" for seconds in run["per_pass"])
        error = "-"
        if reference is not None:
            error = f"{np.max(np.abs(run['S'] - reference) / reference):.1e}"
        print(f"| {name} | {run['seconds']:.1f} | {run['passes']} | {ratios} | "
              f"{local / run['seconds']:.2f}x | {error} | {run['note']} |")


if __name__ == "__main__":
    main()
