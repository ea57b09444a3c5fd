"""Stain normalisation (`models.stain`): the two methods, grey refusal, the preprocessing and fingerprint it enters,
and the embed job's rules (recorded, never mixed, grey refused). CPU, tiny images, resnet18 at 32 px."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cytoretrieve.errors import CytoError
from cytoretrieve.models import stain
from cytoretrieve.models.backbones import Backbone, backbone_from_metadata, load_backbone, with_stain
from cytoretrieve.models.preprocess import Preprocessing
from cytoretrieve.models.stain import DEFAULT_TARGETS, GreyImageError, Macenko, Reinhard, make_normaliser
from tests.helpers.cli_lines import one_line_exit_2

SIZE = 32
PP = Preprocessing(size=SIZE, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def stained_image(matrix: np.ndarray, seed: int = 0, size: int = 48) -> np.ndarray:
    """A synthetic stained field: two stain concentrations (blobs on glass) composed with a (3, 2) stain matrix."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    conc = np.zeros((2, size, size))
    for _ in range(6):
        cy, cx, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(4, 10)]
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        conc[rng.integers(2)] += rng.uniform(0.5, 1.5) * blob
    conc += 0.05 * rng.random((2, size, size))
    od = np.tensordot(matrix, conc, axes=1)  # (3, H, W)
    return np.clip(stain.IO * np.exp(-od), 0, 255).round().astype(np.uint8).transpose(1, 2, 0)


HE = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])  # Macenko's H&E reference (unit columns)
OTHER = np.array([[0.75, 0.15], [0.55, 0.75], [0.35, 0.65]])
HE, OTHER = HE / np.linalg.norm(HE, axis=0), OTHER / np.linalg.norm(OTHER, axis=0)


def test_macenko_recovers_stain_vectors_and_maps_onto_the_target() -> None:
    reference = stained_image(HE, seed=1)
    fitted = Macenko().fit(reference)
    matrix = np.asarray(fitted.target[:6]).reshape(3, 2)
    assert np.abs(matrix - HE).max() < 0.15  # the two stain vectors, in order
    source = stained_image(OTHER, seed=1)  # same concentrations, other stains
    out = fitted.apply(source)
    assert out.shape == source.shape and out.dtype == np.uint8
    before = np.abs(source.astype(float) - reference).mean()
    after = np.abs(out.astype(float) - reference).mean()
    assert after < before / 3, (before, after)


def test_reinhard_matches_the_target_statistics() -> None:
    target = Reinhard().fit(stained_image(HE, seed=2))
    source = stained_image(OTHER, seed=3)
    out = target.apply(source)
    mask = stain.stained(stain.optical_density(source))  # the pixels whose statistics were matched
    lab = stain.to_lab(out)[mask]
    assert np.allclose(lab.mean(axis=0), target.target[:3], atol=0.01)
    assert np.allclose(lab.std(axis=0), target.target[3:], rtol=0.1, atol=0.005)
    assert not np.allclose(stain.to_lab(source)[mask].mean(axis=0), target.target[:3], atol=0.01)


@pytest.mark.parametrize("name", ["macenko", "reinhard"])
def test_grey_and_empty_images(name: str) -> None:
    norm = make_normaliser(name)
    grey = stained_image(HE, seed=4).mean(axis=2).astype(np.uint8)
    with pytest.raises(GreyImageError, match="grey"):
        norm.apply(np.repeat(grey[..., None], 3, axis=2))
    with pytest.raises(GreyImageError):
        norm.apply(grey)
    glass = np.full((20, 20, 3), 235, np.uint8)  # nothing stained: returned as is
    assert norm.apply(glass) is glass or np.array_equal(norm.apply(glass), glass)
    with pytest.raises(CytoError, match="too little stain"):
        make_normaliser(name).fit(glass)


def test_registry_and_targets() -> None:
    assert stain.stain_names() == ["none", "macenko", "reinhard"]
    assert make_normaliser("macenko").target == DEFAULT_TARGETS["macenko"]
    with pytest.raises(CytoError, match="unknown `stain` 'vahadane'"):
        stain.check_stain("vahadane")
    with pytest.raises(CytoError, match="8 finite numbers"):
        make_normaliser("macenko", [1.0, 2.0])


