"""Fixtures the model tests share: a tiny synthetic set and a tiny network overfitted to it (trained once)."""

import pytest

from model.config import TrainConfig
from model.data import make_shapes_dataset
from model.engine import fit
from tests.tiny import TINY


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_images=8, seed=0)


@pytest.fixture(scope="session")
def overfitted(shapes, tmp_path_factory):
    """``fit``'s result and run folder after 40 epochs on ``shapes``, in the default precision."""
    config = TrainConfig(
        epochs=40, learning_rate=1e-3, val_fraction=0.0, augment=False, warmup_steps=5, lr_schedule="constant", **TINY
    )
    run_dir = tmp_path_factory.mktemp("overfit")
    return fit(config, shapes, run_dir), run_dir
