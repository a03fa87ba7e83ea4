"""Seconds of each pass of one ooc_svd run, to compare two checkouts on the same store.

    PYTHONPATH=<checkout> python benchmarks/bench_passes.py --store A.zarr \\
        [--method randomized] [--k 20] [--niter 2] [--memory-limit 1GB] [--count-reads]

Run it alternately with the checkouts to compare (the machine's load drifts); the singular
values it prints must agree. ``--count-reads`` also counts the storage chunks fetched from a
local store, per array of the store (a dense array, or a CSR group's indptr, indices and
data), as reads of each chunk per pass: 1 when every chunk is decoded once per pass.
"""

from __future__ import annotations

import argparse
import collections
import platform
import time

import ooc_svd

METADATA_KEYS = {"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"}


def array_of_chunk(key: str) -> str | None:
    """The array (its path in the store, '' for a root array) whose chunk ``key`` is, or
    None for metadata: zarr 3 keys are ARRAY/c/0/1 (c/0/1 at the root), zarr 2 keys
    ARRAY/0.1."""
    parts = key.split("/")
    if parts[-1] in METADATA_KEYS:
        return None
    return "/".join(parts[: parts.index("c")] if "c" in parts else parts[:-1])


def count_chunk_reads() -> collections.Counter:
    """Count the chunk reads of local zarr stores, by array."""
    import zarr.storage

    counts: collections.Counter = collections.Counter()
    get = zarr.storage.LocalStore.get

    async def counted_get(self, key, *args, **kwargs):
        array = array_of_chunk(key)
        if array is not None:
            counts[array] += 1
        return await get(self, key, *args, **kwargs)

    zarr.storage.LocalStore.get = counted_get
    return counts


def reads_per_chunk(store: str, counts: collections.Counter, passes: int) -> str:
    """'array: reads per chunk per pass' for each array of the store."""
    import zarr

    node = zarr.open(store, mode="r")
    arrays = {"": node} if isinstance(node, zarr.Array) else dict(node.arrays())
    shares = []
    for name, array in arrays.items():
        chunks = 1
        for size, chunk in zip(array.shape, array.chunks, strict=True):
            chunks *= -(-size // chunk)
        shares.append(f"{name or 'A'} {counts[name] / chunks / passes:.2f}")
    return ", ".join(shares)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--method", default="randomized")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--oversample", type=int, default=10)
    parser.add_argument("--niter", type=int, default=2)
    parser.add_argument("--memory-limit", default="1GB")
    parser.add_argument("--count-reads", action="store_true",
                        help="count the chunks read per pass (a local store only)")
    args = parser.parse_args()
    counts = count_chunk_reads() if args.count_reads else None
    began = time.perf_counter()
    result = ooc_svd.svd(args.store, args.k, method=args.method, niter=args.niter,
                         oversample=args.oversample, memory_limit=args.memory_limit, seed=0)
    run_counts = collections.Counter(counts) if counts is not None else None  # not ours
    seconds = " ".join(f"{s:.2f}" for s in result.seconds_per_pass)
    print(f"{ooc_svd.__file__} on {platform.node()}: {args.method}, total "
          f"{time.perf_counter() - began:.1f} s, passes {seconds} s, "
          f"S[0] {result.S[0]:.6g}, S[-1] {result.S[-1]:.6g}, {len(result.plan.blocks)} blocks")
    if run_counts is not None:
        print(f"chunk reads per chunk per pass: "
              f"{reads_per_chunk(args.store, run_counts, result.passes)}")


if __name__ == "__main__":
    main()
