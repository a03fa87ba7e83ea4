"""Peak RSS of `ooc-svd run` against the memory limit, as the number of rows grows.

    python benchmarks/bench_memory.py [--rows 250000 1000000 3000000] [--cols 300]
        [--chunk-rows 20000] [--memory-limit 200MB] [--methods randomized gram]
        [--env MALLOC_ARENA_MAX=1 ...] [--repeats 1] [--dir /tmp/ooc-svd-memory]

For each number of rows, a float32 store is generated (``ooc-svd generate``) and each
method runs on it as a child process, once with the environment as it is and once with
each ``--env`` setting, alternating, ``--repeats`` times: its seconds and its peak RSS
(the child's ru_maxrss), next to the plan's predicted peak. The store is removed after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[250_000, 1_000_000, 3_000_000])
    parser.add_argument("--cols", type=int, default=300)
    parser.add_argument("--chunk-rows", type=int, default=20_000)
    parser.add_argument("--memory-limit", default="200MB")
    parser.add_argument("--methods", nargs="+", default=["randomized", "gram"])
    parser.add_argument("--env", nargs="*", default=[],
                        help="NAME=VALUE settings to compare with the environment as it is")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dir", default="/tmp/ooc-svd-memory")
    return parser.parse_args()


def command(name: str) -> str:
    """The ooc-svd script next to this interpreter."""
    return os.path.join(os.path.dirname(sys.executable), name)


def measured(arguments: list[str], extra_env: dict[str, str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of a child process, its own (wait4's rusage)."""
    began = time.perf_counter()
    child = subprocess.Popen(arguments, env={**os.environ, **extra_env},
                             stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{arguments} failed with exit code {child.returncode}")
    return time.perf_counter() - began, usage.ru_maxrss * 1024 / 1e6  # KiB to MB


def predicted_peak(store: str, method: str, limit: str) -> str:
    """The plan's predicted peak in MB (working set and cache, not the interpreter)."""
    done = subprocess.run([command("ooc-svd"), "info", store, "--k", "10", "--method", method,
                           "--memory-limit", limit, "--json"], check=True,
                          capture_output=True, text=True)
    return f"{json.loads(done.stdout)['predicted_peak_bytes'] / 1e6:.0f}"


def main() -> None:
    args = parse_args()
    settings = [("as is", {})] + [(setting, dict([setting.split("=", 1)])) for setting in args.env]
    os.makedirs(args.dir, exist_ok=True)
    print("| rows | method | environment | seconds | peak RSS (MB) | predicted peak (MB) |")
    print("|---|---|---|---|---|---|")
    for rows in args.rows:
        store = os.path.join(args.dir, f"A{rows}.zarr")
        subprocess.run([command("ooc-svd"), "generate", store, "--shape", str(rows),
                        str(args.cols), "--chunk", str(args.chunk_rows)], check=True,
                       stdout=subprocess.DEVNULL)
        for method in args.methods:
            predicted = predicted_peak(store, method, args.memory_limit)
            for _ in range(args.repeats):
                for label, extra_env in settings:
                    out = os.path.join(args.dir, "result.zarr")
                    seconds, rss = measured(
                        [command("ooc-svd"), "run", store, "--k", "10", "--method", method,
                         "--memory-limit", args.memory_limit, "--out", out, "--quiet",
                         "--overwrite"], extra_env)
                    shutil.rmtree(out, ignore_errors=True)
                    print(f"| {rows} | {method} | {label} | {seconds:.1f} | {rss:.0f} | "
                          f"{predicted} |", flush=True)
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
