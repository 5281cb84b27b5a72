"""Checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint is a dict of plain values and tensors, so ``torch.load(weights_only=True)``
reads it::

    {"format": "ssd-checkpoint", "version": 1, "epoch": int, "classes": [str],
     "model_config": dict, "train_config": dict, "model": state_dict,
     "optimizer": state_dict, "scheduler": state_dict, "scaler": state_dict | None,
     "best_score": float | None, "history": [epoch record dicts]}

``best_score`` is what ``best.pt`` minimises: the validation loss (the training loss without
a validation split).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "ssd-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("epoch", "classes", "model_config", "model")


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of this project (truncated, foreign, newer)."""


def atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, then rename it over ``path``.

    A crash at any point leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (see the module docstring) to ``path`` atomically."""
    payload = {"format": FORMAT, "version": VERSION, **state}
    atomic_write(path, lambda file: torch.save(payload, file))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: missing, truncated or corrupt file, or not one of ours.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zips, pickles with foreign classes, random bytes
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {error}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an SSD checkpoint of this project")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer version (format {state['version']} > {VERSION})")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    return state
