"""Checkpoints: their format (``RunCheckpoint``), written atomically, read without unpickling arbitrary objects.

A checkpoint is a dict of plain values and tensors, so ``torch.load(weights_only=True)`` reads
it: ``{"format": "ssd-checkpoint", "version": 1}`` and ``RunCheckpoint``'s fields. ``fit`` builds
and reads its checkpoints through ``RunCheckpoint``; serving and starting from a run read the
same class.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import IO, Any

import torch

from .run_folder import Writer, atomic_write

FORMAT = "ssd-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("epoch", "classes", "model_config", "model")


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of this project (truncated, foreign, newer)."""


@dataclass
class RunCheckpoint:
    """What a checkpoint of ``fit`` holds. ``last.pt`` holds all of it; ``best.pt`` (``for_serving``) no
    optimiser, scheduler or scaler state.

    Attributes:
        epoch: epochs finished.
        classes: class names; class id i (1-based) is ``classes[i - 1]``.
        model_config: ``ModelConfig.to_dict()``: the network to rebuild.
        model: the network's state dict (float32 whatever the training precision).
        train_config: ``TrainConfig.to_dict()``: the recipe it ran with.
        optimizer, scheduler, scaler: their state dicts (scaler: None unless fp16 loss scaling ran).
        best_score: what ``best.pt`` minimises so far: the validation loss (the training loss without a
            validation split).
        history: the epoch records, epoch 1 first.
        init: ``Initialisation.to_dict()``: what the weights started from (None before it was recorded).
        paused_epoch: a pause's unfinished epoch, ``{"steps_done": int, "loss_sums": [total, loc, conf]}``.
    """

    epoch: int
    classes: list[str]
    model_config: dict[str, Any]
    model: dict[str, torch.Tensor]
    train_config: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    scaler: dict[str, Any] | None = None
    best_score: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    init: dict[str, Any] | None = None
    paused_epoch: dict[str, Any] | None = None

    def to_state(self) -> dict[str, Any]:
        """The dict a checkpoint file holds (tensors shared, not copied)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RunCheckpoint:
        """From a checkpoint's dict (``load_checkpoint``); keys older checkpoints lack take their defaults."""
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})

    def for_serving(self) -> RunCheckpoint:
        """``best.pt``: serving needs no optimiser state, so the file stays small."""
        return replace(self, optimizer={}, scheduler={}, scaler=None)

    def writer(self) -> Writer:
        return checkpoint_writer(self.to_state())


def checkpoint_writer(state: dict[str, Any]) -> Writer:
    """A writer of ``state`` (``RunCheckpoint.to_state``) as a checkpoint file, for ``RunFolder.replace``."""
    payload = {"format": FORMAT, "version": VERSION, **state}

    def write(file: IO[bytes]) -> None:
        torch.save(payload, file)

    return write


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (``RunCheckpoint``'s fields; at least ``REQUIRED_KEYS``) to ``path`` atomically."""
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


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> RunCheckpoint:
    """``load_checkpoint`` as a ``RunCheckpoint``."""
    return RunCheckpoint.from_state(load_checkpoint(path, map_location))
