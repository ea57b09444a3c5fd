"""timm backbones as feature extractors: creation, weight loading, preprocessing and a content fingerprint.

A `Backbone` is what a table is embedded with. Its `metadata()` is stored with the table so the exact model
(weights + preprocessing) can be rebuilt for queries later; the fingerprint proves it is the same one.
Weights come from timm ("timm"), a deterministic random init ("random", for tests and offline demos) or a
file: safetensors (optionally with a JSON config beside it) or a torch checkpoint, loaded weights_only.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import timm
import timm.data
import torch
from timm.models import get_pretrained_cfg

from cytoretrieve.errors import CytoError
from cytoretrieve.models.foundation import encoder_kwargs, external_message, hub_failure, hub_id, resolve_local_dir
from cytoretrieve.models.preprocess import INTERPOLATIONS, Preprocessing, to_rgb
from cytoretrieve.runtime import resolve_device

__all__ = ["Backbone", "Preprocessing", "backbone_from_metadata", "create_model", "fingerprint", "load_backbone",
           "with_stain"]

KEYWORD_WEIGHTS = ("timm", "random")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
RANDOM_SEED = 0
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrappers
_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


@dataclass
class Backbone:
    """A timm model in eval mode returning pooled features (B, dim), with the preprocessing it expects."""

    arch: str
    model: torch.nn.Module
    preprocessing: Preprocessing
    weights: str
    fingerprint: str
    dim: int

    def metadata(self) -> dict[str, Any]:
        """JSON-able description stored with a table; `backbone_from_metadata` rebuilds the model from it."""
        return {
            "arch": self.arch,
            "weights": self.weights,
            "fingerprint": self.fingerprint,
            "dim": self.dim,
            "preprocessing": self.preprocessing.to_dict(),
        }


def load_backbone(
    arch: str | None,
    weights: str | None = "timm",
    *,
    image_size: int | None = None,
    resize: str | None = None,
    device: str = "cpu",
) -> Backbone:
    """Create `arch` with weights "timm", "random" or from a file; explicit args beat the file's JSON config,
    which beats the model's timm defaults. `arch` may be None when a JSON config beside the weights names it."""
    return _build(arch, weights, image_size=image_size, resize=resize, device=device)


def backbone_from_metadata(meta: Mapping[str, Any], device: str = "cpu") -> Backbone:
    """Rebuild the backbone a table was embedded with; CytoError if its fingerprint no longer matches."""
    if meta.get("weights") == "external":  # imported vectors (`import h5`): no model here to rebuild
        raise CytoError(external_message(dict(meta)))
    try:
        arch, weights, expected = meta["arch"], meta["weights"], meta["fingerprint"]
        preprocessing = Preprocessing.from_dict(dict(meta["preprocessing"]))
    except (KeyError, TypeError) as e:
        raise CytoError(f"table metadata does not describe a backbone (missing or bad {e}): re-embed the table") from e
    try:
        backbone = _build(arch, weights, preprocessing=preprocessing, device=device)
    except CytoError as e:
        raise CytoError(f"cannot rebuild the backbone this table was embedded with: {e}") from e
    if backbone.fingerprint != expected:
        if weights in KEYWORD_WEIGHTS:
            what = f"{arch} with {weights} weights no longer matches the table (timm or torch version changed?)"
        else:
            what = f"weights file {weights} changed since the table was embedded"
        raise CytoError(
            f"{what}: fingerprint {backbone.fingerprint[:16]} now vs {str(expected)[:16]} in the table;"
            " restore the file or re-embed"
        )
    return backbone


def with_stain(backbone: Backbone, stain: str | None, target: str | Path | Sequence[float] | None = None) -> Backbone:
    """`backbone` with stain normaliser `stain` (`models.stain`; none: without one) in its preprocessing and its
    fingerprint recomputed, so tables of differently normalised vectors never mix. `target`: the normaliser's
    target numbers, an image file to fit them on, or None for its shipped default. The same backbone when
    nothing changes."""
    from dataclasses import replace

    from cytoretrieve.models.stain import NONE, check_stain, fit_target

    name = check_stain(stain)
    if target is not None and name == NONE:
        raise CytoError("`stain_target` needs a `stain` normaliser (macenko, reinhard), not none")
    if isinstance(target, str | Path):
        path = Path(target).expanduser()
        if not path.is_file():
            raise CytoError(f"`stain_target` image not found: {path}")
        target = fit_target(name, _read_rgb(path))
    preprocessing = replace(backbone.preprocessing, stain=name, stain_target=tuple(target or ()))
    if preprocessing == backbone.preprocessing:
        return backbone
    return replace(backbone, preprocessing=preprocessing,
                   fingerprint=fingerprint(backbone.model, backbone.arch, preprocessing))


