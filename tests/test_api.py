"""The top-level API: lazy (importing the package loads nothing heavy) and its docstring examples run."""

from __future__ import annotations

import doctest
import subprocess
import sys

import cytoretrieve
from cytoretrieve import api
from cytoretrieve.store import filters


def test_importing_the_package_loads_nothing_heavy() -> None:
    code = "import sys, cytoretrieve; print(any(m in sys.modules for m in ('torch', 'lancedb', 'sklearn', 'timm')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_api_names_resolve_to_the_api_module() -> None:
    for name in api.__all__:
        assert getattr(cytoretrieve, name) is getattr(api, name)
    assert set(api.__all__) <= set(dir(cytoretrieve))


def test_api_examples_run() -> None:
    failed, attempted = doctest.testmod(api, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert attempted > 5 and failed == 0


def test_filter_examples_run() -> None:
    failed, attempted = doctest.testmod(filters)
    assert attempted >= 2 and failed == 0
