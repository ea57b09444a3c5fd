"""Foundation-model backbones, offline: a tiny ViT saved in timm's hub layout (config.json + model.safetensors)
loaded through `local-dir:`, the kwargs registry, preprocessing from the model's pretrained config, and the one
line a gated or unreachable hub model gives."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from cytoretrieve.cli import run
from cytoretrieve.errors import CytoError
from cytoretrieve.models import backbones, foundation
from cytoretrieve.models.backbones import backbone_from_metadata, load_backbone
from helpers.cli_lines import one_line_exit_2
from helpers.paths import README

MEAN, STD = (0.7, 0.6, 0.7), (0.2, 0.25, 0.15)  # not ImageNet's: they can only come from config.json
ARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}


def save_hub_layout(folder, model_args=ARGS, extra: dict | None = None, hub: str | None = None, seed: int = 1):
    """A model as the Hugging Face Hub holds a timm model: config.json (architecture, model_args, pretrained_cfg)
    and model.safetensors. `extra` are creation kwargs that config.json cannot hold (classes)."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **model_args, **(extra or {}))
    folder.mkdir(parents=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    pretrained_cfg = {"input_size": [3, 32, 32], "mean": list(MEAN), "std": list(STD), "interpolation": "bilinear",
                      "fixed_input_size": True, "num_classes": 0, "classifier": "head", "first_conv": "patch_embed.proj"}
    if hub:
        pretrained_cfg["hf_hub_id"] = hub
    config = {"architecture": "vit_tiny_patch16_224", "num_classes": 0, "num_features": 48,
              "global_pool": "token", "model_args": model_args, "pretrained_cfg": pretrained_cfg}
    (folder / "config.json").write_text(json.dumps(config))
    return model.eval()


def test_local_dir_loads_the_weights_and_the_preprocessing_of_its_config(tmp_path) -> None:
    original = save_hub_layout(tmp_path / "tiny-vit")
    backbone = load_backbone(f"local-dir:{tmp_path / 'tiny-vit'}", "timm")
    assert backbone.arch == f"local-dir:{(tmp_path / 'tiny-vit').resolve()}"  # absolute: valid from any folder
    assert backbone.dim == 48
    p = backbone.preprocessing
    assert (p.size, p.interpolation) == (32, "bilinear")
    np.testing.assert_allclose(p.mean, MEAN)
    np.testing.assert_allclose(p.std, STD)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        np.testing.assert_allclose(backbone.model(x).numpy(), original(x).numpy(), rtol=1e-5, atol=1e-6)
    again = backbone_from_metadata(backbone.metadata())  # what search by image does with a table's metadata
    assert again.fingerprint == backbone.fingerprint


def test_embed_and_search_by_image_through_local_dir(tmp_path, capsys) -> None:
    save_hub_layout(tmp_path / "tiny-vit")
    cells = tmp_path / "cells"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (cells / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(cells / label / f"{i}.png")
    store = str(tmp_path / "store")
    assert run(["embed", str(cells), "--backbone", f"local-dir:{tmp_path / 'tiny-vit'}", "--table", "t",
                "--store", store, "--device", "cpu", "--workers", "0"]) == 0
    capsys.readouterr()
    assert run(["search", str(cells / "a" / "0.png"), "--table", "t", "--store", store, "--device", "cpu", "--json", "-"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert hits[0]["id"].endswith("0.png") and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_registry_supplies_the_kwargs_config_json_cannot_hold(tmp_path, monkeypatch) -> None:
    """A SwiGLU ViT's config.json cannot name its MLP class: only the registry entry makes the weights fit."""
    swiglu = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}
    save_hub_layout(tmp_path / "a" / "tiny-swiglu", extra=swiglu)
    save_hub_layout(tmp_path / "b" / "renamed", extra=swiglu, hub="test-org/tiny-swiglu")
    with pytest.raises(CytoError, match="do not fit"):  # no entry yet: a plain MLP is built
        load_backbone(f"local-dir:{tmp_path / 'a' / 'tiny-swiglu'}", "timm")
    entry = foundation.FoundationModel("Tiny", "test-org/tiny-swiglu", {"mlp_ratio": 4.0}, foundation._swiglu, 32, 48)
    monkeypatch.setitem(foundation.REGISTRY, "test-org/tiny-swiglu", entry)
    by_folder = load_backbone(f"local-dir:{tmp_path / 'a' / 'tiny-swiglu'}", "timm")  # found by folder name
    by_config = load_backbone(f"local-dir:{tmp_path / 'b' / 'renamed'}", "timm")  # found by config's hf_hub_id
    assert isinstance(by_folder.model.blocks[0].mlp, timm.layers.GluMlp)  # SwiGLUPacked is GluMlp, packed
    assert isinstance(by_config.model.blocks[0].mlp, timm.layers.GluMlp)


def test_registry_names_the_kwargs_of_the_models_cards() -> None:
    virchow = foundation.encoder_kwargs("hf-hub:paige-ai/Virchow2")
    assert virchow["mlp_layer"] is timm.layers.SwiGLUPacked and virchow["act_layer"] is torch.nn.SiLU
    assert foundation.encoder_kwargs("hf_hub:MahmoodLab/UNI")["init_values"] == 1e-5
    assert foundation.encoder_kwargs("hf-hub:MahmoodLab/UNI2-h@main")["reg_tokens"] == 8
    assert foundation.encoder_kwargs("resnet50") == {} and foundation.encoder_kwargs("hf-hub:timm/resnet18.a1_in1k") == {}


def test_readme_table_lists_the_registry(tmp_path) -> None:

    readme = README.read_text()
    for entry in foundation.REGISTRY.values():
        assert f"hf-hub:{entry.hub}" in readme, entry.hub


def test_a_gated_hub_model_says_how_to_log_in_or_use_a_local_copy(tmp_path, monkeypatch, capsys) -> None:
    import httpx2
    from huggingface_hub.errors import GatedRepoError

    def gated(name, **kwargs):  # noqa: ANN001, ANN003, ANN202 - what hf_hub_download raises for a gated repo
        request = httpx2.Request("GET", "https://huggingface.co/MahmoodLab/UNI/resolve/main/config.json")
        raise GatedRepoError("401 Client Error. Cannot access gated repo", response=httpx2.Response(401, request=request))

    monkeypatch.setattr(backbones.timm, "create_model", gated)
    monkeypatch.setattr(backbones, "_go_offline_when_hub_unreachable", lambda: False)  # as if the hub answered
    err = one_line_exit_2(["embed", str(tmp_path), "--backbone", "hf-hub:MahmoodLab/UNI", "--store", str(tmp_path / "s")], capsys)
    assert "gated" in err and "hf auth login" in err and "HF_TOKEN" in err and "--backbone local-dir:" in err


def test_an_unreachable_hub_fails_at_once_with_one_line(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # what the reachability probe switches to without a route
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CytoError) as caught:
        load_backbone("hf-hub:MahmoodLab/UNI", "timm")
    message = str(caught.value)
    assert "\n" not in message and "unreachable" in message and "local-dir:PATH" in message


def test_local_dir_not_in_hub_layout_is_one_line(tmp_path, capsys) -> None:
    (tmp_path / "weights").mkdir()
    err = one_line_exit_2(["embed", str(tmp_path), "--backbone", f"local-dir:{tmp_path / 'weights'}",
                             "--store", str(tmp_path / "s")], capsys)
    assert "config.json" in err and "--backbone" in err
    err = one_line_exit_2(["embed", str(tmp_path), "--backbone", f"local-dir:{tmp_path / 'nowhere'}",
                             "--store", str(tmp_path / "s")], capsys)
    assert re.search(r"no folder .*nowhere", err)
