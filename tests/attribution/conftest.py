"""Fixtures for the attribution tests."""

from __future__ import annotations

import pytest
import torch
from tiny_models import padded_batch


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return padded_batch()
