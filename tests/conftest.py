"""Fixtures shared by the model and service tests."""

from __future__ import annotations

import pytest

from tests.pretrained_files import PublishedFiles


@pytest.fixture(scope="session")
def published(tmp_path_factory) -> PublishedFiles:
    """torchvision's published weight files in their exact layout (random weights), made once per session."""
    return PublishedFiles(tmp_path_factory.mktemp("published"))
