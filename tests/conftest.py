"""Shared fixtures: paths to the real datasets beside the checkout (../shared/data), small synthetic image sets."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
HERLEV = SHARED_DATA / "herlev_derived_jpg"
CRIC = SHARED_DATA / "cric_crops_100px"


@pytest.fixture(scope="session")
def herlev_root() -> Path:
    if not HERLEV.is_dir():
        pytest.skip(f"Herlev copy not found at {HERLEV}")
    return HERLEV


@pytest.fixture(scope="session")
def cric_root() -> Path:
    if not CRIC.is_dir():
        pytest.skip(f"CRIC crops not found at {CRIC}")
    return CRIC
