"""Fixtures the model and service tests share: a tiny synthetic set and a tiny network overfitted to it
(trained once), and torchvision's published weight files (made on first use)."""

import pytest

from model.config import TrainConfig
from model.data import make_shapes_dataset
from model.training import fit
from tests.pretrained_files import PublishedFiles
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


@pytest.fixture(scope="session")
def published(tmp_path_factory) -> PublishedFiles:
    """torchvision's published weight files in their exact layout (random weights), made once per session."""
    return PublishedFiles(tmp_path_factory.mktemp("published"))
