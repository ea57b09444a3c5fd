"""Tile rules: which grid tiles of a slide are kept. A small registry, name -> `Rule`.

- `cells` (the default, for cytology): find cell foreground, artefacts and the deposit region (`smear.py`) and
  keep a tile that touches the region and holds at least `min_foreground_um2` of cell foreground (about one
  small cell: 100 um^2), however much glass is around it. `min_foreground_um2` 0 keeps every tile of the region.
- `coverage` (for tissue sections): the deposit mask of `deposit.py`; keep a tile when at least `min_coverage`
  of its area is deposit.

Each rule reads what it needs from the open slide and returns a `Decision`: the picture it worked on, the region
it outlines, the artefacts it excluded, the grid with what it found per tile, and a summary for the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.sources.slides.deposit import (
    DepositParams,
    area_fraction,
    deposit_mask,
)
from cytoretrieve.sources.slides.grid import Grid, GridSpec
from cytoretrieve.sources.slides.reader import Slide
from cytoretrieve.sources.slides.smear import SmearParams, smear_mask

Progress = Callable[[int, int], None] | None
Params = DepositParams | SmearParams


@dataclass
class Decision:
    """What a rule decided for one slide. `thumbnail` px * `downsample` = level-0 px; `region` (what the preview
    outlines) has its own `region_downsample`; `artefacts` codes (0 none, 1 + index in `smear.ARTEFACTS`) are at
    the thumbnail's resolution, None for rules that look for none."""

    rule: str
    thumbnail: np.ndarray
    downsample: float
    region: np.ndarray
    region_downsample: float
    grid: Grid
    region_mm2: float
    foreground_mm2: float | None = None
    artefacts: np.ndarray | None = None
    artefact_mm2: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)


def apply_coverage(slide: Slide, grid: Grid, spec: GridSpec, params: DepositParams, on_progress: Progress) -> Decision:
    """Tissue: keep a tile when at least `min_coverage` of it is deposit."""
    mask = deposit_mask(slide, params, on_progress)
    grid.coverage = mask.coverage(grid.xs, grid.ys, grid.choice.extent)
    grid.in_region = grid.coverage > 0
    grid.kept = grid.coverage >= spec.min_coverage - 1e-9
    return Decision("coverage", mask.thumbnail, mask.downsample, mask.mask, mask.downsample, grid, mask.area_mm2,
                    thresholds={"min_coverage": spec.min_coverage, "method": params.method,
                                "channel_threshold": mask.threshold, "mask_mpp": round(mask.mpp, 4)})


def apply_cells(slide: Slide, grid: Grid, spec: GridSpec, params: SmearParams, on_progress: Progress) -> Decision:
    """Cytology: keep a tile that touches the deposit region and holds `min_foreground_um2` of cell foreground."""
    m = smear_mask(slide, params, on_progress)
    extent = grid.choice.extent
    grid.coverage = area_fraction(m.foreground, m.downsample, grid.xs, grid.ys, extent)
    grid.foreground_um2 = grid.coverage * (extent * slide.info.mpp) ** 2
    grid.in_region = area_fraction(m.region, m.region_downsample, grid.xs, grid.ys, extent) > 0
    grid.kept = grid.in_region & (grid.foreground_um2 >= spec.min_foreground_um2 - 1e-6)
    thresholds = {"min_foreground_um2": spec.min_foreground_um2, "glass": list(m.glass), "min_od": params.min_od,
                  "min_saturation": params.min_saturation, "detect_mpp": round(m.mpp, 4),
                  "region_close_um": params.region_close_um}
    return Decision("cells", m.thumbnail, m.downsample, m.region, m.region_downsample, grid, m.region_mm2,
                    foreground_mm2=m.foreground_mm2, artefacts=m.artefacts, artefact_mm2=m.artefact_mm2(),
                    thresholds=thresholds)


@dataclass(frozen=True)
class Rule:
    """A tile rule: its settings type, the metadata key its settings are recorded under, and what it does."""

    params: type
    key: str
    apply: Callable[[Slide, Grid, GridSpec, Any, Progress], Decision]
    empty: Callable[[GridSpec], str]  # why no tile was kept (the deposit was found)


RULES: dict[str, Rule] = {
    "cells": Rule(SmearParams, "cells", apply_cells,
                  lambda s: f"no tile in the deposit region holds `min_foreground_um2` {s.min_foreground_um2:g} um^2 "
                            "of cells: 0 tiles"),
    "coverage": Rule(DepositParams, "deposit", apply_coverage,
                     lambda s: f"no tile reaches coverage {s.min_coverage:g} of the deposit: 0 tiles"),
}


def rule_params(spec: GridSpec, params: Params | None) -> Params:
    """The settings of `spec.rule`: `params` when they are its kind, its defaults when None."""
    if spec.rule not in RULES:
        raise CytoError(f"unknown `rule` '{spec.rule}': use {' or '.join(RULES)}")
    spec.validate()
    rule = RULES[spec.rule]
    if params is None:
        return rule.params()
    if not isinstance(params, rule.params):
        raise CytoError(f"the `{spec.rule}` rule takes {rule.params.__name__}, not {type(params).__name__}")
    params.validate()
    return params


def table_settings(spec: GridSpec, params: Params | None) -> dict[str, Any]:
    """What a tile table records of the settings that made it: the grid, the rule's threshold, its detection."""
    checked = rule_params(spec, params)  # an unknown rule is a one-line error before it is looked up
    return {**spec.to_dict(), RULES[spec.rule].key: checked.to_dict()}
