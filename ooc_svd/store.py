"""Storage for a run: the scratch spill of the Q factors and the output zarr group.

Every output (a result, a CSR store, a generated matrix) is written under ``PATH.partial``,
marked as unfinished, and renamed to ``PATH`` when complete, so a failed run never leaves a half
output under the requested name and a killed one leaves only a partial that the next run
replaces. While it writes, a run holds a lock on ``PATH.lock`` (``OutputLock``), so that a
second run on the same path is refused instead of replacing the first one's partial.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import uuid
import warnings
from typing import Any

import numpy as np

from .errors import InputError, OOCSVDError, OutputExistsError

try:
    import fcntl
except ImportError:  # Windows: outputs are not locked
    fcntl = None

# The start of the name of every scratch directory ooc_svd makes: what a later run may
# remove of those that a killed one recorded.
SCRATCH_PREFIX = "ooc-svd-"


class QSpill:
    """Per-block TSQR factors written to scratch files and read back once by the U sweep:
    Q_i (b_i x l) and the merge factors T_i, S_i (l x l), so memory does not grow with m.

    Plain file I/O, not a memory map, so spilled pages are not counted in the process's RSS.
    With ``in_memory`` (the plan found room for all of it under the memory limit) the factors
    stay in memory instead, sparing a write and a read of m x l float64.
    """

    def __init__(self, scratch_dir: str | None = None, in_memory: bool = False):
        self.kept: dict[tuple[str, int], np.ndarray] | None = {} if in_memory else None
        self.directory = None if in_memory else tempfile.mkdtemp(
            prefix=SCRATCH_PREFIX + "spill-", dir=scratch_dir
        )

    def _path(self, name: str, index: int) -> str:
        return os.path.join(self.directory, f"{name}{index:08d}.npy")

    def write(self, name: str, index: int, array: np.ndarray) -> None:
        if self.kept is not None:
            self.kept[name, index] = array
            return
        with spilling(self.directory):
            np.save(self._path(name, index), array, allow_pickle=False)

    def write_block(self, index: int, Q_i: np.ndarray, merge: Any) -> None:
        """Block ``index`` of the final pass: Q_i and its merge factors (a
        ``tsqr.MergeFactors``; None for the first block, which has none)."""
        self.write("Q", index, Q_i)
        if merge is not None:
            self.write("T", index, merge.T)
            self.write("S", index, merge.S)

    def load(self, name: str, index: int) -> np.ndarray:
        if self.kept is not None:
            return self.kept.pop((name, index))
        return np.load(self._path(name, index), allow_pickle=False)

    def close(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
        self.kept = None

    def __enter__(self) -> QSpill:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def spilling(directory: str):
    """A context in which a failed write of spilled factors names the scratch directory."""
    return naming_write_failures(f"the final pass's factors into {directory} (scratch_dir, "
                                 "--scratch-dir)")


def write_failure(what: str, error: OSError) -> OSError:
    """A failed write that names no file, naming ``what`` was written (and where): a full
    disk's errors name none, zarr's ``[Errno 28] No space left on device`` and numpy's
    "N requested and M written" alike. The errno is kept; an error that names its file, or
    one of ooc_svd's own, is returned as it is."""
    if error.filename is not None or isinstance(error, OOCSVDError):
        return error
    failure = OSError(f"cannot write {what}: {error}")
    failure.errno = error.errno
    return failure


@contextlib.contextmanager
def naming_write_failures(what: str):
    """Raise the OSErrors of the writes inside as ``write_failure(what, error)``."""
    try:
        yield
    except OSError as error:
        failure = write_failure(what, error)
        if failure is error:
            raise
        raise failure from error


def _ooc_svd_csr(attributes: dict) -> bool:
    """A CSR store ooc_svd wrote: marked so, or (written before the mark) a CSR group with
    the provenance that convert or generate records."""
    if "ooc_svd_csr" in attributes:
        return True
    return attributes.get("encoding-type") == "csr_matrix" and (
        "ooc_svd_source" in attributes or "ooc_svd_synthetic" in attributes)


