"""Checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint is a dict of plain values and tensors, so ``torch.load(weights_only=True)``
reads it::

    {"format": "ssd-checkpoint", "version": 1, "epoch": int, "classes": [str],
     "model_config": dict, "train_config": dict, "model": state_dict,
     "optimizer": state_dict, "scheduler": state_dict, "scaler": state_dict | None,
     "best_score": float | None, "history": [epoch record dicts],
     "init": {"init": asked, "init_used": used, "init_note": str | None}}

``best_score`` is what ``best.pt`` minimises: the validation loss (the training loss without
a validation split).
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import torch

from .storage import Writer, atomic_write

FORMAT = "ssd-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("epoch", "classes", "model_config", "model")


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of this project (truncated, foreign, newer)."""


def checkpoint_writer(state: dict[str, Any]) -> Writer:
    """A writer of ``state`` (see the module docstring) as a checkpoint file, for ``RunFolder.replace``."""
    payload = {"format": FORMAT, "version": VERSION, **state}

    def write(file: IO[bytes]) -> None:
        torch.save(payload, file)

    return write


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (see the module docstring) to ``path`` atomically."""
    atomic_write(path, checkpoint_writer(state))


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
