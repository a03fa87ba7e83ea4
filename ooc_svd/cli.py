"""The ``ooc-svd`` command: a thin layer over the library for cluster nodes.

Exit codes: 0 success; 2 bad usage or bad input (a one-line message, no traceback);
130 interrupted by Ctrl-C (SIGINT), 143 terminated by SIGTERM (a run's checkpoint kept in
both); 1 a result that ``check`` finds wrong, a failure of the system (an OSError: a full
disk, a file that cannot be written; one line), or an unexpected failure (with its
traceback).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import click

from . import __version__
from .errors import ClusterError, OOCSVDError
from .interrupts import Terminated, raise_if_lost, signals_as_interrupts
from .units import format_bytes


class InputFailure(click.ClickException):
    """A problem with the input or the arguments: exit code 2, one line on stderr."""

    exit_code = 2


class Interrupted(click.ClickException):
    """Ctrl-C (SIGINT) during a command: exit code 130, with how to continue; SIGTERM (a
    batch scheduler's time limit): 143."""

    def __init__(self, message: str, signal_number: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + signal_number


class SystemFailure(click.ClickException):
    """An OSError that is not one of the library's (a full disk, a file that cannot be
    written), or a cluster that could not finish the run: exit code 1, one line naming it."""

    exit_code = 1


def path_identity(path: str | None) -> tuple[int, int] | None:
    """(device, inode) of what is at ``path`` (not followed, if a link); None if nothing."""
    try:
        status = os.lstat(path) if path else None
    except OSError:
        return None
    return None if status is None else (status.st_dev, status.st_ino)


def renamed_into_place(out: str, before: tuple[int, int] | None) -> bool:
    """Whether a command interrupted at its very end had already renamed its complete output
    to ``out``: something is there that was not (``before``: ``path_identity`` when the
    command began). Nothing else writes ``out`` meanwhile: the command holds its lock."""
    now = path_identity(out)
    return now is not None and now != before


def interrupted_signal(interrupt: KeyboardInterrupt) -> tuple[str, int]:
    """What stopped a command: ('interrupted', SIGINT) or ('terminated', SIGTERM).

    The command ends there: zarr's calls that the interrupt cut short between making a
    coroutine and handing it to zarr's loop leave it unawaited, which Python would warn of
    as it exits; that noise is silenced."""
    warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
    if isinstance(interrupt, Terminated):
        return "terminated (SIGTERM)", signal.SIGTERM
    return "interrupted", signal.SIGINT


def user_errors(command):
    """Turn the library's own errors into exit code 2 with their one-line message, other
    OSErrors and a cluster's failures into exit code 1 with theirs, and Ctrl-C and SIGTERM
    into exit codes 130 and 143 (an output being written is removed; a run keeps its
    checkpoint). With --json such a failure is also printed as JSON on stdout (click's own
    usage errors, before the command runs, are not)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        out = kwargs.get("out")
        before = path_identity(out)
        try:
            with signals_as_interrupts():
                done = command(*args, **kwargs)
                raise_if_lost()  # one a finalizer dropped after the last block
                return done
        except ClusterError as error:  # the cluster's failure, not the input's: retry
            failure = SystemFailure(failure_message(error))
        except OOCSVDError as error:
            failure = InputFailure(failure_message(error))
        except click.ClickException as error:  # the commands' own failures
            failure = error
        except OSError as error:
            failure = SystemFailure(failure_message(error))
        except EOFError as error:
            # click would end the program with a bare "Aborted!": an unexpected failure,
            # with its traceback like any other
            raise RuntimeError(f"unexpected end of input: {error}") from error
        except KeyboardInterrupt as interrupt:
            what, number = interrupted_signal(interrupt)
            if out and renamed_into_place(out, before):
                failure = Interrupted(f"{what} after {out} was complete: it is written", number)
            else:
                written = f"; nothing was written as {out}" if out else ""
                failure = Interrupted(f"{what}{written}", number)
        if kwargs.get("as_json"):
            click.echo(json.dumps({"error": failure.format_message(),
                                   "exit_code": failure.exit_code}))
        raise failure from None

    return wrapper


def plan_options(command):
    """Options shared by ``run`` and ``info``: what decides the plan."""
    options = [
        click.option("--k", "k", type=int, default=None, help="Number of singular triplets."),
        click.option("--tol", type=float, default=None,
                     help="Instead of --k: the smallest rank with relative residual <= TOL."),
        click.option("--max-rank", type=int, default=None, help="Rank cap with --tol."),
        click.option("--niter", type=int, default=2, show_default=True,
                     help="Power iterations: one read of A each (randomized and krylov methods)."),
        click.option("--oversample", type=int, default=10, show_default=True,
                     help="Extra basis vectors: l = k + oversample."),
        click.option("--method",
                     type=click.Choice(["auto", "randomized", "krylov", "exact", "gram"]),
                     default="auto", show_default=True, help="Algorithm; auto uses a cost model."),
        click.option("--backend", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                     show_default=True, help="Where the kernels run."),
        click.option("--memory-limit", default="1GB", show_default=True,
                     help="Bound on the working set, e.g. 512MB, 4GB; with --scheduler, of "
                          "each task (a worker holds one per thread)."),
        click.option("--spectral-iters", type=int, default=0, show_default=True,
                     help="Estimate ||A - U S V^T||_2 (from below) with this many extra "
                          "reads of A."),
        click.option("--cuda-option", "cuda_options", multiple=True, metavar="KEY=VALUE",
                     help="A setting of the cuda backend, repeatable: accumulate=float32, "
                          "csr_transposed=columns, streams=N (see svd's cuda_options)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def parse_cuda_options(pairs: tuple[str, ...]) -> dict | None:
    """``--cuda-option KEY=VALUE`` pairs as svd's ``cuda_options`` (streams as an int); the
    library checks the keys and values."""
    options: dict = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals:
            raise InputFailure(f"--cuda-option takes KEY=VALUE, not {pair!r}")
        options[key] = value
    if "streams" in options:
        try:
            options["streams"] = int(options["streams"])
        except ValueError:
            raise InputFailure(f"--cuda-option streams takes an int, not "
                               f"{options['streams']!r}") from None
    return options or None


def check_backend(backend: str) -> None:
    """Refuse --backend cuda before any work when no usable GPU is present, with the reason."""
    if backend == "cuda":
        from .kernels.cuda_backend import require_cuda

        require_cuda()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ooc-svd")
@click.pass_context
def main(context: click.Context) -> None:
    """Truncated SVD and PCA of matrices too large for memory, in q + 1 reads."""
    shown_as, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    context.call_on_close(lambda: setattr(warnings, "formatwarning", shown_as))


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the command's other messages: its text, not the source line that
    raised it."""
    return f"Warning: {message}\n"


@main.command()
@click.argument("input_path", metavar="INPUT")
@plan_options
@click.option("--out", required=True, help="Output zarr group (U, S, V, mean, attributes).")
@click.option("--center", is_flag=True, help="Subtract the column mean (PCA).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random sketch; the same seed, the same result.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--resume", is_flag=True, help="Continue a killed run from its checkpoint.")
@click.option("--scratch-dir", default=None, help="Where Q factors are spilled.")
@click.option("--quiet", is_flag=True,
              help="No plan, summary or progress bars (the run's note, if any, still shows, "
                   "on stderr).")
@click.option("--progress", is_flag=True, help="Progress bars even when stderr is no terminal.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("--factors", is_flag=True,
              help="Also write the low-rank factors B = U diag(S) and A = V^T into OUT.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Run the passes on a dask cluster: tcp://HOST:PORT, or local:N for N local "
                   "worker processes. --scratch-dir must then be reachable by every worker.")
@user_errors
def run(input_path, k, tol, max_rank, niter, oversample, method, backend, memory_limit,
        spectral_iters, cuda_options, out, center, seed, overwrite, resume, scratch_dir, quiet,
        progress, as_json, factors, scheduler) -> None:
    """Compute the top-k SVD of INPUT (a zarr array or CSR group, .npy or .npz) into OUT.

    Give --k, or --tol for the smallest rank that reaches a relative Frobenius residual.
    """
    from .api import svd
    from .checkpoint import remove_checkpoint
    from .kernels.cuda_backend import check_cuda_options

    options = parse_cuda_options(cuda_options)
    check_cuda_options(options)  # a mistyped option before the search for a GPU
    if scheduler is None:  # on a cluster, the workers' GPUs count, not this machine's
        check_backend(backend)
    before = path_identity(out)
    try:
        with messages_on_stderr(shown=not quiet and not as_json):
            result = svd(
                input_path, k, tol=tol, max_rank=max_rank, oversample=oversample, niter=niter,
                center=center, method=method, seed=seed, memory_limit=memory_limit, out=out,
                overwrite=overwrite, progress=False if quiet else (True if progress else None),
                scratch_dir=scratch_dir, resume=resume, spectral_iters=spectral_iters,
                write_factors=factors, client=scheduler, backend=backend, cuda_options=options,
            )
        raise_if_lost()
    except KeyboardInterrupt as interrupt:
        what, number = interrupted_signal(interrupt)
        checkpoint = f"{os.path.normpath(out)}.checkpoint"
        if renamed_into_place(out, before):  # while its checkpoint was removed
            remove_checkpoint(checkpoint)
            raise Interrupted(f"{what} after {out} was complete: it is written", number) \
                from None
        raise Interrupted(interrupted_message(what, checkpoint), number) from None
    summary = {
        "out": out,
        "method": result.method,
        "backend": result.backend,
        "note": result.note,
        "passes": result.passes,
        "resumed_passes": sum(r.name.endswith("(resumed)") for r in result.records),
        "seconds_per_pass": result.seconds_per_pass,
        "bytes_read": result.bytes_read,
        "rank": result.rank,
        "numerical_rank": result.numerical_rank,
        "residual": result.residual,
        "spectral_error": result.spectral_error,
        "S": [float(s) for s in result.S],
        "plan": result.plan.describe(),
    }
    if as_json:
        click.echo(json.dumps(summary))
    elif quiet:
        if result.note:  # what the run has to say of its result: a warning
            click.echo(f"Note: {result.note}", err=True)
    else:
        click.echo(result.plan.describe())
        if result.note:
            click.echo(f"Note: {result.note}")
        spectral = "" if result.spectral_error is None else \
            f", spectral error estimate {result.spectral_error:.3e} (absolute)"
        click.echo(f"rank {result.rank}, {result.passes} passes on the {result.backend} backend "
                   f"({summary['resumed_passes']} resumed), residual {result.residual:.3e} "
                   f"(relative, Frobenius){spectral}; wrote {out}")


@contextmanager
def messages_on_stderr(shown: bool) -> Iterator[None]:
    """The library's INFO messages (the plan as the run starts, each pass as it ends) as
    lines on stderr, written through tqdm so that they leave its bars whole: a job's log
    then says what a run does while it runs, not only when it is done."""
    if not shown:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    logger = logging.getLogger("ooc_svd")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with logging_redirect_tqdm(loggers=[logger]):
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def failure_message(error: Exception) -> str:
    """A failed run's message, and where the run kept the passes it completed (an error
    before any pass, or the checkpoint's own, keeps none). An OSError not the library's
    is named by its type, as Python names it."""
    checkpoint = getattr(error, "kept_checkpoint", None)
    if not isinstance(error, OOCSVDError):
        error = f"{type(error).__name__}: {error}"
    if checkpoint is None:
        return str(error)
    return (f"{error}; the completed passes are kept in {checkpoint}: the same command with "
            "--resume continues from there")


def interrupted_message(what: str, checkpoint: str) -> str:
    """What an interrupted (or terminated) run kept, and how to go on from there."""
    from .checkpoint import holds_a_pass

    if not holds_a_pass(checkpoint):
        return f"{what} before a pass was complete; nothing was kept to resume from"
    return (f"{what}; the completed passes are kept in {checkpoint}: the same command "
            "with --resume continues from there")


@main.command()
@click.argument("input_path", metavar="INPUT")
@plan_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Plan a run on this dask cluster (not contacted): its workers keep no "
                   "block cache and choose their own kernels.")
@user_errors
def info(input_path, k, tol, max_rank, niter, oversample, method, backend, memory_limit,
         spectral_iters, cuda_options, as_json, scheduler) -> None:
    """Describe INPUT and the plan of a run on it here, without reading its data: the
    method, passes, blocks, memory and where the kernels would run (with --backend auto,
    the GPU when one is usable with the memory free), from the same options as ``run``."""
    from .api import limit_bytes, open_matrix, svd_plan
    from .kernels.cuda_backend import check_cuda_options
    from .sources.open import loaded_npz_summary

    planning = [name for name in PLANNING if given(name)]
    if k is None and tol is None and planning:
        names = ", ".join(planning)
        verb = "shapes" if len(planning) == 1 else "shape"
        raise InputFailure(f"{names} {verb} the plan of a run: give --k or --tol with "
                           f"{'it' if len(planning) == 1 else 'them'}, or leave "
                           f"{'it' if len(planning) == 1 else 'them'} out to describe the "
                           "input alone")
    options = parse_cuda_options(cuda_options)
    check_cuda_options(options)
    result = result_report(input_path) if k is None and tol is None else None
    if result is not None:
        click.echo(json.dumps(result) if as_json else describe_result(result))
        return
    if scheduler is None:
        check_backend(backend)
    planned = k is not None or tol is not None
    # An .npz that a run loads whole (sparse, or compressed) is described from its headers
    summary = None if planned else loaded_npz_summary(input_path)
    if summary is None:
        # Opened once: a file loaded whole here must fit the plan's memory limit
        source, _, _ = open_matrix(input_path,
                                   load_limit=limit_bytes(memory_limit) if planned else None)
        summary = {
            "format": source.kind,
            "shape": list(source.shape),
            "dtype": str(source.dtype),
            "chunks": source.chunks,
            "nnz": getattr(source, "nnz", None),
            "bytes_raw": source.nbytes,
            "bytes_stored": source.stored_bytes,
        }
    report = {"input": input_path, **summary}
    plan = None
    if planned:  # else the input alone
        plan = svd_plan(source, k, tol=tol, max_rank=max_rank, oversample=oversample,
                        niter=niter, method=method, memory_limit=memory_limit,
                        spectral_iters=spectral_iters, backend=backend, cuda_options=options,
                        client=scheduler)
        report.update(plan_report(plan))
    if as_json:
        click.echo(json.dumps(report))
        return
    stored = report["bytes_stored"]
    stored = "unknown" if stored is None else format_bytes(stored)
    if report["nnz"] is not None:
        layout = f"{report['nnz']} non-zeros"
    else:
        layout = "no storage chunks" if report["chunks"] is None else \
            f"chunks {report['chunks']}"
    (m, n), raw = report["shape"], format_bytes(report["bytes_raw"])
    click.echo(f"{input_path}: {report['format']}, {m} x {n} {report['dtype']}, {layout}, "
               f"{raw} raw, {stored} stored")
    click.echo(plan.describe() if plan else "Give --k or --tol for the plan of a run on it.")


# What info reports of a result store, from its attributes
RESULT_KEYS = ("input", "shape", "k", "tol", "rank", "numerical_rank", "method", "backend",
               "centered", "residual", "basis_residual", "frobenius_norm", "spectral_error",
               "passes", "note")


def result_report(path: str) -> dict | None:
    """What ``info`` says of an ooc_svd result store at ``path`` (the attributes its run
    wrote, and S), or None where ``path`` is no such store."""
    import zarr

    try:
        group = zarr.open_group(path, mode="r")
        attributes = group.attrs.get("ooc_svd")
        S = group["S"][:] if isinstance(attributes, dict) else None
    except Exception:  # noqa: BLE001 - anything else is an input, opened as one
        return None
    if S is None:
        return None
    return {"result": path, **{key: attributes.get(key) for key in RESULT_KEYS},
            "S": [float(s) for s in S]}


def describe_result(report: dict) -> str:
    m, n = report["shape"] or ("?", "?")
    centered = ", centered" if report["centered"] else ""
    residual = report["residual"]
    residual = f"{residual:.3e}" if isinstance(residual, (int, float)) else "not recorded"
    shown = ", ".join(f"{s:.6g}" for s in report["S"][:10])
    more = f", ... ({len(report['S'])} in all)" if len(report["S"]) > 10 else ""
    lines = [f"{report['result']}: an ooc_svd result, rank {report['rank']} of the "
             f"{m} x {n} matrix {report['input']}{centered}, by the {report['method']} "
             f"method on the {report['backend']} backend in {report['passes']} passes; "
             f"relative residual {residual}",
             f"S: {shown}{more}"]
    if report["note"]:
        lines.append(f"Note: {report['note']}")
    lines.append(f"ooc-svd check {report['result']} INPUT verifies it against its input.")
    return "\n".join(lines)


# info's options that only a plan uses.
PLANNING = ("max_rank", "niter", "oversample", "method", "backend", "memory_limit",
            "spectral_iters", "cuda_options", "scheduler")


def given(name: str) -> bool:
    """Whether the current command's option ``name`` was given on the command line."""
    source = click.get_current_context().get_parameter_source(name)
    return source not in (None, click.core.ParameterSource.DEFAULT)


def plan_report(plan) -> dict:
    """What ``info --json`` says of a plan."""
    return {
        "method": plan.method,
        "reason": plan.reason,
        "passes": plan.passes,
        "most_passes": plan.most_passes,  # gram's switch to the exact method counted
        "spectral_iters": plan.spectral_iters,
        "bytes_to_read": plan.bytes_to_read,
        "cached_blocks": plan.cached_blocks,
        "cached_bytes": plan.cached_bytes,
        # what of them is held beside predicted_peak_bytes, the working set's
        "cached_beside_bytes": plan.cached_beside_bytes,
        "backend": plan.backend,
        "backend_reason": plan.backend_reason,
        "block_rows": plan.block_rows,
        "blocks": len(plan.blocks),
        "prefetch_depth": plan.prefetch_depth,
        "predicted_peak_bytes": plan.predicted_peak_bytes,
        "memory_limit": plan.memory_limit,
    }


@main.command()
@click.argument("out")
@click.option("--shape", type=int, nargs=2, required=True, metavar="M N")
@click.option("--rank", type=int, default=None, help="Rank (default: min(M, N)). Dense only.")
@click.option("--decay", type=float, default=0.1, show_default=True,
              help="Singular values exp(-decay * j): exactly when M x rank float64 values "
                   "take at most 128 MB, else relatively within about sqrt(rank / M) (the "
                   "left factor is then Gaussian). Dense only.")
@click.option("--density", type=float, default=None,
              help="Write a sparse CSR store with this fraction of non-zeros instead.")
@click.option("--column-exponent", type=float, default=1.0, show_default=True,
              help="Sparse only: column j is drawn with weight (j + 1) ** -EXPONENT.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
              show_default=True)
@click.option("--chunk", "chunk_rows", type=int, default=50_000, show_default=True,
              help="Rows per chunk (sparse: rows generated per step).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the generated matrix.")
@click.option("--overwrite", is_flag=True)
@user_errors
def generate(out, shape, rank, decay, density, column_exponent, dtype, chunk_rows, seed,
             overwrite) -> None:
    """Write a synthetic matrix to OUT, block by block: dense with a known spectrum, or
    (with --density) a sparse count matrix in the CSR layout."""
    from .synthetic import write_dense_matrix, write_sparse_matrix

    if min(shape) < 1:
        raise InputFailure(f"--shape {shape[0]} {shape[1]}: both must be >= 1")
    if chunk_rows < 1:
        raise InputFailure(f"--chunk {chunk_rows} must be >= 1")
    if density is None:
        if given("column_exponent"):
            raise InputFailure("--column-exponent shapes sparse matrices; give --density too")
        write_dense_matrix(out, tuple(shape), rank=rank, decay=decay, dtype=dtype,
                           chunk_rows=chunk_rows, seed=seed, overwrite=overwrite)
        click.echo(f"wrote {out}: {shape[0]} x {shape[1]} {dtype}, chunks of "
                   f"{min(chunk_rows, shape[0])} rows")
        return
    if rank is not None or given("decay"):
        raise InputFailure("--rank and --decay shape dense matrices; not with --density")
    started = time.perf_counter()
    group = write_sparse_matrix(out, tuple(shape), density=density, dtype=dtype, seed=seed,
                                column_exponent=column_exponent, chunk_rows=chunk_rows,
                                overwrite=overwrite)
    click.echo(describe_csr_store(out, group, time.perf_counter() - started))


def describe_csr_store(out: str, group, seconds: float) -> str:
    """One line: the shape, dtype, non-zeros and stored bytes of a CSR store just written."""
    m, n = group.attrs["shape"]
    arrays = [group[name] for name in ("indptr", "indices", "data")]
    stored = sum(int(array.nbytes_stored()) for array in arrays)
    nnz = arrays[2].shape[0]
    return (f"wrote {out}: {m} x {n} {arrays[2].dtype} CSR, {nnz} non-zeros "
            f"({nnz / max(m * n, 1):.3g} dense), {format_bytes(stored)} stored, {seconds:.1f} s")


@main.command()
@click.argument("input_path", metavar="INPUT")
@click.argument("out")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=None,
              help="Stored values [default: float64 for float64 input, else float32; a "
                   "dense input's own].")
