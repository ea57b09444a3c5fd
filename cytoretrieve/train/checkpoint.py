"""Training checkpoints that load with `torch.load(weights_only=True)`: tensors, dicts, lists, numbers and
strings only (RNG states as tensors, the run's arguments as a plain dict). Written atomically (temp file +
rename), so a crash while saving leaves the previous checkpoint intact."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cytoretrieve.errors import CytoError

FORMAT = "cytoretrieve-dino"
VERSION = 1
LAST = "checkpoint.pth"


def rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and Python RNG states, as tensors."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": torch.tensor(list(py_state[1]), dtype=torch.int64),
        "python_gauss": [] if py_state[2] is None else [float(py_state[2])],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    pos, has_gauss, cached = state["numpy_meta"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    gauss = state["python_gauss"][0] if state["python_gauss"] else None
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), gauss))


def save(checkpoint: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save({"format": FORMAT, "version": VERSION, **checkpoint}, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any]:
    """A training checkpoint, weights_only; CytoError when the file is missing, foreign or corrupt."""
    if not path.is_file():
        raise CytoError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CytoError(f"could not read checkpoint {path}: {first}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CytoError(f"{path} is not a cytoretrieve DINO checkpoint (no format={FORMAT!r} entry)")
    if int(ckpt.get("version", 0)) > VERSION:
        raise CytoError(f"{path} was written by a newer cytoretrieve (checkpoint version {ckpt['version']})")
    return ckpt
