"""Backbone creation, weight loading, fingerprints and preprocessing (CPU, tiny models at 64 px)."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from cytoretrieve.errors import CytoError
from cytoretrieve.models import backbones
from cytoretrieve.models.backbones import Backbone, backbone_from_metadata, fingerprint, load_backbone
from cytoretrieve.models.preprocess import Preprocessing
from cytoretrieve.runtime import resolve_device

SIZE = 64


@pytest.fixture(scope="module")
def resnet() -> Backbone:
    return load_backbone("resnet18", "random", image_size=SIZE)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def embed(backbone: Backbone, batch: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return backbone.model(batch)


def perturbed_state(backbone: Backbone) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    state["conv1.weight"][0, 0, 0, 0] += 0.5
    return state


# --- random weights, fingerprint -------------------------------------------------------------------------


def test_random_weights_are_reproducible(resnet: Backbone, batch: torch.Tensor) -> None:
    rng_before = torch.get_rng_state()
    again = load_backbone("resnet18", "random", image_size=SIZE)
    assert torch.equal(torch.get_rng_state(), rng_before), "global RNG must be untouched"
    assert again.fingerprint == resnet.fingerprint and len(resnet.fingerprint) == 64
    out = embed(resnet, batch)
    assert torch.equal(out, embed(again, batch))
    assert out.shape == (2, resnet.dim) and resnet.dim == 512
    assert not resnet.model.training
    assert resnet.weights == "random" and resnet.preprocessing.size == SIZE
    assert resnet.preprocessing.resize == "letterbox"


def test_fingerprint_tracks_size_resize_arch_and_values(resnet: Backbone) -> None:
    assert load_backbone("resnet18", "random", image_size=SIZE + 32).fingerprint != resnet.fingerprint
    assert load_backbone("resnet18", "random", image_size=SIZE, resize="stretch").fingerprint != resnet.fingerprint
    assert fingerprint(resnet.model, "resnet18d", resnet.preprocessing) != resnet.fingerprint
    model = timm.create_model("resnet18", num_classes=0)
    model.load_state_dict(perturbed_state(resnet))
    assert fingerprint(model, "resnet18", resnet.preprocessing) != resnet.fingerprint


def test_metadata_is_json(resnet: Backbone) -> None:
    meta = json.loads(json.dumps(resnet.metadata()))
    assert meta["arch"] == "resnet18" and meta["dim"] == 512 and meta["fingerprint"] == resnet.fingerprint
    assert Preprocessing.from_dict(meta["preprocessing"]) == resnet.preprocessing


def test_vit_takes_other_sizes(tmp_path: Path) -> None:
    vit = load_backbone("vit_tiny_patch16_224", "random", image_size=SIZE)
    assert vit.preprocessing.size == SIZE and vit.preprocessing.mean == (0.5, 0.5, 0.5)
    assert embed(vit, torch.zeros(1, 3, SIZE, SIZE)).shape == (1, vit.dim) == (1, 192)
    assert embed(vit, torch.zeros(1, 3, 96, 96)).shape == (1, 192)  # dynamic_img_size

    path = tmp_path / "vit.safetensors"
    safetensors.torch.save_file(vit.model.state_dict(), str(path))
    with pytest.raises(CytoError, match=r"pos_embed: \(1, 17, 192\) vs \(1, 197, 192\).*`image_size`"):
        load_backbone("vit_tiny_patch16_224", str(path))  # 64 px weights into the default 224 px model
    (tmp_path / "vit.json").write_text(json.dumps({"arch": "vit_tiny_patch16_224", "preprocessing": {"size": SIZE}}))
    bigger = load_backbone(None, str(path), image_size=96)  # built at the JSON's 64 px, fed 96 px
    assert bigger.preprocessing.size == 96
    assert torch.equal(bigger.model.state_dict()["pos_embed"], vit.model.state_dict()["pos_embed"])
    assert embed(bigger, torch.zeros(1, 3, 96, 96)).shape == (1, 192)


# --- weight files ----------------------------------------------------------------------------------------


def test_safetensors_round_trip_with_json_config(resnet: Backbone, batch: torch.Tensor, tmp_path: Path) -> None:
    state = perturbed_state(resnet)
    path = tmp_path / "backbone.safetensors"
    safetensors.torch.save_file(state, str(path))
    preprocessing = {"size": SIZE, "mean": [0.7, 0.6, 0.5], "std": [0.2, 0.2, 0.2], "resize": "stretch"}
    (tmp_path / "backbone.json").write_text(json.dumps({"arch": "resnet18", "preprocessing": preprocessing}))

    loaded = load_backbone(None, str(path))
    expected = timm.create_model("resnet18", num_classes=0).eval()
    expected.load_state_dict(state)
    assert torch.allclose(embed(loaded, batch), expected(batch).detach())
    assert loaded.arch == "resnet18" and loaded.weights == str(path.resolve())
    assert loaded.preprocessing.mean == (0.7, 0.6, 0.5) and loaded.preprocessing.resize == "stretch"
    assert loaded.preprocessing.interpolation == "bicubic"  # not in the JSON: model default
    assert loaded.fingerprint != resnet.fingerprint

    overridden = load_backbone("resnet18", str(path), resize="letterbox", image_size=96)
    assert overridden.preprocessing.resize == "letterbox" and overridden.preprocessing.size == 96
    with pytest.raises(CytoError, match="not resnet34"):
        load_backbone("resnet34", str(path))


def test_dino_checkpoint_loads_the_teacher(resnet: Backbone, batch: torch.Tensor, tmp_path: Path) -> None:
    teacher = perturbed_state(resnet)
    student = {k: v + 1.0 if v.is_floating_point() else v for k, v in teacher.items()}
    head = {"module.head.mlp.0.weight": torch.zeros(8, 512), "module.head.last_layer.weight_g": torch.ones(16, 1)}

    def wrap(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"module.backbone.{k}": v for k, v in state.items()} | head

    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": wrap(teacher), "student": wrap(student), "epoch": 3, "args": {"lr": 0.1}}, path)
    loaded = load_backbone("resnet18", str(path), image_size=SIZE)
    for name, value in teacher.items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    assert embed(loaded, batch).shape == (2, 512)


@pytest.mark.parametrize("wrapper", ["plain", "state_dict", "model"])
def test_checkpoint_shapes_and_classifier_keys(wrapper: str, tmp_path: Path) -> None:
    full = timm.create_model("resnet18", num_classes=10)  # has fc.weight / fc.bias
    state = {k: v for k, v in full.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "weights.pt"
    torch.save(state if wrapper == "plain" else {wrapper: state}, path)
    loaded = load_backbone("resnet18", str(path), image_size=SIZE)
    assert torch.equal(loaded.model.state_dict()["conv1.weight"], state["conv1.weight"])


def test_wrong_arch_names_the_counts(tmp_path: Path) -> None:
    path = tmp_path / "resnet34.safetensors"
    safetensors.torch.save_file(timm.create_model("resnet34", num_classes=0).state_dict(), str(path))
    with pytest.raises(CytoError, match=r"do not fit resnet18: 0 missing, \d+ unexpected \(e\.g\. layer") as err:
        load_backbone("resnet18", str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)

    state = timm.create_model("resnet18", num_classes=0).state_dict()
    state["conv1.weight"] = torch.zeros(32, 3, 7, 7)
    del state["layer4.1.bn2.bias"]
    safetensors.torch.save_file(state, str(path))
    with pytest.raises(CytoError, match=r"1 missing \(e\.g\. layer4\.1\.bn2\.bias\).*1 shape mismatches"
                       r" \(e\.g\. conv1\.weight: \(32, 3, 7, 7\) vs \(64, 3, 7, 7\)\)"):
        load_backbone("resnet18", str(path))


def test_unknown_arch_suggests_close_matches() -> None:
    with pytest.raises(CytoError, match=r"unknown backbone 'resnet181': not a timm model .*resnet18"):
        load_backbone("resnet181", "random")
    with pytest.raises(CytoError, match="no backbone architecture given"):
        load_backbone(None, "random")


def test_missing_corrupt_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(CytoError, match="weights file not found"):
        load_backbone("resnet18", str(tmp_path / "nope.safetensors"))
    for name in ("bad.safetensors", "bad.pth"):
        (tmp_path / name).write_bytes(b"not weights at all")
        with pytest.raises(CytoError, match="could not read"):
            load_backbone("resnet18", str(tmp_path / name))
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(CytoError, match="unsupported weights file"):
        load_backbone("resnet18", str(tmp_path / "weights.npz"))
    with pytest.raises(CytoError, match="no arch given"):
        load_backbone(None, str(tmp_path / "bad.pth"))



def _side_effect(path: str) -> None:
    Path(path).write_text("pickle ran code")


class Payload:
    """Unpickling this would run `_side_effect`: weights_only loading must refuse it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return _side_effect, (self.path,)


