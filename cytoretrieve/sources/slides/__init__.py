"""Whole slides and microscope fields as a source: reading (through the slide backends), cell-deposit detection, the
tile grid, one slide -> tile rows, nuclei -> cell rows, and QuPath annotations -> annotation rows. Nothing here
writes: the jobs (`cytoretrieve.jobs.tile`, `jobs.cells`) store what these modules yield.

| module | one job |
|---|---|
| `backends/` | the slide backends, a registry: OpenSlide (default), tifffile (untiled, OME, z-stacks), plain images |
| `reader.py` | open a slide through a backend with clear errors, its mpp, the level for a target mpp, a picklable tile reader |
| `grid.py` | the regular tile grid at a target mpp (the read level chosen once, by the caller) |
| `rules.py` | tile rules, name -> rule: `cells` (cytology, the default), `coverage` (tissue) |
| `smear.py` | the cells rule's detection: glass, cell foreground, artefacts (ink, debris, label, edge), region |
| `deposit.py` | the tissue rule's deposit mask on a thumbnail, each tile's coverage; the chunked thumbnail reader |
| `tiling.py` | one slide -> its tile rows, with the rule's decision they came from (`tile_slide`) |
| `focus.py` | the focus score of a tile or crop (normalised variance of the Laplacian; None for glass) |
| `planes.py` | focal planes: one plane, the sharpest per region (`best`) or an EDF composite (`edf`) |
| `detectors/` | nucleus detectors, a registry: `classic` (no weights), point-trained models; scoring against points |
| `cells.py` | one slide or field -> its nuclei -> cell rows (a crop per nucleus, with measurements) |
| `synthetic_smears.py` | synthetic Pap smears made of real cells, every cell's place known (tests, benchmarks) |
| `annotations.py` | QuPath GeoJSON -> labelled cell crops and tiles centred on each annotation |

Slide labels and splits are the cohort's (`cytoretrieve.sources.cohort`); tile tables are the store's
(`cytoretrieve.store.tiles`); the tiling preview is a view (`cytoretrieve.views.slide_preview`).
Import the submodules directly (`from cytoretrieve.sources.slides.reader import SlideReader`): this package file
loads nothing heavy.
"""
