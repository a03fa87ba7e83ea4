"""Checkpoints: the state after each complete pass, so a killed run resumes after it.

A checkpoint directory holds ``state.json`` (the run's fingerprint: input, shape, dtype and
every parameter that changes the result) and one ``.npz`` per completed pass, each written
under a temporary name and renamed, so a kill mid-write leaves the previous state intact.
Resuming with other parameters is refused, since the saved state would not belong to them.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np

from .errors import InputError


class Checkpoint:
    """Saves and loads per-pass state; ``Checkpoint(None)`` does nothing."""

    def __init__(self, directory: str | None, fingerprint: dict[str, Any], resume: bool):
        self.directory = directory
        if directory is None:
            return
        state_path = os.path.join(directory, "state.json")
        if resume and os.path.exists(state_path):
            with open(state_path) as file:
                saved = json.load(file)
            if saved != fingerprint:
                changed = sorted(key for key in fingerprint if saved.get(key) != fingerprint[key])
                raise InputError(
                    f"cannot resume: the checkpoint in {directory!r} was made with different "
                    f"{', '.join(changed)}; run without resume to start over"
                )
            return
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
        with open(state_path, "w") as file:
            json.dump(fingerprint, file)

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, f"{name}.npz")

    def load(self, name: str) -> dict[str, np.ndarray] | None:
        if self.directory is None or not os.path.exists(self._path(name)):
            return None
        with np.load(self._path(name), allow_pickle=False) as saved:
            return {key: saved[key] for key in saved.files}

    def save(self, name: str, arrays: dict[str, Any]) -> None:
        if self.directory is None:
            return
        partial = self._path(name) + ".partial.npz"
        np.savez(partial, **arrays)
        os.replace(partial, self._path(name))

    def remove(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
