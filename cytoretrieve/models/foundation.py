"""Pathology foundation models as backbones: the timm kwargs some of them need, keyed by name, and the messages
for the ways reaching them fails.

`--backbone hf-hub:ORG/NAME` (or `local-dir:PATH`, a folder in timm's hub layout: `config.json` +
`model.safetensors`) goes to `timm.create_model`, which reads the architecture, its serialisable arguments and the
preprocessing (input size, mean, std) from `config.json`. Some models also need arguments a JSON file cannot hold
(`mlp_layer=SwiGLUPacked`, `act_layer=SiLU`) or that their cards ask for (`init_values`, `reg_tokens`): those
come from `REGISTRY`, looked up by hub id; a local copy finds its entry through the hub id its `config.json`
records or, failing that, its folder's name (`.../UNI2-h`). The kwargs are those of the models' own loading code
(their model cards, and TRIDENT's `patch_encoder_models/load.py`).

No entry needs torch or timm to be listed (the README table, `cytoretrieve --help`); the kwargs are built when a
model is created.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cytoretrieve.errors import CytoError

HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


def _swiglu() -> dict[str, Any]:
    """The SwiGLU MLP of UNI2-h and Virchow / Virchow2 (not serialisable: absent from their config.json)."""
    import timm.layers
    import torch

    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}


@dataclass(frozen=True)
class FoundationModel:
    """One encoder users reach for: its hub id, the extra timm kwargs, and what the README table says of it."""

    name: str
    hub: str  # ORG/NAME on the Hugging Face Hub
    kwargs: dict[str, Any]
    layers: Callable[[], dict[str, Any]] | None = None  # kwargs that are classes (built on use)
    input_size: int = 224
    dim: int = 0  # timm's pooled output (what cytoretrieve stores)
    note: str = ""

    def timm_kwargs(self) -> dict[str, Any]:
        return {**self.kwargs, **(self.layers() if self.layers else {})}


REGISTRY: dict[str, FoundationModel] = {m.hub.lower(): m for m in (
    FoundationModel("UNI", "MahmoodLab/UNI", {"init_values": 1e-5, "dynamic_img_size": True}, dim=1024),
    FoundationModel("UNI2-h", "MahmoodLab/UNI2-h",
                    {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                     "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8,
                     "dynamic_img_size": True}, _swiglu, dim=1536),
    FoundationModel("Virchow2", "paige-ai/Virchow2",
                    {"init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375, "dynamic_img_size": True}, _swiglu,
                    dim=1280, note="the card's embedding is the class token + mean patch token (2560-d); "
                                   "cytoretrieve stores timm's pooled output, the class token (1280-d)"),
    FoundationModel("H-optimus-0", "bioptimus/H-optimus-0", {"init_values": 1e-5, "dynamic_img_size": True}, dim=1536),
    FoundationModel("H-optimus-1", "bioptimus/H-optimus-1", {"init_values": 1e-5, "dynamic_img_size": True}, dim=1536),
    FoundationModel("Prov-GigaPath", "prov-gigapath/prov-gigapath", {}, dim=1536),
)}


def hub_id(arch: str) -> str | None:
    """ORG/NAME of an `hf-hub:` name (revision dropped), None for anything else."""
    for prefix in ("hf-hub:", "hf_hub:"):
        if arch.startswith(prefix):
            return arch[len(prefix):].split("@")[0]
    return None


def _local_entry(folder: Path) -> FoundationModel | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    pretrained = config.get("pretrained_cfg") if isinstance(config, dict) else None
    recorded = (pretrained or {}).get("hf_hub_id") if isinstance(pretrained, dict) else None
    if recorded and str(recorded).lower() in REGISTRY:
        return REGISTRY[str(recorded).lower()]
    return next((m for m in REGISTRY.values() if m.hub.split("/")[1].lower() == folder.name.lower()), None)


def lookup(arch: str) -> FoundationModel | None:
    """The registry entry of an `hf-hub:` or `local-dir:` backbone name, if it has one."""
    hub = hub_id(arch)
    if hub is not None:
        return REGISTRY.get(hub.lower())
    if arch.startswith("local-dir:"):
        return _local_entry(Path(arch[len("local-dir:"):]))
    return None


def encoder_kwargs(arch: str) -> dict[str, Any]:
    """The extra `timm.create_model` kwargs of a foundation model ({} for any other name)."""
    entry = lookup(arch)
    return entry.timm_kwargs() if entry else {}


def resolve_local_dir(arch: str) -> str:
    """`local-dir:PATH` with PATH made absolute (so a table's metadata works from any folder); a folder that is
    not in timm's hub layout is a CytoError naming what is missing."""
    folder = Path(arch[len("local-dir:"):]).expanduser()
    if not folder.is_dir():
        raise CytoError(f"`backbone` {arch}: no folder {folder} (a local copy in timm's hub layout: "
                        "config.json + model.safetensors)")
    if not (folder / "config.json").is_file():
        raise CytoError(f"`backbone` {arch}: no config.json in {folder} (timm's hub layout: config.json + "
                        "model.safetensors, as `huggingface-cli download ORG/NAME --local-dir` writes it)")
    return f"local-dir:{folder.resolve()}"


def hub_failure(arch: str, error: BaseException, offline: bool) -> str:
    """One line for a hub model that could not be reached: gated, missing, or no connection."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    local = "or download it once and pass `backbone` local-dir:PATH"
    if isinstance(error, GatedRepoError):
        return (f"{arch} is gated: accept its terms on huggingface.co/{hub_id(arch)}, then log in "
                f"(`hf auth login`, or set HF_TOKEN), {local}")
    if isinstance(error, RepositoryNotFoundError):
        return (f"{arch}: no such model on the Hugging Face Hub, or it is private or gated and you are not logged "
                f"in (`hf auth login`, or set HF_TOKEN); check the name, {local}")
    why = "huggingface.co is unreachable and it is not in the local cache" if offline else "offline?"
    return f"could not fetch {arch} ({why}): log in if it is gated (`hf auth login` / HF_TOKEN), {local}"


def external_message(meta: dict[str, Any]) -> str:
    """Why a table of imported vectors cannot embed a query image."""
    return (f"this table's vectors come from an external encoder ({meta.get('arch')}, imported from "
            f"{(meta.get('external') or {}).get('source', 'outside')}): search by image needs that encoder, "
            "so query by a stored row with `id` (or embed your images with that model into a table of your own)")
