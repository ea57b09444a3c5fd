"""Whole-slide images as a source: reading (OpenSlide), cell-deposit detection, the tile grid, one slide -> tile rows,
and QuPath annotations -> annotation rows. Nothing here writes: `cytoretrieve.tile` stores what these modules yield.

| module | one job |
|---|---|
| `reader.py` | open a slide with clear errors, its mpp, the level for a target mpp, a picklable tile reader |
| `deposit.py` | the cell-deposit mask on a low-resolution thumbnail, and each tile's coverage of it |
| `grid.py` | the regular tile grid at a target mpp, and which tiles the deposit keeps |
| `tiling.py` | one slide -> its tile rows, with the mask and grid they came from (`tile_slide`) |
| `annotations.py` | QuPath GeoJSON -> labelled cell crops and tiles centred on each annotation |

Slide labels and splits are the cohort's (`cytoretrieve.sources.cohort`); tile tables are the store's
(`cytoretrieve.store.tiles`); the tiling preview is a view (`cytoretrieve.views.slide_preview`).
Import the submodules directly (`from cytoretrieve.sources.slides.reader import SlideReader`): this package file
loads nothing heavy.
"""
