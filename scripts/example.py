"""Generate a small example store (if absent) and compute its top-10 SVD out of core.

    .venv/bin/python scripts/example.py [--rows 400000] [--cols 128] [--dir example_data]

The dense half of ``scripts/example.sh`` through the Python API. ``--dir`` is relative to
the repository (``example_data``, beside the shell walkthrough's stores); the result goes to
``api_result.zarr`` there.
"""

import argparse
import os
import time

import numpy as np

import ooc_svd
from ooc_svd.synthetic import write_dense_matrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--cols", type=int, default=128)
    parser.add_argument("--dir", default="example_data")
    args = parser.parse_args()

    args.dir = os.path.join(os.path.dirname(__file__), os.pardir, args.dir)
    os.makedirs(args.dir, exist_ok=True)
    store = os.path.join(args.dir, f"dense_{args.rows}x{args.cols}.zarr")
    if not os.path.exists(store):
        print(f"writing {store} ({args.rows} x {args.cols} float32, zstd) ...")
        write_dense_matrix(store, (args.rows, args.cols), decay=0.1, chunk_rows=20_000)
    import zarr

    attributes = zarr.open_array(store, mode="r").attrs["ooc_svd_synthetic"]
    designed = np.array(attributes["singular_values"])

    began = time.perf_counter()
    result = ooc_svd.svd(
        store, k=10, niter=2, method="randomized", memory_limit="200MB",
        out=os.path.join(args.dir, "api_result.zarr"), overwrite=True, progress=True,
    )
    seconds = time.perf_counter() - began
    print(result.plan.describe())
    print(f"{result.passes} passes in {seconds:.1f} s (per pass: "
          + ", ".join(f"{s:.2f}" for s in result.seconds_per_pass) + " s)")
    print("singular values:", np.array2string(result.S, precision=4))
    print("designed values:", np.array2string(designed[:10], precision=4),
          "(A = G diag(s) V^T with Gaussian G: equal to within ~sqrt(k / m))")
    print(f"relative Frobenius residual ||A - U S V^T|| / ||A|| = {result.residual:.4f}")
    m, k = result.U.shape
    print(f"U ({m} x {k}), S and V written to {os.path.normpath(args.dir)}/api_result.zarr")


if __name__ == "__main__":
    main()
