"""What the benchmarks share: each contender runs in a child process of the benchmark's own
script (``--child NAME``), so that its peak RSS is its own."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def parse_or_answer_child(parser, run_contender):
    """The arguments, with the --child (a contender run by ``run_contenders``) and --json
    options every benchmark takes; a child run prints its results (JSON) and gives None."""
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_contender(args.child, args)))
        return None
    return args


def run_contenders(script: str, names, args, available) -> dict[str, dict]:
    """Run every contender of ``names`` that is ``available`` as ``script --child NAME`` with
    the run's store and parameters; its results are the last line of its stdout (JSON). A
    contender that fails is reported on stderr and left out."""
    results = {}
    for name in names:
        if not available(name):
            print(f"{name}: not installed, skipped", file=sys.stderr)
            continue
        outcome = run_child(script, name, ["--store", args.store, "--k", str(args.k),
                                           "--oversample", str(args.oversample),
                                           "--niter", str(args.niter),
                                           "--memory-limit", str(args.memory_limit)])
        if outcome is not None:
            results[name] = outcome
    return results


def run_child(script: str, name: str, arguments: list[str]) -> dict | None:
    """The results of ``script --child NAME ARGUMENTS`` (the last line of its stdout, JSON),
    or None, said on stderr, when it fails."""
    print(f"running {name} ...", file=sys.stderr)
    done = subprocess.run([sys.executable, script, "--child", name, *arguments],
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{name} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def publish(args, table: str, results: dict) -> None:
    """Print the report, and write the arguments and results to ``--json`` where given."""
    print(table)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"args": vars(args), "results": results}, file, indent=1)


def peak_rss_bytes() -> int:
    """This process's peak RSS since exec (VmHWM); getrusage's maxrss would include the
    parent's peak from before the fork."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0
