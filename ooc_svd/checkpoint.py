"""Checkpoints: the state after each complete pass, so a killed run resumes after it.

A checkpoint directory holds ``state.json`` (the run's fingerprint: input, shape, dtype, the
state of the input's files, ``sources.paths.files_state``, and every parameter that changes
the result) and one ``.npz`` per completed pass, each written under a temporary name and
renamed, so a kill mid-write leaves the previous state intact. Resuming with other
parameters or a changed input is refused, since the saved state would not belong to them;
so is resuming from a file that cannot be read.
A checkpoint is removed with its ``state.json`` last, so a kill during the removal leaves
a directory that is still known as a checkpoint (missing passes are computed again).
The checkpoint also lists the scratch directories its run made (``scratch``): a run killed
with its Q factors spilled leaves them behind, and the next run with this checkpoint, resumed
or not, removes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from typing import Any

import numpy as np

from .errors import NPZ_READ_ERRORS, CheckpointError, InputError
from .store import naming_write_failures, remove_scratch_directory

SCRATCH_LIST = "scratch.txt"
# The first bytes of a zip archive, which an .npz is
ZIP_MAGIC = b"PK\x03\x04"


class Checkpoint:
    """Saves and loads per-pass state; ``Checkpoint(None)`` does nothing."""

    def __init__(self, directory: str | None, fingerprint: dict[str, Any], resume: bool):
        self.directory = directory
        if directory is None:
            return
        self._remove_scratch()
        state_path = os.path.join(directory, "state.json")
        partial = state_path + ".partial"  # renamed when complete, as the passes' files are
        if resume and os.path.exists(state_path):
            saved = self._read_state(state_path)
            if saved != fingerprint:
                changed = sorted(key for key in fingerprint if saved.get(key) != fingerprint[key])
                raise CheckpointError(
                    f"cannot resume: the checkpoint in {directory!r} was made with different "
                    f"{'; '.join(_difference(key, saved, fingerprint) for key in changed)}; "
                    "run without resume to start over"
                )
            return
        if resume:
            warnings.warn(f"no checkpoint at {directory!r} to resume: the run starts from its "
                          "first pass", stacklevel=2)
        # Empty, or holding only the state a run killed before its first rename was writing
        unstarted = os.path.isdir(directory) and \
            set(os.listdir(directory)) <= {os.path.basename(partial)}
        if os.path.lexists(directory) and not os.path.exists(state_path) and not unstarted:
            raise InputError(f"the checkpoint path {directory!r} holds something else than a "
                             "checkpoint; it is not replaced: choose another path")
        remove_checkpoint(directory)
        os.makedirs(directory, exist_ok=True)
        with naming_write_failures(f"the checkpoint {directory}"), open(partial, "w") as file:
            json.dump(fingerprint, file)
        os.replace(partial, state_path)

    def _read_state(self, state_path: str) -> dict[str, Any]:
        try:
            with open(state_path) as file:
                saved = json.load(file)
        except (OSError, ValueError) as error:  # ValueError: truncated or not JSON
            raise self._unreadable(state_path, error) from None
        if not isinstance(saved, dict):
            raise self._unreadable(state_path, "not a fingerprint")
        return saved

    def _unreadable(self, path: str, error: Any) -> CheckpointError:
        return CheckpointError(f"cannot resume: the checkpoint file {path!r} is unreadable "
                          f"({error or type(error).__name__}); run without resume to start "
                          "over")

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, f"{name}.npz")

    def load(self, name: str) -> dict[str, np.ndarray] | None:
        if self.directory is None or not os.path.exists(self._path(name)):
            return None
        path = self._path(name)
        try:  # the file opened here, so that it is closed whatever np.load raises
            with open(path, "rb") as file:
                # Not a zip: np.load would take it for a pickle, refuse that, and advise
                # allow_pickle.
                is_zip = file.read(len(ZIP_MAGIC)) == ZIP_MAGIC
                file.seek(0)
                if is_zip:
                    with np.load(file, allow_pickle=False) as saved:
                        arrays = {key: saved[key] for key in saved.files}
        except NPZ_READ_ERRORS as error:
            raise self._unreadable(path, error) from None
        if not is_zip:
            raise self._unreadable(path, "not an .npz file")
        problem = _manifest_problem(arrays)
        if problem:
            raise self._unreadable(path, problem)
        return arrays

    def save(self, name: str, arrays: dict[str, Any]) -> None:
        """Save a step's state with a manifest of its arrays' shapes and dtypes, which
        ``load`` checks, with their finiteness, before a resumed run uses them."""
        if self.directory is None:
            return
        arrays = {key: np.asarray(value) for key, value in arrays.items()}
        manifest = {key: [list(value.shape), value.dtype.str] for key, value in arrays.items()}
        partial = self._path(name) + ".partial.npz"
        with naming_write_failures(f"the checkpoint {self.directory}"):
            np.savez(partial, **arrays, **{MANIFEST: np.array(json.dumps(manifest))})
        os.replace(partial, self._path(name))

    def scratch(self, path: str | None) -> None:
        """Note a scratch directory of this run (None: kept in memory, nothing to note)."""
        if self.directory is None or path is None:
            return
        with open(os.path.join(self.directory, SCRATCH_LIST), "a") as file:
            file.write(os.path.abspath(path) + "\n")

    def _remove_scratch(self) -> None:
        """Remove the scratch directories a killed run noted; only ooc_svd's own (by
        their names), whatever the list says."""
        try:
            with open(os.path.join(self.directory, SCRATCH_LIST)) as file:
                paths = file.read().split("\n")
        except OSError:
            return
        for path in filter(None, paths):
            remove_scratch_directory(path)

    def remove(self) -> None:
        if self.directory is not None:
            remove_checkpoint(self.directory)


# What the run's settings in a checkpoint's fingerprint are, where the key does not say
BY_NAME = {"basis_size": "basis size (k + oversample)", "niter": "niter (power iterations)"}


def _difference(key: str, saved: dict[str, Any], now: dict[str, Any]) -> str:
    """One entry of a fingerprint that changed, in words: the setting and both values, or
    the input files that changed (rewritten, moved or replaced)."""
    before, after = saved.get(key), now[key]
    if key == "input files" and isinstance(before, dict):
        changed = sorted(path for path in set(before) | set(after)
                         if before.get(path) != after.get(path))
        return f"input files ({', '.join(changed)} changed since)"
    if key in ("input", "mean") or isinstance(after, (dict, list)) and len(str(after)) > 80:
        return key  # long descriptions or digests: the name says enough
    return f"{BY_NAME.get(key, key)} ({before!r} then, {after!r} now)"


# The entry of a step's file that lists its arrays: {name: [shape, dtype]}.
MANIFEST = "__manifest__"


def _manifest_problem(arrays: dict[str, np.ndarray]) -> str:
    """What makes a loaded step's arrays unfit to resume from, or '': its manifest lacking
    or not matching them (another file put in its place, or one edited), or a value that
    is not finite (the runs save finite states only)."""
    try:
        manifest = json.loads(str(arrays.pop(MANIFEST)))
    except (KeyError, ValueError):
        return "no manifest of its arrays"
    found = {key: [list(value.shape), value.dtype.str] for key, value in arrays.items()}
    if found != manifest:
        return f"its arrays {found} are not those it lists, {manifest}"
    for key, value in arrays.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return f"{key} holds NaN or Inf"
    return ""


def remove_checkpoint(directory: str) -> None:
    """Remove a checkpoint directory, its ``state.json`` last: until the directory is
    empty it is known as a checkpoint, which the next run may replace or resume from.
    Nothing (or not a directory) at ``directory``: nothing to remove."""
    state_path = os.path.join(directory, "state.json")
    try:
        names = os.listdir(directory)
    except OSError:  # absent, or no directory
        names = []
    for name in names:
        path = os.path.join(directory, name)
        if path == state_path:
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)
    with contextlib.suppress(OSError):
        os.unlink(state_path)
    shutil.rmtree(directory, ignore_errors=True)  # what is left: the directory itself


def holds_a_pass(directory: str) -> bool:
    """Whether the checkpoint at ``directory`` (if any) holds the state of a complete pass."""
    try:
        names = os.listdir(directory)
    except OSError:
        return False
    return any(name.endswith(".npz") and not name.endswith(".partial.npz") for name in names)
