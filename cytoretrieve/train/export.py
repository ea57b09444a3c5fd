"""Checkpoint -> `X.safetensors` (the teacher's backbone, as DINO recommends) + `X.json`
`{"arch", "preprocessing", "dino": {...}}`, which `cytoretrieve.models.backbones.load_backbone(None, "X.safetensors")`
and `cytoretrieve embed --weights X.safetensors` read; the backbone fingerprint then ties embeddings to it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch

from cytoretrieve.errors import CytoError
from cytoretrieve.models.preprocess import RESIZES, Preprocessing
from cytoretrieve.train import checkpoint as ckpt

WHICH = ("teacher", "student")


@dataclass
class ExportReport:
    weights: str
    config: str
    arch: str
    fingerprint: str
    dim: int
    tensors: int
    epoch: int
    step: int


def export(checkpoint: str | Path, out: str | Path, *, which: str = "teacher", resize: str = "letterbox",
           image_size: int | None = None) -> ExportReport:
    """Write the backbone of `which` network to `out` (.safetensors) and its JSON config beside it, then load it
    back through `load_backbone` (the path `embed` takes) to check it and report its fingerprint."""
    from cytoretrieve.models.backbones import load_backbone

    if which not in WHICH:
        raise CytoError(f"unknown network {which!r}: use teacher (DINO's choice) or student")
    if resize not in RESIZES:
        raise CytoError(f"unknown resize policy {resize!r}: use one of {', '.join(RESIZES)}")
    out = Path(out).expanduser()
    if out.suffix.lower() != ".safetensors":
        raise CytoError(f"`out` must end with .safetensors (the JSON config goes beside it), got {out.name}")
    state = ckpt.load(Path(checkpoint).expanduser())
    args = state.get("args") or {}
    try:
        arch, size = str(args["arch"]), int(image_size or args["image_size"])
        mean, std = list(args["mean"]), list(args["std"])
    except (KeyError, TypeError, ValueError) as e:
        raise CytoError(f"checkpoint {checkpoint} lacks the run's arguments ({e}): cannot tell the architecture") from e
    tensors = {k[len("backbone."):]: v.detach().cpu().contiguous().clone()
               for k, v in state[which].items() if k.startswith("backbone.")}
    if not tensors:
        raise CytoError(f"checkpoint {checkpoint} has no {which} backbone weights")
    preprocessing = Preprocessing(size=size, mean=tuple(mean), std=tuple(std), interpolation="bicubic", resize=resize)
    config = {
        "arch": arch,
        "preprocessing": preprocessing.to_dict(),
        "dino": {
            "network": which,
            "checkpoint": str(Path(checkpoint).expanduser().resolve()),
            "epoch": int(state.get("epoch", 0)),
            "step": int(state.get("step", 0)),
            "recipe": args.get("recipe"),
            "epochs": args.get("epochs"),
            "data": args.get("data"),
            "split": args.get("split"),
            "fold": args.get("fold"),
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(out), metadata={"format": "pt", "arch": arch})
    out.chmod(0o644)  # safetensors writes 0600; weights are meant to be shared (another user's embed reads them)
    config_path = out.with_suffix(".json")
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    backbone = load_backbone(None, str(out))  # the exact path `embed --weights` takes
    return ExportReport(weights=str(out), config=str(config_path), arch=arch, fingerprint=backbone.fingerprint,
                        dim=backbone.dim, tensors=len(tensors), epoch=config["dino"]["epoch"],
                        step=config["dino"]["step"])
