"""Training data and augmentations: sources, slide splits, the resumable sampler, deterministic views, HED
jitter, cell cut-outs and copy-paste, the preview grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from cytoretrieve.errors import CytoError
from cytoretrieve.sources.cohort.split import load_split
from cytoretrieve.train.augment import (
    CellBank,
    DinoViews,
    PasteSpec,
    ViewSpec,
    cell_alpha,
    hed_jitter,
    paste_cells,
)
from cytoretrieve.train.data import (
    EpochSampler,
    TrainDataset,
    apply_split,
    open_cell_bank,
    open_sources,
)
from cytoretrieve.views.train_preview import write_preview


def _cell(size: int = 60, radius: int = 20, colour=(120, 60, 140), bg=(235, 232, 240)) -> Image.Image:
    image = Image.new("RGB", (size, size), bg)
    c = size // 2
    ImageDraw.Draw(image).ellipse((c - radius, c - radius, c + radius, c + radius), fill=colour)
    return image


@pytest.fixture
def tiles(tmp_path: Path) -> Path:
    """slide_a/ (3 tiles, one nested deeper), slide_b/ (2 tiles), slide_c/ (1 tile)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "tiles"
    for rel in ["slide_a/0_0.png", "slide_a/0_1.png", "slide_a/deep/1_1.png", "slide_b/0_0.jpg", "slide_b/9_9.png", "slide_c/x.png"]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(p)
    (root / "slide_a" / "notes.txt").write_text("not an image")
    return root


def test_folder_source_is_recursive_with_slide_ids(tiles: Path) -> None:
    src = open_sources([tiles])
    assert src.ids == ["slide_a/0_0.png", "slide_a/0_1.png", "slide_a/deep/1_1.png", "slide_b/0_0.jpg", "slide_b/9_9.png", "slide_c/x.png"]
    assert src.slides == ["slide_a"] * 3 + ["slide_b"] * 2 + ["slide_c"]
    assert src.load(3).mode == "RGB" and src.load(3).size == (40, 48)
    both = open_sources([tiles / "slide_a", tiles / "slide_b"])
    assert len(both) == 5 and both.ids[0].startswith("0:slide_a/") and both.ids[-1].startswith("1:slide_b/")
    with pytest.raises(CytoError, match="not found"):
        open_sources([tiles / "nope"])
    with pytest.raises(CytoError, match="no images"):
        open_sources([tmp_path_empty(tiles)])


def tmp_path_empty(tiles: Path) -> Path:
    empty = tiles.parent / "empty"
    empty.mkdir(exist_ok=True)
    return empty


@pytest.mark.filterwarnings("ignore:Herlev root")
def test_herlev_folder_leaves_masks_out(tmp_path: Path) -> None:
    root = tmp_path / "smear2005"
    for folder in ["normal_superficiel", "normal_intermediate", "light_dysplastic", "carcinoma_in_situ"]:
        (root / folder).mkdir(parents=True)
        _cell().save(root / folder / "1-2-001.BMP")
        _cell(colour=(255, 0, 0), bg=(0, 0, 255)).save(root / folder / "1-2-001-d.bmp")
    src = open_sources([root])
    assert len(src) == 4 and not any("-d" in i for i in src.ids)
    bank = open_cell_bank([root])
    assert len(bank) == 4 and all(m and m.endswith("-d.bmp") for m in bank.masks)


@pytest.mark.parametrize("kind", ["split-command", "csv", "json"])
def test_split_holds_out_the_fold_slides(tiles: Path, tmp_path: Path, kind: str) -> None:
    folds = {"slide_a": 0, "slide_b": 1, "slide_c": 0}
    if kind == "split-command":  # the file `cytoretrieve split` writes
        from cytoretrieve.sources.cohort.split import Split, write_split

        path = write_split(Split(folds=2, seed=0, fold_of=folds, label_of={s: "NILM" for s in folds},
                                 binary_of={s: 0 for s in folds}), tmp_path / "split.json")
    elif kind == "csv":
        path = tmp_path / "split.csv"
        path.write_text("slide,fold,label\n" + "".join(f"{s},{f},x\n" for s, f in folds.items()))
    else:
        path = tmp_path / "split.json"
        path.write_text(json.dumps(folds))
    assert load_split(path).fold_of == folds  # the one split reader takes every format
    kept, held_out = apply_split(open_sources([tiles]), load_split(path).fold_of, 0)
    assert held_out == 2 and set(kept.slides) == {"slide_b"} and len(kept) == 2
    kept, held_out = apply_split(open_sources([tiles]), load_split(path).fold_of, 1)
    assert held_out == 1 and "slide_b" not in kept.slides and len(kept) == 4


