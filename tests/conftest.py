"""Fixtures every test folder shares: a tiny synthetic set and a tiny network overfitted to it (trained
once), and torchvision's published weight files (made on first use). The fixtures that start real
processes are plugins in tests/support.

Tests that start processes (a redis-server, a worker, an API, the S3 stand-in, a browser), and every
test under tests/system, are marked ``process``; ``./run-tests --fast`` leaves them and the ``slow``
ones out.
"""

from pathlib import Path

import pytest

from model.config import TrainConfig
from model.data import make_shapes_dataset
from model.training import fit
from tests.support.pretrained_files import PublishedFiles
from tests.support.tiny import TINY

pytest_plugins = ["tests.support.processes", "tests.support.browser"]

SYSTEM_TESTS = Path(__file__).resolve().parent / "system"
# The fixtures that start a process (or the in-process S3 server), directly or through others.
PROCESS_FIXTURES = {"redis_server", "log_dir", "worker", "api", "s3", "browser"}
# The fixtures that take several seconds with no process: training the overfitted tiny network.
SLOW_FIXTURES = {"overfitted"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if SYSTEM_TESTS in Path(item.path).parents or PROCESS_FIXTURES & fixtures:
            item.add_marker(pytest.mark.process)
        if SLOW_FIXTURES & fixtures:
            item.add_marker(pytest.mark.slow)


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
