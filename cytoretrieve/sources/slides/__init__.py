"""Whole-slide images to bags of tiles: reading (OpenSlide), cell-deposit detection, the tile grid, tile tables,
previews, QuPath annotations and slide-level splits.

| module | one job |
|---|---|
| `reader.py` | open a slide with clear errors, its mpp, the level for a target mpp, a picklable tile reader |
| `deposit.py` | the cell-deposit mask on a low-resolution thumbnail, and each tile's coverage of it |
| `grid.py` | the regular tile grid at a target mpp, and which tiles the deposit keeps |
| `bag.py` | tile tables in the store: schema (no vectors), metadata, one commit per slide |
| `tiling.py` | the `tile` job: slides -> deposit -> grid -> one bag per slide, resumable per slide |
| `preview.py` | the quality-control PNG: thumbnail, deposit outline, kept tiles |
| `annotations.py` | QuPath GeoJSON -> labelled cell crops and tiles centred on each annotation |
| `labels.py` | the slide labels CSV (`slide,label[,binary][,path]`) |
| `split.py` | slide -> fold, stratified by slide label; `load_split` for the trainer, transfer and MIL scoring |

Import the submodules directly (`from cytoretrieve.sources.slides.reader import SlideReader`): this package file loads
nothing heavy.
"""
