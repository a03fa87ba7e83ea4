"""End to end: the cuda backend against the cpu backend on the same store, in one run.

    python benchmarks/bench_backends.py --store /data/tall.zarr --shape 2000000 256
    python benchmarks/bench_backends.py --sparse --store /data/sparse.zarr \\
        --shape 2000000 200000 --nnz 100000000 [--cuda-option csr_transposed=columns]

Generates the store when it is absent (dense: ooc_svd.synthetic.write_dense_matrix, float32
zstd; sparse: write_sparse_matrix, power-law columns). Reports a plain read of the store
(the prefetching reader, no compute), then ``ooc_svd.svd`` with backend='cpu' and
backend='cuda' at the same k, oversampling, power iterations, method and seed: seconds,
seconds per pass over the read's, and the largest relative difference of the singular
values between the backends. With ``--cuda-option KEY=VALUE`` (repeatable, as in
``ooc-svd run``) the cuda backend runs a second time with those ``cuda_options``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--shape", type=int, nargs=2, default=(2_000_000, 256))
    parser.add_argument("--sparse", action="store_true")
    parser.add_argument("--nnz", type=int, default=100_000_000)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--oversample", type=int, default=10)
    parser.add_argument("--niter", type=int, default=2)
    parser.add_argument("--method", default="randomized", choices=["randomized", "krylov"])
    parser.add_argument("--memory-limit", default="4GB")
    parser.add_argument("--cuda-option", action="append", default=[], metavar="KEY=VALUE",
                        help="also run the cuda backend with these cuda_options")
    return parser.parse_args()


def generate(args: argparse.Namespace) -> None:
    from ooc_svd import synthetic

    began = time.perf_counter()
    if args.sparse:
        synthetic.write_sparse_matrix(args.store, tuple(args.shape), nnz=args.nnz,
                                      threads=os.cpu_count() or 1)
    else:
        synthetic.write_dense_matrix(args.store, tuple(args.shape), decay=0.05)
    print(f"generated {args.store} in {time.perf_counter() - began:.1f} s")


def plain_read(args: argparse.Namespace) -> float:
    import ooc_svd
    from ooc_svd.sources import open_source, prefetch_blocks

    source = open_source(args.store)
    plan = ooc_svd.svd_plan(args.store, args.k, memory_limit=args.memory_limit,
                            method=args.method, backend="cpu")
    began = time.perf_counter()
    for _ in prefetch_blocks(source, plan.blocks, depth=plan.prefetch_depth):
        pass
    return time.perf_counter() - began


def warm_up(source, args: argparse.Namespace, runs: dict) -> None:
    """Compile every run's kernels for this input's types on its first rows, so that no
    timed pass includes compilation."""
    import ooc_svd

    rows = source.read(0, min(source.shape[0], 4000))
    small = rows if isinstance(rows, np.ndarray) else rows.to_scipy()
    for backend, cuda_options in runs.values():
        ooc_svd.svd(small, min(args.k, 5), oversample=2, niter=1, method=args.method,
                    backend=backend, cuda_options=cuda_options, progress=False)


def main() -> None:
    import ooc_svd
    from ooc_svd.cli import parse_cuda_options
    from ooc_svd.sources import open_source

    args = parse_args()
    from ooc_svd.kernels.cuda_backend import cuda_available

    usable, why_not = cuda_available()
    if not usable:  # before the store is generated and read
        raise SystemExit(f"bench_backends.py compares the cuda backend with the cpu one, "
                         f"and needs a usable NVIDIA GPU: {why_not}")
    runs = {"cpu": ("cpu", None), "cuda": ("cuda", None)}
    cuda_options = parse_cuda_options(tuple(args.cuda_option))
    if cuda_options:
        label = " ".join(f"{key}={value}" for key, value in cuda_options.items())
        runs[f"cuda {label}"] = ("cuda", cuda_options)
    if not os.path.exists(args.store):
        generate(args)
    source = open_source(args.store)
    read = plain_read(args)
    options = dict(oversample=args.oversample, niter=args.niter, method=args.method, seed=0,
                   memory_limit=args.memory_limit, progress=False)
    warm_up(source, args, runs)
    results = {}
    for name, (backend, run_options) in runs.items():
        began = time.perf_counter()
        result = ooc_svd.svd(args.store, args.k, backend=backend, cuda_options=run_options,
                             **options)
        results[name] = (time.perf_counter() - began, result)
    m, n = source.shape
    print(f"{m} x {n} {'sparse ' if args.sparse else ''}{source.dtype}, "
          f"{source.nbytes / 1e9:.2f} GB raw; k={args.k}, oversample={args.oversample}, "
          f"niter={args.niter}, method={args.method}, memory_limit={args.memory_limit}; "
          f"{platform.node()}, {os.cpu_count()} cores\n")
    print("| run | seconds | passes | s / pass / read | GB/s of A per pass |")
    print("|---|---|---|---|---|")
    print(f"| plain read | {read:.1f} | 1 | 1.00 | {source.nbytes / read / 1e9:.2f} |")
    for backend, (seconds, result) in results.items():
        per_pass = " ".join(f"{s / read:.2f}" for s in result.seconds_per_pass)
        rates = " ".join(f"{source.nbytes / s / 1e9:.1f}" for s in result.seconds_per_pass)
        print(f"| ooc_svd backend={backend} | {seconds:.1f} | {result.passes} | {per_pass} | "
              f"{rates} |")
    cpu_seconds, cpu = results["cpu"]
    print()
    for name, (seconds, result) in results.items():
        if name != "cpu":
            difference = float(np.max(np.abs(result.S - cpu.S) / cpu.S))
            print(f"cpu / {name} time: {cpu_seconds / seconds:.2f}; max relative difference "
                  f"of S from the cpu backend's: {difference:.1e}")


if __name__ == "__main__":
    main()
