"""Conversion benchmark: ``ooc_svd.convert`` of Matrix Market and .npz files to the CSR
store, against a plain read of the file and scipy's in-memory readers.

Every contender runs in its own subprocess, one after another on the same files, so that
peak RSS is its own. The files hold one random sparse matrix (float64, uniform positions):
``sorted.mtx`` with its entries in row order (converted in one pass), ``shuffled.mtx`` with
them in random order (a first pass finds them out of order, a second puts them into buckets
of rows), and ``matrix.npz`` (scipy.sparse.save_npz, compressed). Each conversion is
checked against scipy's reading of the same file.

    python benchmarks/bench_convert.py --dir /data/convert --shape 1000000 100000 \\
        --nnz 20000000

The files are generated when they do not exist (with scipy.io.mmwrite and save_npz).
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

CONTENDERS = [
    "baseline",  # python with the imports only: the RSS floor of every contender
    "read_mtx",  # the sorted file's bytes read once, 16 MB at a time: the I/O floor
    "scipy_mmread_sorted",  # scipy.io.mmread(...).tocsr(), in memory (fast_matrix_market)
    "ooc_convert_sorted",
    "ooc_convert_shuffled",
    "scipy_load_npz",
    "ooc_convert_npz",
]
FILES = {"sorted": "sorted.mtx", "shuffled": "shuffled.mtx", "npz": "matrix.npz"}


def generate(directory: str, shape: tuple[int, int], nnz: int, seed: int) -> None:
    """The three files of one random matrix, written where missing."""
    import scipy.io
    import scipy.sparse

    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, file) for name, file in FILES.items()}
    if all(os.path.exists(path) for path in paths.values()):
        return
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, shape[0], nnz)
    cols = rng.integers(0, shape[1], nnz)
    values = rng.standard_normal(nnz)
    shuffled = scipy.sparse.coo_matrix((values, (rows, cols)), shape=shape)
    scipy.io.mmwrite(paths["shuffled"], shuffled)  # entries in the order drawn
    csr = shuffled.tocsr()  # repeated positions summed, as every reader does
    scipy.io.mmwrite(paths["sorted"], csr.tocoo())
    scipy.sparse.save_npz(paths["npz"], csr, compressed=True)


def run_contender(name: str, args: argparse.Namespace) -> dict:
    import scipy.io
    import scipy.sparse

    import ooc_svd  # every contender pays the same imports

    files = {key: os.path.join(args.dir, file) for key, file in FILES.items()}
    out = os.path.join(args.dir, "out.zarr")
    began = time.perf_counter()
    result: dict = {}
    if name == "read_mtx":
        with open(files["sorted"], "rb") as file:
            while file.read(16 << 20):
                pass
    elif name == "scipy_mmread_sorted":
        result["nnz"] = int(scipy.io.mmread(files["sorted"]).tocsr().nnz)
    elif name == "scipy_load_npz":
        result["nnz"] = int(scipy.sparse.load_npz(files["npz"]).nnz)
    elif name.startswith("ooc_convert_"):
        path = files[name.removeprefix("ooc_convert_")]
        group = ooc_svd.convert.convert(path, out, overwrite=True, memory_limit=args.memory_limit,
                                progress=False)
        result["nnz"] = int(group["indptr"][-1])
    result["seconds"] = time.perf_counter() - began
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def check_conversion(args: argparse.Namespace, name: str) -> bool:
    """Whether the store that ``name`` wrote holds the matrix scipy reads from its file."""
    import scipy.io
    import scipy.sparse
    import zarr

    path = os.path.join(args.dir, FILES[name.removeprefix("ooc_convert_")])
    expected = (scipy.sparse.load_npz(path) if path.endswith(".npz")
                else scipy.io.mmread(path).tocsr())
    expected.sort_indices()
    group = zarr.open_group(os.path.join(args.dir, "out.zarr"), mode="r")
    written = scipy.sparse.csr_matrix(
        (group["data"][:], group["indices"][:], group["indptr"][:]), shape=expected.shape)
    return bool(np.array_equal(written.indptr, expected.indptr)
                and np.array_equal(written.indices, expected.indices)
                and np.allclose(written.data, expected.data, rtol=1e-15, atol=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="where the files are (or are written)")
    parser.add_argument("--shape", type=int, nargs=2, default=(1_000_000, 100_000))
    parser.add_argument("--nnz", type=int, default=20_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-limit", default="1GB", help="ooc_svd.convert's")
    parser.add_argument("--only", nargs="*", default=None, choices=CONTENDERS)
    args = parse_or_answer_child(parser, run_contender)
    if args is None:
        return
    began = time.perf_counter()
    generate(args.dir, tuple(args.shape), args.nnz, args.seed)
    print(f"files ready in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    results = {}
    for name in args.only or CONTENDERS:
        outcome = run_child(__file__, name, ["--dir", args.dir,
                                             "--memory-limit", args.memory_limit])
        if outcome is None:
            continue
        results[name] = outcome
        if name.startswith("ooc_convert_"):
            results[name]["correct"] = check_conversion(args, name)
    shutil.rmtree(os.path.join(args.dir, "out.zarr"), ignore_errors=True)
    publish(args, report(args, results), results)


def report(args: argparse.Namespace, results: dict) -> str:
    sizes = {key: os.path.getsize(os.path.join(args.dir, file)) for key, file in FILES.items()}
    read = results.get("read_mtx", {}).get("seconds")
    nnz = next((r["nnz"] for r in results.values() if "nnz" in r), None)
    lines = [
        f"matrix {args.shape[0]} x {args.shape[1]}, {nnz} non-zeros; sorted.mtx "
        f"{sizes['sorted'] / 1e6:.0f} MB, shuffled.mtx {sizes['shuffled'] / 1e6:.0f} MB, "
        f"matrix.npz {sizes['npz'] / 1e6:.0f} MB; memory_limit={args.memory_limit}; "
        f"{platform.node()} {os.cpu_count()} cores",
        "",
        "| contender | seconds | M non-zeros / s | vs read_mtx | peak RSS (MB) | "
        "RSS / file | correct |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        file = "npz" if "npz" in name else "shuffled" if "shuffled" in name else "sorted"
        rate = f"{nnz / r['seconds'] / 1e6:.1f}" if nnz and name != "baseline" else "-"
        ratio = f"{r['seconds'] / read:.2f}" if read and name != "baseline" else "-"
        correct = {True: "yes", False: "NO"}.get(r.get("correct"), "-")
        lines.append(f"| {name} | {r['seconds']:.1f} | {rate} | {ratio} | "
                     f"{r['peak_rss_bytes'] / 1e6:.0f} | "
                     f"{r['peak_rss_bytes'] / sizes[file]:.2f} | {correct} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
