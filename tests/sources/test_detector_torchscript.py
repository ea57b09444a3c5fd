"""The `instanseg` / `torchscript` detector: a user's TorchScript segmentation model (InstanSeg's convention), tried
with tiny scripted models the test writes (no download): label maps -> nuclei in input pixels with physical areas,
cells and N/C ratios from a cell map, the model's pixel size honoured, the input normalised, and one clear error
for a missing, wrong or failing model file (library and CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from PIL import Image

from cytoretrieve.cli import run
from cytoretrieve.sources.slides.detectors import get_detector
from cytoretrieve.sources.slides.detectors.evaluate import match_points

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.(script|save)` is deprecated:FutureWarning")

MODEL_MPP = 0.5
SIDE = 200  # px at MODEL_MPP (100 um)
NUCLEI = [(40, 40), (150, 50), (60, 150), (80, 150)]  # px at MODEL_MPP; the last two share one cell
RADIUS = 7  # px (3.5 um)


def _maps() -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    nuclei = np.zeros((SIDE, SIDE), np.int32)
    cells = np.zeros((SIDE, SIDE), np.int32)
    for i, (cx, cy) in enumerate(NUCLEI[:2]):
        cells[np.hypot(xx - cx, yy - cy) <= 25] = i + 1
    cells[(np.abs(xx - 70) <= 30) & (np.abs(yy - 150) <= 20)] = 3  # one cell, two nuclei
    for i, (cx, cy) in enumerate(NUCLEI):
        nuclei[np.hypot(xx - cx, yy - cy) <= RADIUS] = 10 + 7 * i  # labels need not be 1..n
    return torch.from_numpy(nuclei), torch.from_numpy(cells)


class _InstanSegLike(torch.nn.Module):
    """InstanSeg's exported shape: `pixel_size`, forward(x, target_segmentation) -> (1, 2, H, W) label maps.
    It answers with empty maps unless its input is normalised to about 0..1 (as InstanSeg models expect)."""

    def __init__(self) -> None:
        super().__init__()
        self.pixel_size = MODEL_MPP
        nuclei, cells = _maps()
        self.register_buffer("maps", torch.stack([nuclei, cells])[None])

    def forward(self, x: torch.Tensor, target_segmentation: Optional[torch.Tensor] = None) -> torch.Tensor:  # noqa: UP045 (TorchScript)
        if x.shape[1] != 3 or x.shape[-2] != self.maps.shape[-2] or x.shape[-1] != self.maps.shape[-1]:
            raise RuntimeError("expected a (1, 3, 200, 200) input")
        if float(x.max()) > 1.5 or float(x.min()) < -0.5:
            return torch.zeros_like(self.maps)
        if target_segmentation is None:
            return self.maps
        return self.maps * target_segmentation[None, :, None, None]


class _NucleiOnly(torch.nn.Module):
    """A plain model: forward(x) -> (H, W) nucleus labels, no pixel size of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("nuclei", _maps()[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nuclei[: x.shape[-2], : x.shape[-1]]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ts")
    out = {"instanseg": folder / "instanseg_like.pt", "plain": folder / "plain.pt"}
    torch.jit.save(torch.jit.script(_InstanSegLike()), str(out["instanseg"]))
    torch.jit.save(torch.jit.script(_NucleiOnly()), str(out["plain"]))
    torch.save({"not": "scripted"}, folder / "state.pt")
    out["state"] = folder / "state.pt"
    return out


def _field(mpp: float) -> np.ndarray:
    """Grey glass with dark discs where the model's nuclei are, at `mpp` (so darkness is measured on them)."""
    n = int(round(SIDE * MODEL_MPP / mpp))
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) * mpp / MODEL_MPP - 0.5
    grey = np.full((n, n), 230, np.uint8)
    for cx, cy in NUCLEI:
        grey[np.hypot(xx - cx, yy - cy) <= RADIUS] = 90
    return grey


@pytest.mark.parametrize("mpp", [MODEL_MPP, 0.25])
def test_instanseg_like_model_gives_nuclei_cells_and_ratios(models: dict[str, Path], mpp: float) -> None:
    det = get_detector("instanseg", weights=models["instanseg"])
    assert det.name == "instanseg" and det.settings["model_mpp"] == MODEL_MPP and len(det.settings["sha256_16"]) == 16
    found = det(_field(mpp), mpp)  # at 0.25 um/px the field is resampled to the model's 0.5 first
    truth = (np.array(NUCLEI, float) + 0.5) * MODEL_MPP / mpp - 0.5
    assert match_points(found.xy, truth, 1.0) == (4, 0, 0)
    order = np.argsort(found.x + 1000 * np.round(found.y / 50))
    area = np.pi * (RADIUS * MODEL_MPP) ** 2
    np.testing.assert_allclose(found.area_um2, area, rtol=0.1)
    assert np.all(found.darkness > 0.3) and np.all(found.confidence == 1.0)
    cell_area = found.cell_area_um2[order]
    assert np.allclose(cell_area[:2], np.pi * (25 * MODEL_MPP) ** 2, rtol=0.1)  # the two lone cells
    assert np.isnan(cell_area[2:]).all()  # two nuclei in one cell: not told apart
    np.testing.assert_allclose(found.nc_ratio[order][:2], found.area_um2[order][:2] / cell_area[:2])
    assert found.labels is not None and found.labels.max() == 4 and found.labels_mpp == pytest.approx(MODEL_MPP)


def test_rgb_field_and_a_plain_model_found_by_its_path(models: dict[str, Path]) -> None:
    rgb = np.repeat(_field(MODEL_MPP)[..., None], 3, axis=2)
    det = get_detector(str(models["plain"]), channels=1)  # a TorchScript file given as --detector is recognised
    assert det.name == "torchscript" and det.settings["model_mpp"] is None
    found = det(rgb, 0.3)  # no pixel size of its own: the image is used as it is, areas from the image's mpp
    assert len(found) == 4 and np.all(np.isnan(found.cell_area_um2))
    np.testing.assert_allclose(found.area_um2, np.pi * RADIUS**2 * 0.3**2, rtol=0.1)
    assert len(get_detector("torchscript", weights=models["plain"], min_area_um2=50.0)(rgb, 0.3)) == 0


def test_missing_wrong_or_failing_model_is_one_clear_error(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--weights"):
        get_detector("instanseg")
    with pytest.raises(ValueError, match="no model file"):
        get_detector("instanseg", weights=tmp_path / "none.pt")
    with pytest.raises(ValueError, match="not a TorchScript"):
        get_detector("torchscript", weights=models["state"])
    with pytest.raises(ValueError, match=r"failed on a \(1, 3, 100, 100\) input"):
        get_detector("instanseg", weights=models["instanseg"])(_field(MODEL_MPP)[:100, :100], MODEL_MPP)


def test_cli_cells_with_an_instanseg_model(models: dict[str, Path], tmp_path: Path, capsys) -> None:
    field = tmp_path / "f1.png"
    Image.fromarray(_field(MODEL_MPP)).save(field)
    store = str(tmp_path / "store")
    assert run(["cells", str(field), "--mpp", str(MODEL_MPP), "--detector", "instanseg", "--weights",
                str(models["instanseg"]), "--store", store, "--table", "seg", "--no-focus",
                "--json", str(tmp_path / "r.json")]) == 0
    from cytoretrieve.store.tables import Store
    from cytoretrieve.store.tiles import open_tile_table

    table = open_tile_table(Store(store), "seg")
    assert table.count() == 4 and table.meta["detector"]["name"] == "instanseg"
    assert table.meta["detector"]["weights"].endswith("instanseg_like.pt")
    capsys.readouterr()
    for args, words in ((["--detector", "instanseg"], "--weights"),
                        (["--weights", str(models["instanseg"])], "takes no weights"),
                        (["--detector", "instanseg", "--weights", str(models["state"])], "not a TorchScript"),
                        (["--detector-option", "model_mpp"], "not KEY=VALUE"),
                        (["--detector-option", "no_such_setting=1"], "does not take")):
        assert run(["cells", str(field), "--mpp", "0.5", "--store", store, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err


def test_cli_detector_options_reach_the_detector_and_the_table(models: dict[str, Path], tmp_path: Path) -> None:
    field = tmp_path / "f1.png"
    Image.fromarray(_field(MODEL_MPP)).save(field)
    store = str(tmp_path / "store")
    assert run(["cells", str(field), "--mpp", str(MODEL_MPP), "--detector", "instanseg", "--weights",
                str(models["instanseg"]), "--detector-option", f"model_mpp={MODEL_MPP}", "--store", store,
                "--table", "seg", "--no-focus", "--workers", "1"]) == 0
    from cytoretrieve.store.tables import Store
    from cytoretrieve.store.tiles import open_tile_table

    meta = open_tile_table(Store(store), "seg").meta["detector"]
    assert meta["model_mpp"] == MODEL_MPP and isinstance(meta["model_mpp"], float)