def _read_rgb(path: Path) -> np.ndarray:
    """The image file as an RGB uint8 array; a one-line CytoError when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(to_rgb(im))
    except (OSError, UnidentifiedImageError) as e:
        raise CytoError(f"cannot read the `stain_target` image {path}: {str(e).splitlines()[0]}") from e


def fingerprint(model: torch.nn.Module, arch: str, preprocessing: Preprocessing) -> str:
    """sha256 (hex) of arch, preprocessing and every state-dict tensor (name, dtype, shape, raw bytes). A stain
    normaliser enters through the preprocessing; without one the header is what it was before stains existed."""
    digest = hashlib.sha256()
    header = {"arch": arch, "preprocessing": preprocessing.to_dict()}
    digest.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"\n{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


# --- building -------------------------------------------------------------------------------------------


def _build(
    arch: str | None,
    weights: str | None,
    *,
    image_size: int | None = None,
    resize: str | None = None,
    device: str = "cpu",
    preprocessing: Preprocessing | None = None,
) -> Backbone:
    """Shared by `load_backbone` and `backbone_from_metadata` (which passes the stored preprocessing)."""
    device = resolve_device(device)
    weights = "timm" if weights is None else str(weights)
    if preprocessing is not None:
        image_size = preprocessing.size
    path, from_config = None, {}
    if weights in KEYWORD_WEIGHTS:
        arch = _check_arch(arch)
    else:
        path = _weights_path(weights)
        config = _read_config(path)
        arch = _check_arch(_arch_for_file(arch, config, path))
        from_config = _config_preprocessing(config, path)
    # a ViT is built at the size its weights were trained at (the JSON's); dynamic_img_size handles image_size
    create_size = from_config.get("size") or image_size
    model = create_model(arch, pretrained=weights == "timm", img_size=create_size)
    if path is not None:
        _load_weights(model, _read_state_dict(path), path, arch)
    model.eval()
    if preprocessing is None:
        preprocessing = _resolve_preprocessing(model, create_size, from_config, image_size, resize)
    digest = fingerprint(model, arch, preprocessing)
    dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return Backbone(
        arch=arch,
        model=model.to(device),
        preprocessing=preprocessing,
        weights=str(path) if path is not None else weights,
        fingerprint=digest,
        dim=dim,
    )


def _check_arch(arch: str | None) -> str:
    """The arch if timm knows it (pretrained tags allowed), else a CytoError with close matches."""
    if not arch:
        raise CytoError("no backbone architecture given: name one (`backbone` for embed, `arch` for train), e.g. resnet50")
    if arch.startswith("local-dir:"):
        return resolve_local_dir(arch)
    if arch.startswith(_HUB_PREFIXES) or timm.is_model(arch):
        return arch
    family = re.match(r"[a-z]*", arch.lower()).group(0) or "resnet"
    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise CytoError(f"unknown backbone {arch!r}: not a timm model (try `timm.list_models('*{family}*')`){hint}")


def create_model(arch: str, *, pretrained: bool = False, img_size: int | None = None, drop_path_rate: float = 0.0,
                 seed: int | None = RANDOM_SEED) -> torch.nn.Module:
    """The one timm.create_model of the package (embedding and DINO training), with num_classes=0.

    Fixed-size models (ViTs) get img_size and, where they take it, dynamic_img_size (so one model serves any
    input size). A random init is drawn under a forked RNG seeded with `seed` (reproducible, the caller's RNG
    untouched); `seed` None draws it from the caller's RNG (the trainer: the run's seed decides the init).
    An unknown arch, a failed pretrained download or a drop-path rate the model does not take is a CytoError.
    """
    arch = _check_arch(arch)
    kwargs: dict[str, Any] = {"drop_path_rate": float(drop_path_rate)} if drop_path_rate else {}
    cfg = None if arch.startswith(_HUB_PREFIXES) else get_pretrained_cfg(arch)
    if cfg is not None and cfg.fixed_input_size:
        kwargs.update(img_size=img_size, dynamic_img_size=True)
    kwargs.update(encoder_kwargs(arch))  # foundation models: what their config.json cannot hold (foundation.py)
    needs_hub = hub_id(arch) is not None or (pretrained and not arch.startswith("local-dir:"))
    offline = needs_hub and _go_offline_when_hub_unreachable()
    try:
        try:
            return _seeded_create(arch, pretrained, kwargs, seed)
        except TypeError as e:  # BEiT, CaiT, LeViT, ... have no dynamic_img_size
            if "dynamic_img_size" not in str(e):
                raise
            kwargs.pop("dynamic_img_size")
            return _seeded_create(arch, pretrained, kwargs, seed)
    except TypeError as e:
        if "drop_path_rate" not in str(e):
            raise
        raise CytoError(f"{arch} takes no drop-path rate: pass `drop_path` 0") from e
    except OSError as e:  # huggingface_hub and urllib errors are OSErrors
        if hub_id(arch) is not None:  # gated, missing or unreachable: say how to log in or use a local copy
            raise CytoError(hub_failure(arch, e, offline)) from e
        if arch.startswith("local-dir:"):
            raise CytoError(f"`backbone` {arch}: {_first_line(e)}") from e
        if not pretrained:
            raise
        why = "huggingface.co is unreachable and they are not in the local cache" if offline else "offline?"
        raise CytoError(
            f"could not fetch pretrained weights for {arch} ({why}): pass `weights` FILE or `weights` random"
        ) from e
    except RuntimeError as e:
        if pretrained and arch.startswith(_HUB_PREFIXES) and "state_dict" in str(e):
            detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), _first_line(e))
            raise CytoError(f"the weights of {arch} do not fit the model built from its config.json ({detail}): "
                            "it may need creation kwargs config.json cannot hold (cytoretrieve.models.foundation.REGISTRY)") from e
        if not (pretrained and "pretrained" in str(e).lower()):
            raise
        raise CytoError(f"timm has no pretrained weights for {arch}: pass `weights` FILE or `weights` random") from e


def _go_offline_when_hub_unreachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Without a connection to the Hugging Face Hub, switch huggingface_hub to offline mode (HF_HUB_OFFLINE):
    cached weights still load, and missing ones fail at once instead of after ~45 s of retries. True if switched."""
    import socket

    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        return True
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return False
    except OSError:
        hub.HF_HUB_OFFLINE = True
        return True


