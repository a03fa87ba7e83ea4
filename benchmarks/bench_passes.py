"""Seconds of each pass of one ooc_svd run, to compare two checkouts on the same store.

    PYTHONPATH=<checkout> python benchmarks/bench_passes.py --store A.zarr \\
        [--method randomized] [--k 20] [--niter 2] [--memory-limit 1GB]

Run it alternately with the checkouts to compare (the machine's load drifts); the singular
values it prints must agree.
"""

from __future__ import annotations

import argparse
import platform
import time

import ooc_svd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--method", default="randomized")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--oversample", type=int, default=10)
    parser.add_argument("--niter", type=int, default=2)
    parser.add_argument("--memory-limit", default="1GB")
    args = parser.parse_args()
    began = time.perf_counter()
    result = ooc_svd.svd(args.store, args.k, method=args.method, niter=args.niter,
                         oversample=args.oversample, memory_limit=args.memory_limit, seed=0)
    seconds = " ".join(f"{s:.2f}" for s in result.seconds_per_pass)
    print(f"{ooc_svd.__file__} on {platform.node()}: {args.method}, total "
          f"{time.perf_counter() - began:.1f} s, passes {seconds} s, "
          f"S[0] {result.S[0]:.6g}, S[-1] {result.S[-1]:.6g}")


if __name__ == "__main__":
    main()