def _ooc_svd_converted(attributes: dict) -> bool:
    """What ``ooc-svd convert`` writes: a CSR store, or (``dense_transpose``) the dense
    transpose of a matrix, which records its input as CSR stores do."""
    return _ooc_svd_csr(attributes) or "ooc_svd_source" in attributes


# What an existing output may be for ``overwrite`` to replace it: what ooc_svd writes there.
REPLACEABLE = {
    "result": ("an ooc_svd result", lambda attributes: "ooc_svd" in attributes),
    "converted": ("a CSR store or a transposed matrix ooc_svd wrote", _ooc_svd_converted),
    "synthetic": ("a matrix ooc_svd generated",
                  lambda attributes: "ooc_svd_synthetic" in attributes),
}
# The attribute that marks an output still being written under PATH.partial.
UNFINISHED = "ooc_svd_unfinished"
# The name a finished output was renamed to: one found under ``NAME.partial`` that names
# NAME is a run's whose rename did not happen, and the next run replaces it; one named
# so by a user (an output at ``NAME.partial`` itself) is not.
STAGED_FOR = "ooc_svd_staged_for"


# The files ooc_svd reads (never zarr stores, which are directories), by their names' ends
FILE_KINDS = {".npy": "an .npy file", ".npz": "an .npz file",
              ".mtx": "a Matrix Market file", ".mtx.gz": "a Matrix Market file",
              ".h5ad": "an HDF5 file", ".h5": "an HDF5 file", ".hdf5": "an HDF5 file"}


def file_kind(path: str) -> str | None:
    """What kind of file ``path``'s name says it is (``FILE_KINDS``), or None."""
    name = path.lower()
    return next((kind for suffix, kind in FILE_KINDS.items() if name.endswith(suffix)), None)


def check_output_path(out: str | os.PathLike, overwrite: bool, replaces: str = "result",
                      inputs: tuple[str, ...] = ()) -> str:
    """Validate ``out`` before any long work and return it without a trailing separator.

    It must be a local path, apart from every path (or ``file://`` URL) in ``inputs``
    (neither one of them nor inside or around one: inputs are never modified), and absent
    unless ``overwrite``; even then, only an empty directory or what ooc_svd writes there
    (``REPLACEABLE[replaces]``) is replaced, never an unrelated file or directory. The same
    holds for ``PATH.partial``, where the output is written first: only what a killed run
    left is replaced there (``_check_partial``).
    """
    path = os.fspath(out)
    if not path:
        raise InputError("out must name a path, not ''")
    if "://" in path:
        raise InputError(f"out must be a local path (an atomic rename needs one), not {path!r}")
    path = os.path.normpath(path)  # 'result.zarr/' names result.zarr
    kind = file_kind(path)
    if kind is not None and not os.path.isdir(path):  # (a store written so before is kept)
        raise InputError(f"output {path!r} is named as {kind}, but it is written as a zarr "
                         "store (a directory): name it ending in .zarr, say")
    check_apart_from_inputs("output", path, inputs)
    check_apart_from_inputs("output", f"{path}.partial", inputs, where_written=True)
    if os.path.lexists(path):
        if not overwrite:
            raise OutputExistsError(
                f"output {path!r} exists; pass overwrite=True (--overwrite) to replace it"
            )
        if not _may_replace(path, replaces):
            raise OutputExistsError(
                f"output {path!r} exists and is not {REPLACEABLE[replaces][0]}: overwrite "
                "replaces only that or an empty directory; remove it yourself or choose "
                "another path"
            )
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"the directory of the output {path!r} does not exist")
    _check_partial(path, replaces)
    return path


def check_apart_from_inputs(what: str, path: str | os.PathLike, inputs: tuple[str, ...],
                            where_written: bool = False, around: bool = True) -> None:
    """Refuse a path a run writes (and removes) that is one of the ``inputs`` (paths or
    ``file://`` URLs), or inside one, or (``around``: a path removed whole) around one:
    inputs are never modified. With ``where_written``, ``path`` is where the output is
    written first (``PATH.partial``)."""
    for source in filter(None, map(local_path, inputs)):
        if path_within(path, source) or (around and path_within(source, path)):
            written = f" (where it is written first: {os.fspath(path)!r})" if where_written \
                else f" {os.fspath(path)!r}"
            raise InputError(f"{what}{written} overlaps the input {source!r}, which is never "
                             f"modified: choose another {what} path")