def _seeded_create(arch: str, pretrained: bool, kwargs: dict[str, Any], seed: int | None) -> torch.nn.Module:
    """Create under a forked CPU RNG seeded with `seed` (None: in the caller's RNG stream)."""
    if seed is None:
        return timm.create_model(arch, pretrained=pretrained, num_classes=0, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(arch, pretrained=pretrained, num_classes=0, **kwargs)


def _resolve_preprocessing(
    model: torch.nn.Module,
    create_size: int | None,
    config: Mapping[str, Any],
    image_size: int | None,
    resize: str | None,
) -> Preprocessing:
    """Explicit args > JSON config beside the weights > the model's timm data config."""
    data = timm.data.resolve_model_data_config(model)
    interpolation = data.get("interpolation", "bicubic")
    merged: dict[str, Any] = {
        "size": create_size or int(data["input_size"][-1]),
        "mean": tuple(data["mean"]),
        "std": tuple(data["std"]),
        "interpolation": interpolation if interpolation in INTERPOLATIONS else "bicubic",
        "resize": "letterbox",
    }
    merged.update(config)
    merged.update({k: v for k, v in (("size", image_size), ("resize", resize)) if v is not None})
    return Preprocessing.from_dict(merged)


# --- weight files ---------------------------------------------------------------------------------------


def _weights_path(weights: str) -> Path:
    path = Path(weights).expanduser()
    if not path.exists():
        raise CytoError(f"weights file not found: {path} (or use `weights` timm / `weights` random)")
    if not path.is_file():
        raise CytoError(f"weights path is not a file: {path}")
    return path.resolve()


def _read_config(path: Path) -> dict[str, Any]:
    """The JSON config beside a .safetensors file (same stem), as written by the DINO trainer's export; or {}."""
    if path.suffix.lower() != ".safetensors":
        return {}
    config_path = path.with_suffix(".json")
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CytoError(f"could not read backbone config {config_path}: {_first_line(e)}") from e
    if not isinstance(config, dict):
        raise CytoError(f"backbone config {config_path} must be a JSON object with arch and preprocessing")
    return config


def _config_preprocessing(config: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The (possibly partial) preprocessing of a JSON config; its size must be usable to build the model."""
    preprocessing = config.get("preprocessing") or {}
    if not isinstance(preprocessing, dict):
        raise CytoError(f"'preprocessing' in the config beside {path} must be a JSON object")
    size = preprocessing.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise CytoError(f"preprocessing size in the config beside {path} must be a positive integer, got {size!r}")
    return preprocessing


def _arch_for_file(arch: str | None, config: Mapping[str, Any], path: Path) -> str:
    """The given arch, checked against the JSON config's; or the config's when none is given."""
    config_arch = config.get("arch")
    if not arch:
        if not config_arch:
            raise CytoError(f"no arch given for {path} and no {path.with_suffix('.json').name} beside it: name the architecture (`backbone` / `arch`)")
        return str(config_arch)
    if config_arch and str(config_arch).split(".")[0] != arch.split(".")[0]:
        raise CytoError(
            f"weights {path} are for {config_arch} (per {path.with_suffix('.json').name}), not {arch}:"
            " drop the architecture option or fix it"
        )
    return arch


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors by name from a .safetensors file or a weights_only torch checkpoint (never a full unpickle)."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path))
        except Exception as e:  # SafetensorError, OSError, ... on a corrupt or foreign file
            raise CytoError(f"could not read safetensors weights {path}: {_first_line(e)}") from e
    if suffix not in CHECKPOINT_SUFFIXES:
        raise CytoError(f"unsupported weights file {path}: expected .safetensors, {', '.join(CHECKPOINT_SUFFIXES)}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused is None:  # garbage bytes fail in the same unpickler
            raise CytoError(f"could not read checkpoint {path}: not a torch checkpoint (or a corrupt one)") from e
        raise CytoError(
            f"refusing to unpickle {path}: it holds Python objects besides tensors ({refused.group(1)}) and only"
            " weights_only loading is allowed; re-save it with torch.save(model.state_dict(), ...) or as .safetensors"
        ) from e
    except Exception as e:  # truncated zip, not a checkpoint at all, ...
        raise CytoError(f"could not read checkpoint {path}: {_first_line(e)}") from e
    return _find_state_dict(checkpoint, path)


def _find_state_dict(checkpoint: Any, path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict, or one under 'teacher' (DINO: the teacher is the model to use), 'state_dict' or 'model'."""
    node = checkpoint
    while isinstance(node, Mapping):
        if node and all(isinstance(v, torch.Tensor) for v in node.values()):
            return {str(k): v for k, v in node.items()}
        key = next((k for k in ("teacher", "state_dict", "model") if isinstance(node.get(k), Mapping)), None)
        if key is None:
            break
        node = node[key]
    found = ", ".join(map(str, list(checkpoint)[:6])) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise CytoError(
        f"no state dict in {path} (found: {found}): expected tensors by name or a 'teacher'/'state_dict'/'model' entry"
    )


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    """Strip wrapper prefixes, keep the backbone of a backbone+head wrapper, drop classifier keys, load strictly."""
    expected = model.state_dict()
    state = {_strip(k, _WRAPPER_PREFIXES): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state) and not any(k.startswith("backbone.") for k in expected):
        state = {_strip(k[9:], _WRAPPER_PREFIXES): v for k, v in state.items() if k.startswith("backbone.")}
    heads = _classifier_prefixes(model)
    state = {k: v for k, v in state.items() if k in expected or not k.startswith(heads)}

    # old BatchNorm checkpoints lack num_batches_tracked; torch fills it in, so it is not "missing"
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        hint = ""
        if any(m.startswith("pos_embed:") for m in mismatched):
            hint = "; a ViT's pos_embed fits the image size it was trained at: pass that `image_size`"
        raise CytoError(
            f"weights {path} do not fit {arch}: {len(missing)} missing{_examples(missing)},"
            f" {len(unexpected)} unexpected{_examples(unexpected)},"
            f" {len(mismatched)} shape mismatches{_examples(mismatched)} (file vs model){hint}"
        )
    model.load_state_dict(state, strict=True)


def _classifier_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    """Key prefixes of classifier / DINO projection heads, dropped unless the num_classes=0 model has them."""
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = {"head", "fc", *([classifier] if isinstance(classifier, str) else classifier)}
    return tuple(f"{name}." for name in sorted(names))


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    while key.startswith(prefixes):
        key = key[len(next(p for p in prefixes if key.startswith(p))) :]
    return key


def _examples(items: list[str], n: int = 3) -> str:
    return f" (e.g. {', '.join(items[:n])})" if items else ""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