def test_split_refuses_what_it_cannot_hold_out(tiles: Path, tmp_path: Path) -> None:
    path = tmp_path / "split.csv"
    path.write_text("slide,fold\nslide_a,0\nslide_b,1\n")
    with pytest.raises(CytoError, match="not in the split file .*slide_c"):
        apply_split(open_sources([tiles]), load_split(path).fold_of, 0)
    with pytest.raises(CytoError, match="fold 5 is not in the split"):
        apply_split(open_sources([tiles / "slide_a"]), load_split(path).fold_of, 5)
    loose = tmp_path / "loose"
    loose.mkdir()
    _cell().save(loose / "a.png")
    with pytest.raises(CytoError, match="no slide id"):
        apply_split(open_sources([loose]), load_split(path).fold_of, 0)
    (tmp_path / "bad.csv").write_text("name,group\na,1\n")
    with pytest.raises(CytoError, match="slide,fold"):
        load_split(tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text("slide,fold\na,one\n")
    with pytest.raises(CytoError, match="not an integer"):
        load_split(tmp_path / "bad2.csv")


def test_sampler_splits_ranks_and_resumes_mid_epoch() -> None:
    a, b = (EpochSampler(12, rank=r, world_size=2, batch_size=2, seed=3) for r in (0, 1))
    assert a.batches == 3
    ia, ib = a.indices(), b.indices()
    assert not set(ia) & set(ib) and sorted(ia + ib) == list(range(12))
    odd = [EpochSampler(11, rank=r, world_size=2, batch_size=2, seed=3) for r in (0, 1)]
    assert [s.batches for s in odd] == [3, 3]  # ceil(11 / 2) = 6 per rank (one index repeated, as DistributedSampler)
    assert set(odd[0].indices()) | set(odd[1].indices()) == set(range(11))
    whole = list(a)
    assert all(e == 0 for e, _ in whole)
    a.set_epoch(0, skip_batches=1)
    assert a.indices() == ia[2:] and len(a) == 4
    a.set_epoch(1)
    assert a.indices() != ia  # a new order every epoch


def test_views_are_uint8_deterministic_per_sample(tiles: Path) -> None:
    spec = ViewSpec(image_size=32, local_crops=2, local_size=16, hed_jitter=0.05)
    ds = TrainDataset(open_sources([tiles]), DinoViews(spec), seed=7)
    views, ok = ds[(0, 2)]
    assert ok and [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    assert all(v.dtype == torch.uint8 for v in views)
    again, _ = ds[(0, 2)]
    assert all(torch.equal(x, y) for x, y in zip(views, again))
    other_epoch, _ = ds[(1, 2)]
    assert not torch.equal(views[0], other_epoch[0])
    assert not torch.equal(TrainDataset(open_sources([tiles]), DinoViews(spec), seed=8)[(0, 2)][0][0], views[0])


def test_unreadable_image_is_replaced_and_counted(tiles: Path) -> None:
    (tiles / "slide_a" / "0_1.png").write_bytes(b"not a png")
    ds = TrainDataset(open_sources([tiles]), DinoViews(ViewSpec(image_size=16)), seed=0)
    views, ok = ds[(0, 1)]
    assert not ok and views[0].shape == (3, 16, 16)


def test_hed_jitter_is_the_identity_at_zero_and_moves_colours_otherwise() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    same = np.asarray(hed_jitter(image, np.random.default_rng(1), 1e-9), dtype=int)
    assert np.abs(same - np.asarray(image, dtype=int)).max() <= 1
    moved = np.asarray(hed_jitter(image, np.random.default_rng(1), 0.2), dtype=int)
    assert np.abs(moved - np.asarray(image, dtype=int)).mean() > 3


def test_colour_strength_and_grayscale_p_control_the_colour_of_views() -> None:
    """A flat red image: brightness, contrast, blur and solarisation keep green == blue, so only the hue / saturation
    jitter (colour_strength) or a grey view (grayscale_p) can change that."""
    red = Image.new("RGB", (40, 40), (200, 30, 30))

    def views(**kw) -> list[np.ndarray]:
        d = DinoViews(ViewSpec(image_size=16, **kw))
        return [np.asarray(v, dtype=int) for seed in range(20) for v in d.images(red, np.random.default_rng(seed))]

    plain = views(colour_strength=0.0, grayscale_p=0.0)
    assert all(np.array_equal(v[..., 1], v[..., 2]) and (v[..., 0] > v[..., 1]).all() for v in plain)
    jittered = views(colour_strength=1.0, grayscale_p=0.0)
    assert sum(not np.array_equal(v[..., 1], v[..., 2]) for v in jittered) > 10
    grey = views(colour_strength=0.0, grayscale_p=1.0)
    assert all(np.array_equal(v[..., 0], v[..., 1]) for v in grey)


def test_cell_alpha_from_a_mask_and_from_a_threshold() -> None:
    cell = _cell(size=80, radius=25)
    disc = np.asarray(_cell(size=80, radius=25, colour=(255, 255, 255), bg=(0, 0, 0)))[..., 0] > 0
    outside = ~(np.asarray(_cell(size=80, radius=26, colour=(255, 255, 255), bg=(0, 0, 0)))[..., 0] > 0)
    mask = _cell(size=80, radius=25, colour=(255, 0, 0), bg=(0, 0, 255))
    for alpha in (cell_alpha(cell, mask), cell_alpha(cell)):
        a = np.asarray(alpha)
        iou = ((a > 127) & disc).sum() / ((a > 127) | disc).sum()
        assert iou > 0.65  # feathered inside the edge ...
        assert not (a[outside] > 25).any()  # ... so no background comes along
        assert a[0, 0] == 0 and a[40, 40] == 255
    # a cell that fills its crop: an inscribed ellipse stands in
    full = np.asarray(cell_alpha(Image.new("RGB", (50, 30), (90, 40, 120)))) > 127
    assert full[15, 25] and not full[0, 0] and 0.5 < full.mean() < 0.85


def test_copy_paste_puts_cells_on_the_tile(tmp_path: Path) -> None:
    cells = tmp_path / "cells"
    cells.mkdir()
    for i in range(3):
        _cell(colour=(30 + 50 * i, 20, 120)).save(cells / f"c{i}.png")
    bank = open_cell_bank([cells])
    assert isinstance(bank, CellBank) and len(bank) == 3 and bank.masks == [None] * 3
    tile = Image.new("RGB", (96, 96), (240, 240, 240))
    out = paste_cells(tile, bank, np.random.default_rng(0), PasteSpec(p=1.0, max_cells=3, scale=(0.3, 0.5)))
    diff = np.abs(np.asarray(out, dtype=int) - 240).max(axis=2) > 30
    assert 0.02 < diff.mean() < 0.9
    assert np.asarray(tile).min() == 240  # the source tile is left alone
    again = paste_cells(tile, bank, np.random.default_rng(0), PasteSpec(p=1.0, max_cells=3, scale=(0.3, 0.5)))
    assert np.array_equal(np.asarray(out), np.asarray(again))
    assert bank._alphas  # the alphas were kept, and a kept alpha gives the same cut-out as a fresh one
    fresh = open_cell_bank([cells])
    for i in range(3):
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(bank.cutout(i), fresh.cutout(i)))


def test_preview_grid(tiles: Path, tmp_path: Path) -> None:
    cells = tmp_path / "cells"
    cells.mkdir()
    _cell().save(cells / "c.png")
    ds = TrainDataset(open_sources([tiles]), DinoViews(ViewSpec(image_size=32, local_crops=1, local_size=16)), seed=0,
                      bank=open_cell_bank([cells]), paste=PasteSpec(p=1.0))
    path = write_preview(ds, 3, tmp_path / "p" / "preview.png")
    grid = Image.open(path)
    assert grid.size == (5 * 36 + 4, 18 + 3 * 36 + 4)  # source, pasted, 2 global, 1 local; 3 rows