def check_scratch_dir(path: str | os.PathLike) -> None:
    """Refuse a scratch directory that is missing or not writable, before any long work
    (ooc_svd makes its own directory inside, never the scratch directory itself)."""
    if not os.path.isdir(path):
        raise InputError(f"scratch_dir {os.fspath(path)!r} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"scratch_dir {os.fspath(path)!r} is not writable")


def local_path(name: str) -> str | None:
    """The local path that a path or a ``file://`` URL names; None for another URL. The
    URL's path is taken as fsspec opens it: relative without a third slash, not unquoted."""
    if name.startswith("file://"):
        return name[len("file://"):]
    return None if "://" in name else name


def paths_overlap(path: str | os.PathLike, other: str | os.PathLike) -> bool:
    """Whether two local paths are the same, or one lies inside the other."""
    return path_within(path, other) or path_within(other, path)


def path_within(path: str | os.PathLike, other: str | os.PathLike) -> bool:
    """Whether the local path ``path`` is ``other`` or lies inside it."""
    a, b = os.path.realpath(path), os.path.realpath(other)
    return os.path.commonpath([a, b]) == b


def _may_replace(path: str, replaces: str) -> bool:
    return _replaceable(path, REPLACEABLE[replaces][1])


def _replaceable(path: str, is_replaceable) -> bool:
    """An empty directory, or a zarr array or group whose attributes say ooc_svd wrote it."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    if not os.listdir(path):
        return True
    import zarr

    try:
        attributes = zarr.open(path, mode="r").attrs.asdict()
    except Exception:  # noqa: BLE001 - anything that is not a readable zarr node
        return False
    return bool(is_replaceable(attributes))


def _check_partial(path: str, replaces: str) -> str:
    """``PATH.partial``, where the output is written, if it is absent or what a killed run
    left there (which the new output replaces): an unfinished output, or, with nothing at
    ``PATH``, a finished one of the kind (a run killed while it renamed its output)."""
    partial = f"{path}.partial"
    finished = REPLACEABLE[replaces][1]

    def left_by_a_run(attributes: dict) -> bool:
        renamed_to = attributes.get(STAGED_FOR)
        return UNFINISHED in attributes or (
            finished(attributes) and renamed_to == os.path.basename(os.path.abspath(path))
            and not os.path.lexists(path))

    if os.path.lexists(partial) and not _replaceable(partial, left_by_a_run):
        raise OutputExistsError(
            f"{partial!r} exists and is not an unfinished ooc_svd output: outputs are written "
            f"there before they are renamed to {path!r}; remove it yourself or choose another "
            "output path"
        )
    return partial


LOCK_MARK = "ooc_svd lock\n"  # what a lock file holds
# The lock files this process holds, by real path (see OutputLock), and the guard of the set.
_HELD_LOCKS: set[str] = set()
_HELD_LOCKS_GUARD = threading.Lock()


class OutputLock:
    """An exclusive lock on ``PATH.lock``, held while a run writes ``PATH`` (and what goes
    with it: ``PATH.partial``, ``PATH.checkpoint``); a second run asking for it is refused.

    ``flock`` on an open file: the kernel releases it when the process dies, however it dies,
    so a killed run never leaves a stale lock. The file holds LOCK_MARK, and one that holds
    anything else is not ooc_svd's: it is refused, never taken or removed. The file is
    removed on release, by its holder; a run that locked the file just before it was removed
    finds it unlinked and locks the new one instead. On NFS, Linux emulates ``flock`` with
    POSIX locks, which hold between nodes when the mount has lock support. Without
    ``fcntl`` (Windows) nothing is locked.

    A POSIX lock belongs to the process, not to the open file: a second lock of the same
    file from another thread would be granted, and closing any descriptor of the file
    drops the process's lock. So the lock file is only ever opened once per process: the
    paths this process holds are kept in a set, and a second lock of one of them is refused
    before it opens the file; the mark is read through the held descriptor.
    """

    def __init__(self, path: str, what: str = "output"):
        path = os.path.normpath(path)  # 'state/' locks 'state.lock', not 'state/.lock'
        self.path = f"{path}.lock"
        self.file = None
        self.key: str | None = None
        if fcntl is None:
            return
        busy = OutputExistsError(
            f"another run is writing the {what} {path!r} (it holds {self.path!r}); wait for "
            "it to end or choose another path")
        key = os.path.realpath(self.path)
        with _HELD_LOCKS_GUARD:
            if key in _HELD_LOCKS:  # by another thread of this process
                raise busy
            _HELD_LOCKS.add(key)
        try:
            self.file = _locked_file(self.path, what, busy)
        except BaseException:
            _forget_lock(key)
            raise
        self.key = key

    def release(self) -> None:
        file, key, self.file, self.key = self.file, self.key, None, None
        try:
            if file is not None and _same_file(file, self.path):  # not one that replaced it
                os.unlink(self.path)  # while still held: no run can lock the removed file
        finally:
            try:
                if file is not None:
                    file.close()
            finally:
                if key is not None:
                    _forget_lock(key)

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _locked_file(path: str, what: str, busy: OutputExistsError):
    """The lock file at ``path``, opened, locked and marked; ``busy`` if another process
    holds it. One that cannot be created (a directory not writable) is a file that cannot
    be written: an OSError of its errno, naming it."""
    while True:
        try:
            # Undecodable bytes are read as U+FFFD: not the mark, so refused below.
            file = open(path, "a+", errors="replace")  # noqa: SIM115 - until release()
        except OSError as error:
            raise OSError(error.errno, f"cannot create the lock file beside the {what} "
                                       f"({error.strerror})", path) from None
        try:
            if _lock_and_mark(file, path, busy):
                return file
        except BaseException:
            file.close()
            raise
        file.close()  # its holder removed it between our open and our lock: take the new one


def _lock_and_mark(file, path: str, busy: OutputExistsError) -> bool:
    """Lock the open lock file and write its mark if it is empty; False when the file was
    removed from ``path`` before the lock was taken."""
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise busy from None
    if not _same_file(file, path):
        return False
    file.seek(0)  # appends still go to the end
    content = file.read(len(LOCK_MARK) + 1)
    if content not in ("", LOCK_MARK):
        raise OutputExistsError(f"{path!r} exists and is not an ooc_svd lock file: remove it "
                                "or choose another path")
    if not content:
        file.write(LOCK_MARK)
        file.flush()
    return True


def _forget_lock(key: str) -> None:
    with _HELD_LOCKS_GUARD:
        _HELD_LOCKS.discard(key)


def _same_file(file, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(file.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


# The file in a partial output that names its writer's scratch directory.
SCRATCH_RECORD = ".ooc-svd-scratch"


def _remove_recorded_scratch(partial: str) -> None:
    """Remove the scratch directory that a killed writer of ``partial`` recorded there,
    if it is still one of ours."""
    try:
        with open(os.path.join(partial, SCRATCH_RECORD)) as file:
            directory = file.read().strip()
    except OSError:
        return
    remove_scratch_directory(directory)


def remove_scratch_directory(path: str) -> None:
    """Remove a scratch directory that a killed run recorded, if it is one that ooc_svd
    makes (by its name; not a link), whatever the record says."""
    if os.path.basename(path).startswith(SCRATCH_PREFIX) and os.path.isdir(path) and \
            not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)


class StagedOutput:
    """An output written under ``PATH.partial``, marked unfinished (``mark``: the attributes
    to create its zarr node with), and renamed to ``PATH`` by ``commit``, with ``PATH`` locked
    from start to end. ``path`` passed ``check_output_path``, with the same ``overwrite`` and
    ``replaces``. ``locked``: the caller holds the ``OutputLock`` of ``path`` beyond the
    output (a run, until its checkpoint is removed); otherwise the output takes it, and
    ``commit`` or ``abort`` releases it."""

    def __init__(self, path: str, overwrite: bool, replaces: str, locked: bool = False):
        self.path, self.overwrite, self.replaces = path, overwrite, replaces
        self.own_lock = None if locked else OutputLock(path)
        try:
            self.partial = _check_partial(path, replaces)  # again: another run may have left one
            if os.path.lexists(self.partial):  # what a killed run left
                _remove_recorded_scratch(self.partial)
                shutil.rmtree(self.partial)
        except BaseException:
            self._release()
            raise
        self.mark = {UNFINISHED: replaces}
        self.committed = False
        self.description = f"{path} (written first as {self.partial})"

    def writing(self):
        """A context in which a failed write names the output (``naming_write_failures``)."""
        return naming_write_failures(self.description)

    def record_scratch(self, directory: str) -> None:
        """Note in the partial output a scratch directory that the writer removes when it is
        done: should the writer be killed first, the next one to replace the partial removes
        it (``_remove_recorded_scratch``)."""
        with open(os.path.join(self.partial, SCRATCH_RECORD), "w") as file:
            file.write(os.path.abspath(directory))

    def forget_scratch(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.partial, SCRATCH_RECORD))

    def commit(self, node: Any, attributes: dict[str, Any]) -> None:
        """Give the complete output its final attributes, without the mark, and rename it
        into place (``move_into_place``); a refused rename keeps it at the partial."""
        try:
            kept = {key: value for key, value in node.attrs.asdict().items()
                    if key != UNFINISHED}
            with self.writing():
                node.attrs.put({**kept, **attributes,
                                STAGED_FOR: os.path.basename(os.path.abspath(self.path))})
            self.committed = True
            move_into_place(self.partial, self.path, self.overwrite, self.replaces)
        finally:
            self._release()

    def abort(self) -> None:
        """Remove an output that will not be complete (not one whose rename was refused)."""
        try:
            if not self.committed:
                # Writes that an interrupt cut short here go on in zarr's thread: removed
                # before they end, they would leave chunk files in a partial output with
                # no mark, which every later run refuses. (A second interrupt while it
                # waits still removes what is there.)
                try:
                    wait_for_zarr_writes()
                finally:
                    shutil.rmtree(self.partial, ignore_errors=True)
        finally:
            self._release()

    def _release(self) -> None:
        if self.own_lock is not None:
            self.own_lock.release()


# How long an aborted output waits for zarr's operations in flight to end: a chunk's write
# ends in well under a second, but the operations waited for include reads of the input,
# which a slow network store may hold up; beyond this, Ctrl-C would seem ignored.
ZARR_WRITES_WAIT_S = 15.0


def wait_for_zarr_writes(timeout: float = ZARR_WRITES_WAIT_S) -> None:
    """Wait for the operations that zarr's event loop runs (on its own thread) to end.

    zarr runs a store's reads and writes there for the calling thread, which waits: when
    the caller is interrupted (Ctrl-C, SIGTERM raised in the main thread), the operation
    goes on without it. Those running when this is called are waited for, not those that
    start later nor another caller's wait. The loop is zarr's internal one
    (``zarr.core.sync``); a zarr without it, or a loop not running, has nothing to wait for.
    """
    import asyncio
    import concurrent.futures

    try:
        from zarr.core import sync
    except ImportError:
        return
    loop = getattr(sync, "loop", [None])[0]
    if loop is None or not loop.is_running() or \
            threading.current_thread() is getattr(sync, "iothread", [None])[0]:
        return
    future = asyncio.run_coroutine_threadsafe(_operations_ended(timeout), loop)
    # (concurrent.futures' TimeoutError: the builtin one only from Python 3.11 on)
    with contextlib.suppress(concurrent.futures.TimeoutError):
        future.result(timeout + 1.0)


async def _operations_ended(timeout: float) -> None:
    """Wait for the tasks running on this loop, but for this one and other such waits."""
    import asyncio

    running = [task for task in asyncio.all_tasks()
               if getattr(task.get_coro(), "cr_code", None) is not _operations_ended.__code__]
    if running:
        await asyncio.wait(running, timeout=timeout)


def move_into_place(partial: str, final_path: str, overwrite: bool, replaces: str) -> None:
    """Rename a complete output to its final name. An existing one is moved aside first and
    removed last, so a crash loses neither: it leaves the old output (under the name, or
    beside it as ``NAME.old-*``) or the new one.

    The final name was checked before the output was written; what appeared there since is
    replaced only as that check allowed, and otherwise kept, with the output left at
    ``partial`` to be renamed by hand.
    """
    old = None
    if os.path.lexists(final_path):
        if not (overwrite and _may_replace(final_path, replaces)):
            raise OutputExistsError(
                f"{final_path!r} appeared while the output was written and was left as it "
                f"is; the complete output is {partial!r}: rename it yourself"
            )
        old = f"{final_path}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final_path, old)
    os.rename(partial, final_path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        if os.path.lexists(old):  # a file in it that could not be removed
            warnings.warn(f"the output replaced at {final_path!r} could not be removed "
                          f"entirely: what is left of it is {old!r}", stacklevel=2)


class ResultWriter:
    """Writes U block by block, then S, V, the mean and attributes, into a zarr group."""

    def __init__(self, out: str, overwrite: bool, locked: bool = False):
        import zarr

        self.output = StagedOutput(out, overwrite, "result", locked)
        with self.output.writing():
            self.group = zarr.open_group(self.output.partial, mode="w",
                                         attributes=self.output.mark)

    def create_rows_array(self, name: str, shape: tuple[int, int], dtype: np.dtype,
                          rows_per_chunk: int) -> Any:
        """An (m, k) array written block by block, chunked like the input's blocks."""
        rows = max(min(rows_per_chunk, shape[0]), 1)
        with self.output.writing():
            return self.group.create_array(name, shape=shape, chunks=(rows, max(shape[1], 1)),
                                           dtype=dtype)

    def write_scaled_rows(self, name: str, U: Any, S: np.ndarray) -> None:
        """name = U diag(S), written chunk by chunk (U may be larger than memory), in the
        dtype of both (float64 where S had to be: ``result._singular_values_in``)."""
        target = self.create_rows_array(name, U.shape, np.result_type(U.dtype, S.dtype),
                                        U.chunks[0])
        for start in range(0, U.shape[0], U.chunks[0]):
            rows = U[start : start + U.chunks[0]] * S
            with self.output.writing():
                target[start : start + U.chunks[0]] = rows

    def finish(self, arrays: dict[str, np.ndarray], attributes: dict[str, Any]) -> Any:
        """Write the small arrays and attributes, rename into place, return the opened group."""
        import zarr

        with self.output.writing():
            for name, values in arrays.items():
                self.group.create_array(name, data=np.asarray(values))
        self.output.commit(self.group, attributes)
        return zarr.open_group(self.output.path, mode="r")

    def abort(self) -> None:
        self.output.abort()


U_CHUNK_BYTES = 16 << 20


class LeftVectors:
    """U, in memory or as an array of the output group, allocated once its rank is known."""

    def __init__(self, writer: ResultWriter | None, m: int, dtype: np.dtype, rows_per_chunk: int):
        self.writer, self.m, self.dtype, self.rows_per_chunk = writer, m, dtype, rows_per_chunk
        self.array: Any = None

    def allocate(self, k: int):
        """Create U (m x k) and return the function that stores its rows."""
        shape = (self.m, k)
        if self.writer is None:
            self.array = np.empty(shape, dtype=self.dtype)
        else:
            # Chunks of the blocks' rows, but at most U_CHUNK_BYTES: a sparse block can hold
            # millions of rows, and a block's rows are written with whole chunks.
            rows = min(self.rows_per_chunk, max(1, U_CHUNK_BYTES // (self.dtype.itemsize * k)))
            self.array = self.writer.create_rows_array("U", shape, self.dtype, rows)
        return self.store

    def store(self, start: int, rows: np.ndarray) -> None:
        if self.writer is None:
            self.array[start : start + rows.shape[0]] = rows
            return
        with self.writer.output.writing():
            self.array[start : start + rows.shape[0]] = rows