def test_preprocessing_without_stain_reads_as_before() -> None:
    """Back-compat: no stain key, so every existing table's fingerprint is unchanged."""
    assert set(PP.to_dict()) == {"size", "mean", "std", "interpolation", "resize"}
    assert Preprocessing.from_dict(PP.to_dict()) == PP
    stained = replace(PP, stain="macenko")
    d = stained.to_dict()
    assert d["stain"] == {"method": "macenko", "target": list(DEFAULT_TARGETS["macenko"])}
    assert Preprocessing.from_dict(d) == stained
    with pytest.raises(CytoError, match="needs a `stain`"):
        replace(PP, stain_target=(1.0,) * 8)


@pytest.fixture(scope="module")
def resnet() -> Backbone:
    return load_backbone("resnet18", "random", image_size=SIZE)


def test_fingerprint_follows_the_stain_and_rebuilds(resnet: Backbone, tmp_path: Path) -> None:
    assert with_stain(resnet, "none") is resnet
    mac, rei = with_stain(resnet, "macenko"), with_stain(resnet, "reinhard")
    other = with_stain(resnet, "macenko", [*HE.reshape(-1), 1.0, 1.0])
    prints = {resnet.fingerprint, mac.fingerprint, rei.fingerprint, other.fingerprint}
    assert len(prints) == 4
    rebuilt = backbone_from_metadata(mac.metadata())  # what `search` does for a query image
    assert rebuilt.fingerprint == mac.fingerprint and rebuilt.preprocessing.stain == "macenko"
    image = Image.fromarray(stained_image(OTHER, seed=5))
    assert not np.allclose(rebuilt.preprocessing(image).numpy(), resnet.preprocessing(image).numpy())
    ref = tmp_path / "ref.png"
    Image.fromarray(stained_image(HE, seed=6)).save(ref)
    fitted = with_stain(resnet, "reinhard", ref)
    assert fitted.preprocessing.stain_target != DEFAULT_TARGETS["reinhard"]
    with pytest.raises(CytoError, match="not found"):
        with_stain(resnet, "reinhard", tmp_path / "missing.png")


def write_cells(folder: Path, grey: bool = False) -> Path:
    for cls, matrix in (("a", HE), ("b", OTHER)):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            rgb = stained_image(matrix, seed=10 + i)
            if grey:
                rgb = np.repeat(rgb.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2)
            Image.fromarray(rgb).save(folder / cls / f"{cls}{i}.png")
    return folder


def test_embed_records_the_stain_and_never_mixes(resnet: Backbone, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from cytoretrieve.jobs.embed import embed
    from cytoretrieve.store.tables import Store

    cells = write_cells(tmp_path / "cells")
    store = Store(tmp_path / "store")
    report = embed(cells, resnet, store, stain="macenko", workers=0, device="cpu")
    assert report.table == "cells_resnet18_macenko" and report.added == 6 and not report.failed
    meta = store.open(report.table).meta["backbone"]
    assert meta["preprocessing"]["stain"]["method"] == "macenko"
    assert meta["fingerprint"] == with_stain(resnet, "macenko").fingerprint
    from cytoretrieve.queries.search import search

    query = cells / "a" / "a0.png"  # a query image is normalised as the table was: it finds itself first
    stained_table = store.open(report.table)
    assert search(stained_table, image=query, k=1, device="cpu").hits[0].id.endswith("a0.png")
    grey_query = Image.fromarray(np.repeat(np.asarray(Image.open(query)).mean(axis=2, keepdims=True)
                                           .astype(np.uint8), 3, axis=2))
    with pytest.raises(CytoError, match="grey"):
        search(stained_table, image=grey_query, k=1, device="cpu")
    with pytest.raises(CytoError, match="`stain` macenko, not none"):
        embed(cells, resnet, store, table=report.table, workers=0, device="cpu")
    with pytest.raises(CytoError, match="`stain` macenko, not reinhard"):
        embed(cells, resnet, store, table=report.table, stain="reinhard", workers=0, device="cpu")
    plain = embed(cells, resnet, store, workers=0, device="cpu")  # none: the usual name, fingerprint as before
    assert plain.table == "cells_resnet18" and store.open(plain.table).fingerprint == resnet.fingerprint
    grey = write_cells(tmp_path / "grey", grey=True)
    with pytest.raises(CytoError, match="needs colour"):
        embed(grey, resnet, store, stain="reinhard", workers=0, device="cpu")
    assert embed(grey, resnet, store, workers=0, device="cpu").added == 6  # grey with stain none: as always
    line = one_line_exit_2(["embed", str(cells), "--stain", "bogus", "--store", str(tmp_path / "s2")], capsys)
    assert line.endswith("unknown --stain 'bogus': use one of none, macenko, reinhard")
