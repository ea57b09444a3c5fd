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


@pytest.fixture
def faiss_one_thread():  # noqa: ANN201
    """FAISS on one OpenMP thread for a test (tiny indexes: spinning threads on a shared 2-core machine costs more
    than it gives); modules take it with `pytestmark = pytest.mark.usefixtures("faiss_one_thread")`."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)