@click.option("--chunk-nnz", type=int, default=None,
              help="Non-zeros per storage chunk of indices and data [default: 1048576].")
@click.option("--memory-limit", default="1GB", show_default=True,
              help="Bound on the working set, e.g. 512MB, 4GB.")
@click.option("--group", default=None,
              help="HDF5 input: the sparse group to read [default: X].")
@click.option("--scratch-dir", default=None,
              help="Where entries out of row order are bucketed [default: system temp].")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
@click.option("--quiet", is_flag=True,
              help="No summary and no progress bars (warnings still show).")
@click.option("--progress", is_flag=True, help="Progress bars even when stderr is no terminal.")
@click.option("--transpose", is_flag=True,
              help="Write A^T instead: for a wide A, whose n x l arrays may not fit, run on "
                   "A^T, whose U and V are A's V and U (A's PCA is not --center on A^T: see "
                   "README).")
@user_errors
def convert(input_path, out, dtype, chunk_nnz, memory_limit, group, scratch_dir, overwrite,
            quiet, progress, transpose) -> None:
    """Convert a sparse matrix to the CSR layout on zarr at OUT, with bounded memory.

    INPUT is a scipy.sparse .npz, a Matrix Market coordinate file (.mtx, .mtx.gz), an HDF5
    file (.h5ad, .h5, .hdf5) holding an AnnData-style CSR or CSC group, or such a group on
    zarr (to rechunk a CSR store with --chunk-nnz, or turn CSC into CSR). With --transpose,
    A^T is written; a dense INPUT (a zarr array, an .npy, a dense .npz) only so, as a dense
    zarr array (its values' dtype kept unless --dtype is given).
    """
    from .convert import convert as convert_matrix

    given = {"chunk_nnz": chunk_nnz, "group": group, "scratch_dir": scratch_dir,
             "transpose": transpose or None}
    options = {name: value for name, value in given.items() if value is not None}
    started = time.perf_counter()
    written = convert_matrix(input_path, out, dtype=dtype, memory_limit=memory_limit,
                             overwrite=overwrite,
                             progress=False if quiet else (True if progress else None), **options)
    if not quiet and not hasattr(written, "array_keys"):  # a dense transpose
        from .dense_transpose import describe

        click.echo(f"{describe(out, written, time.perf_counter() - started)} (A^T of "
                   f"{input_path}, {written.attrs['ooc_svd_source']['format']})")
    elif not quiet:
        source = written.attrs.get("ooc_svd_source", {})
        buckets = source.get("buckets")
        how = "one pass" if source.get("row_sorted") else \
            f"{buckets} bucket{'' if buckets == 1 else 's'} of rows"
        transposed = ", transposed" if source.get("transposed") else ""
        click.echo(f"{describe_csr_store(out, written, time.perf_counter() - started)} "
                   f"({source.get('format')}{transposed}, {how})")