def test_pickle_payload_is_refused(resnet: Backbone, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": resnet.model.state_dict(), "extra": Payload(str(marker))}, path)
    with pytest.raises(CytoError, match=r"refusing to unpickle .*test_backbones._side_effect"):
        load_backbone("resnet18", str(path))
    assert not marker.exists()


# --- timm pretrained ---------------------------------------------------------------------------------------


def test_timm_weights_offline_gives_the_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    real = timm.create_model

    def offline(name: str, pretrained: bool = False, **kwargs):  # noqa: ANN003, ANN202
        if pretrained:
            raise LocalEntryNotFoundError("cannot find the requested files in the local cache")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(backbones.timm, "create_model", offline)
    monkeypatch.setattr(backbones, "_go_offline_when_hub_unreachable", lambda: False)  # as if the hub answered
    offline_hint = r"could not fetch pretrained weights for resnet18 \(offline\?\).*`weights` random"
    with pytest.raises(CytoError, match=offline_hint):
        load_backbone("resnet18", "timm")
    with pytest.raises(CytoError, match="could not fetch"):
        load_backbone("resnet18", None)  # None means the timm default

    def no_weights(name: str, pretrained: bool = False, **kwargs):  # noqa: ANN003, ANN202
        raise RuntimeError(f"No pretrained weights exist for {name}. Use `pretrained=False` for random init.")

    monkeypatch.setattr(backbones.timm, "create_model", no_weights)
    with pytest.raises(CytoError, match="timm has no pretrained weights for resnet18"):
        load_backbone("resnet18", "timm")


def test_unreachable_hub_fails_fast_with_the_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No route to huggingface.co: offline mode at once (cache only), not ~45 s of download retries."""
    import socket

    import huggingface_hub.constants as hub

    def unreachable(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError("Name or service not known")

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to fall back on
    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(CytoError, match=r"resnet18 \(huggingface.co is unreachable and they are not in the local cache\)"):
        load_backbone("resnet18", "timm")
    assert hub.HF_HUB_OFFLINE is True  # switched: huggingface_hub reads the cache only, no retries


# --- rebuilding from table metadata ------------------------------------------------------------------------


def test_backbone_from_metadata_rebuilds_random(resnet: Backbone, batch: torch.Tensor) -> None:
    rebuilt = backbone_from_metadata(json.loads(json.dumps(resnet.metadata())))
    assert rebuilt.fingerprint == resnet.fingerprint and rebuilt.preprocessing == resnet.preprocessing
    assert torch.equal(embed(rebuilt, batch), embed(resnet, batch))
    with pytest.raises(CytoError, match="does not describe a backbone"):
        backbone_from_metadata({"arch": "resnet18"})


def test_backbone_from_metadata_detects_changed_file(resnet: Backbone, batch: torch.Tensor, tmp_path: Path) -> None:
    path = tmp_path / "backbone.safetensors"
    safetensors.torch.save_file(resnet.model.state_dict(), str(path))
    original = load_backbone("resnet18", str(path), image_size=SIZE, resize="center-crop")
    meta = original.metadata()
    rebuilt = backbone_from_metadata(meta)
    assert rebuilt.fingerprint == original.fingerprint
    assert torch.equal(embed(rebuilt, batch), embed(original, batch))

    safetensors.torch.save_file(perturbed_state(resnet), str(path))
    changed = load_backbone("resnet18", str(path), image_size=SIZE, resize="center-crop")
    with pytest.raises(CytoError) as err:
        backbone_from_metadata(meta)
    message = str(err.value)
    assert str(path) in message and original.fingerprint[:16] in message and changed.fingerprint[:16] in message

    path.unlink()
    with pytest.raises(CytoError, match="cannot rebuild.*not found"):
        backbone_from_metadata(meta)


# --- preprocessing -----------------------------------------------------------------------------------------


PP = Preprocessing(size=SIZE, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
BACKGROUND = (200, 180, 190)


def cell(width: int = 30, height: int = 100) -> Image.Image:
    pixels = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    pixels[height // 3 : 2 * height // 3, width // 4 : 3 * width // 4] = (60, 20, 90)  # a dark nucleus
    return Image.fromarray(pixels)


def test_letterbox_pads_with_the_border_colour() -> None:
    tensor = PP(cell())
    assert tensor.shape == (3, SIZE, SIZE) and tensor.dtype == torch.float32
    expected = (torch.tensor(BACKGROUND) / 255.0 - 0.5) / 0.25
    for column in (0, 5, SIZE - 1):  # 30x100 -> 19x64 in the middle: the sides are padding
        assert torch.allclose(tensor[:, :, column], expected.view(3, 1).expand(3, SIZE), atol=1e-5)
    assert tensor[:, SIZE // 2, SIZE // 2].sum() < expected.sum()  # the nucleus survives, centred


@pytest.mark.parametrize("resize", ["letterbox", "stretch", "center-crop"])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16", "1", "CMYK"])
def test_any_mode_and_policy_gives_rgb_tensor(mode: str, resize: str) -> None:
    image = cell(37, 81).convert(mode) if mode != "I;16" else Image.fromarray(np.full((81, 37), 40000, np.uint16))
    tensor = Preprocessing(SIZE, (0.5,) * 3, (0.25,) * 3, "bilinear", resize)(image)
    assert tensor.shape == (3, SIZE, SIZE) and torch.isfinite(tensor).all()


def test_rgba_is_composited_on_white_and_16bit_scaled() -> None:
    transparent = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    assert torch.allclose(PP(transparent), torch.full((3, SIZE, SIZE), 2.0))  # white: (1 - 0.5) / 0.25
    grey16 = Image.fromarray(np.full((20, 20), 65535, np.uint16))
    assert torch.allclose(PP(grey16), torch.full((3, SIZE, SIZE), 2.0))


def test_thumbnail_is_a_jpeg_with_the_model_framing() -> None:
    data = PP.thumbnail(cell(), size=96)
    assert data[:2] == b"\xff\xd8" and len(data) < 10_000
    thumb = Image.open(io.BytesIO(data))
    assert thumb.format == "JPEG" and thumb.size == (96, 96) and thumb.mode == "RGB"
    corner = np.asarray(thumb)[2, 2].astype(int)
    assert np.abs(corner - BACKGROUND).max() <= 6  # letterbox padding, not black


def test_preprocessing_pickles_and_round_trips() -> None:
    clone = pickle.loads(pickle.dumps(PP))
    assert clone == PP and torch.equal(clone(cell()), PP(cell()))
    assert Preprocessing.from_dict(json.loads(json.dumps(PP.to_dict()))) == PP
    with pytest.raises(CytoError, match="resize policy"):
        Preprocessing(SIZE, (0.5,) * 3, (0.25,) * 3, resize="crop")
    with pytest.raises(CytoError, match="missing"):
        Preprocessing.from_dict({"size": SIZE})


def test_resolve_device() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(CytoError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(CytoError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_one_device_resolver_and_worker_rule_for_every_job(monkeypatch) -> None:
    from cytoretrieve import runtime
    from cytoretrieve.distributed import setup
    from cytoretrieve.jobs import embed
    from cytoretrieve.queries.mil import train as mil_train

    assert mil_train.resolve_device is runtime.resolve_device is embed.resolve_device
    assert setup("cpu").device == "cpu" and setup("cpu").world_size == 1
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    assert runtime.default_workers("cpu") == 0  # embedding on 2 cores: decode in-process
    assert runtime.default_workers("cpu", augments=True) == 1  # training: one worker makes the views
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 32)
    assert runtime.default_workers("cuda") == 8 and runtime.default_workers("cuda", augments=True) == 12
    assert runtime.default_workers("cuda", processes=8, augments=True) == 3  # a share of the node's cores
    assert runtime.is_cnn(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3)))
    assert not runtime.is_cnn(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 16, stride=16), torch.nn.Linear(4, 4)))


def test_one_timm_creation_serves_embedding_and_training() -> None:
    from cytoretrieve.models.backbones import create_model
    from cytoretrieve.train.head import create_backbone

    def weights(model: torch.nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    fixed = create_model("resnet18")  # embedding's random init: seeded, the caller's RNG untouched
    torch.manual_seed(5)
    before = torch.rand(1)
    assert torch.equal(weights(create_model("resnet18")), weights(fixed))
    torch.manual_seed(5)
    assert torch.equal(torch.rand(1), before)
    torch.manual_seed(1)  # training's init: the run's seed decides it
    a = weights(create_backbone("resnet18", image_size=64))
    torch.manual_seed(1)
    assert torch.equal(a, weights(create_model("resnet18", img_size=64, seed=None)))
    torch.manual_seed(2)
    assert not torch.equal(a, weights(create_backbone("resnet18", image_size=64)))
    vit = create_backbone("vit_tiny_patch16_224", image_size=32, drop_path_rate=0.1)
    assert vit(torch.zeros(1, 3, 48, 48)).shape == (1, vit.num_features)  # dynamic_img_size: another size passes
    with pytest.raises(CytoError, match="unknown backbone"):
        create_backbone("resnet_nonexistent", image_size=64)
