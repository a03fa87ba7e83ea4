"""Wide dense matrices: the SVD of A against ``ooc-svd convert --transpose`` and the SVD of A^T.

A wide A (m << n) holds n x l float64 arrays in every pass, which a memory limit may not
allow; its transpose holds m x l. This measures, each contender in its own subprocess, one
after another on the same store: a plain read of A (its chunks, decoded), the conversion
(``transpose_dense``), a plain read of A^T, and the randomized SVD of A and of A^T at the
same k, oversampling, power iterations and seed (A's at ``--memory-limit-a``, which must
hold its n x l arrays; A^T's and the conversion's at ``--memory-limit``). The singular
values of the two runs are compared.

    python benchmarks/bench_transpose.py --dir /data/wide --shape 500 1000000 \\
        --chunks 100 100000 --k 10

The store ``A.zarr`` (float32, zstd) is generated where missing: a rank-20 matrix with
singular values decaying by exp(-0.2 j), plus Gaussian noise of 0.01.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time

import numpy as np
from harness import parse_or_answer_child, peak_rss_bytes, publish, run_child

CONTENDERS = ["baseline", "read_A", "convert_transpose", "read_At", "svd_A", "svd_At"]
# Rows of A generated at a time
GENERATE_ROWS = 50


def generate(path: str, shape: tuple[int, int], chunks: tuple[int, int], seed: int) -> None:
    import zarr

    if os.path.exists(path):
        return
    m, n = shape
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((20, n)).astype(np.float32)
    weights = np.exp(-0.2 * np.arange(20))
    store = zarr.create_array(f"{path}.partial", shape=shape, chunks=chunks, dtype="float32")
    for start in range(0, m, GENERATE_ROWS):
        rows = min(GENERATE_ROWS, m - start)
        values = (rng.standard_normal((rows, 20)) * weights) @ basis
        values += 0.01 * rng.standard_normal((rows, n)).astype(np.float32)
        store[start:start + rows] = values
    os.rename(f"{path}.partial", path)


def read_all(path: str) -> None:
    """Every chunk of the store, decoded, a row of chunks at a time."""
    import zarr

    array = zarr.open_array(path, mode="r")
    for start in range(0, array.shape[0], array.chunks[0]):
        array[start:start + array.chunks[0]]


def run_contender(name: str, args: argparse.Namespace) -> dict:
    import ooc_svd  # every contender pays the same imports
    from ooc_svd.dense_transpose import transpose_dense

    A, At = (os.path.join(args.dir, name) for name in ("A.zarr", "At.zarr"))
    began = time.perf_counter()
    result: dict = {}
    if name in ("read_A", "read_At"):
        read_all(A if name == "read_A" else At)
    elif name == "convert_transpose":
        transpose_dense(A, At, memory_limit=args.memory_limit, overwrite=True, progress=False)
    elif name.startswith("svd_"):
        limit = args.memory_limit_a if name == "svd_A" else args.memory_limit
        svd = ooc_svd.svd(A if name == "svd_A" else At, args.k, method="randomized",
                          oversample=args.oversample, niter=args.niter, seed=0,
                          memory_limit=limit)
        result["S"] = svd.S.tolist()
    result["seconds"] = time.perf_counter() - began
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="where A.zarr is (or is written)")
    parser.add_argument("--shape", type=int, nargs=2, default=(500, 1_000_000))
    parser.add_argument("--chunks", type=int, nargs=2, default=(100, 100_000))
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--oversample", type=int, default=10)
    parser.add_argument("--niter", type=int, default=2)
    parser.add_argument("--memory-limit", default="1GB",
                        help="the conversion's and the SVD of A^T's")
    parser.add_argument("--memory-limit-a", default="4GB", help="the SVD of A's")
    parser.add_argument("--seed", type=int, default=0)
    args = parse_or_answer_child(parser, run_contender)
    if args is None:
        return
    os.makedirs(args.dir, exist_ok=True)
    began = time.perf_counter()
    generate(os.path.join(args.dir, "A.zarr"), tuple(args.shape), tuple(args.chunks), args.seed)
    print(f"A.zarr ready in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    arguments = ["--dir", args.dir, "--k", str(args.k), "--oversample", str(args.oversample),
                 "--niter", str(args.niter), "--memory-limit", args.memory_limit,
                 "--memory-limit-a", args.memory_limit_a]
    results = {name: outcome for name in CONTENDERS
               if (outcome := run_child(__file__, name, arguments)) is not None}
    shutil.rmtree(os.path.join(args.dir, "At.zarr"), ignore_errors=True)
    publish(args, report(args, results), results)


def report(args: argparse.Namespace, results: dict) -> str:
    m, n = args.shape
    raw = m * n * 4
    lines = [
        f"A {m} x {n} float32, chunks {tuple(args.chunks)}, {raw / 1e9:.2f} GB raw; k={args.k}, "
        f"oversample={args.oversample}, niter={args.niter}; memory_limit {args.memory_limit} "
        f"(A: {args.memory_limit_a}); {platform.node()} {os.cpu_count()} cores",
        "",
        "| contender | seconds | vs read_A | peak RSS (MB) |",
        "|---|---|---|---|",
    ]
    read = results.get("read_A", {}).get("seconds")
    for name, r in results.items():
        ratio = f"{r['seconds'] / read:.2f}" if read and name != "baseline" else "-"
        lines.append(f"| {name} | {r['seconds']:.1f} | {ratio} | "
                     f"{r['peak_rss_bytes'] / 1e6:.0f} |")
    direct, through = results.get("svd_A"), results.get("svd_At")
    if direct and through:
        difference = np.max(np.abs(np.subtract(direct["S"], through["S"])) / direct["S"][0])
        total = through["seconds"] + results.get("convert_transpose", {}).get("seconds", 0.0)
        lines += ["", f"convert + SVD of A^T: {total:.1f} s, {total / direct['seconds']:.2f} "
                      f"of the SVD of A; largest difference of S, relative to S[0]: "
                      f"{difference:.1e}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