@main.command()
@click.argument("result_path", metavar="RESULT")
@click.argument("input_path", metavar="[INPUT]", required=False)
@click.option("--samples", type=click.IntRange(min=1), default=8, show_default=True,
              help="Row blocks of INPUT sampled for the residual estimate (more where a "
                   "randomized or Krylov result's residual needs them to tell another input; "
                   "rows_conclusive says whether they could).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@user_errors
def check(result_path, input_path, samples, as_json) -> None:
    """Verify a result store: orthonormal U and V, and (with INPUT) a sampled residual.

    Exits 1 when U or V is not orthonormal to the precision of its dtype, when the store
    is not a finished run's or its attributes do not describe its arrays, when S is not
    descending or does not hold the energy the run measured, when the rows sampled give
    a_i V - U_i S beyond what the method allows or (exact and gram) a relative residual
    above 1.1, and when the samples cover all of INPUT and its exact residual is not the
    stored one or U^T A_c V is not diag(S). A warning on stderr says when the rows sampled
    could not tell another input (rows_conclusive: False).
    """
    from .verify import verify_result

    report = verify_result(result_path, input_path, samples)
    if as_json:
        click.echo(json.dumps(report))
    else:
        for key, value in report.items():
            click.echo(f"{key}: {value}")
    if report.get("rows_conclusive") is False:
        click.echo(f"warning: the rows sampled could not tell another input from {input_path} "
                   f"(rows_conclusive: False); --samples {report['input_chunks']} checks every "
                   "chunk", err=True)
    if not report["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
