"""Inference on a batch of images with a backbone: one place for the device move, channels_last and autocast, used by
the embed job (`jobs/embed.py`), `search` and the viewer (a query image) alike."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from cytoretrieve.models.backbones import Backbone
from cytoretrieve.runtime import is_cnn, resolve_device


def prepare(backbone: Backbone, device: str) -> torch.nn.Module:
    """Move the model to `device` in eval mode, channels_last for CNNs."""
    model = backbone.model.to(device).eval()
    if is_cnn(model):
        model = model.to(memory_format=torch.channels_last)
    return model


def forward(model: torch.nn.Module, batch: torch.Tensor, device: str) -> np.ndarray:
    """Embed one preprocessed batch: inference_mode, channels_last for CNNs, bf16 autocast on CUDA only."""
    batch = batch.to(device, non_blocking=True)
    if is_cnn(model):
        batch = batch.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        out = model(batch)
    return out.float().cpu().numpy()


def embed_images(backbone: Backbone, images: Sequence[Image.Image], device: str = "cpu") -> np.ndarray:
    """Embed PIL images directly (a query image for `search` or the viewer), no job, no store."""
    device = resolve_device(device)
    model = prepare(backbone, device)
    return forward(model, torch.stack([backbone.preprocessing(im) for im in images]), device)
