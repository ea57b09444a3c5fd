"""The CUDA paths, run only where a GPU is present (CI has none; a session lent a device runs this file there):
bf16 autocast + channels_last training, torch.compile, nccl under torchrun, embedding and MIL scoring on the GPU.
Self-contained (drawn cells, no ../shared data), so it runs on a bare GPU machine: see benchmarks/device_check.sh.

    .venv/bin/python -m pytest -q tests/test_gpu.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = dict(arch="resnet18", image_size=64, out_dim=256, hidden_dim=256, workers=2, device="cuda")


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    """64 drawn Pap cells in class folders (cytoretrieve.sources.cells.synthetic, the demo's cells)."""
    from cytoretrieve.sources.cells.synthetic import make_cells

    return make_cells(tmp_path_factory.mktemp("cells"), per_class=8, size=64)


def _losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [s["loss"] for s in lines if "loss" in s and "event" not in s]


def test_bf16_channels_last_run_lowers_the_loss(cells: Path, tmp_path: Path) -> None:
    from cytoretrieve.train.config import make_config
    from cytoretrieve.train.loop import train

    config = make_config([cells], tmp_path / "run", **TINY, batch_size=16, epochs=6, optimizer="adamw", lr=0.05,
                         warmup_epochs=0, freeze_last_layer=0, momentum_teacher=0.9)
    assert config.precision in ("auto", "bf16")
    report = train(config)
    losses = _losses(tmp_path / "run")
    assert report.finished and all(np.isfinite(losses))
    assert sum(losses[-2:]) / 2 < 0.8 * losses[0], losses


def test_compiled_backbone_trains(cells: Path, tmp_path: Path) -> None:
    from cytoretrieve.train.config import make_config
    from cytoretrieve.train.loop import train

    report = train(make_config([cells], tmp_path / "run", **TINY, batch_size=16, epochs=1, max_steps=2,
                               compile=True))
    assert report.steps == 2 and all(np.isfinite(_losses(tmp_path / "run")))


def test_torchrun_nccl_process_trains_and_exports(cells: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "cytoretrieve",
           "train", "--data", str(cells), "--arch", "resnet18", "--image-size", "64", "--out-dim", "256",
           "--hidden-dim", "256", "--batch-size", "16", "--epochs", "1", "--device", "cuda", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "NCCL_DEBUG": "WARN"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "checkpoint.pth").exists() and _losses(out)


def test_embedding_on_the_gpu_matches_the_cpu(cells: Path) -> None:
    from PIL import Image

    from cytoretrieve.models.backbones import load_backbone
    from cytoretrieve.models.inference import embed_images

    backbone = load_backbone("resnet18", "random", image_size=64)
    images = [Image.open(p).convert("RGB") for p in sorted(cells.rglob("*.png"))[:8]]
    assert len(images) == 8
    cpu, gpu = embed_images(backbone, images, "cpu"), embed_images(backbone, images, "cuda")
    cos = (cpu * gpu).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu, axis=1)
    assert cpu.shape == gpu.shape and cos.min() > 0.999


def test_mil_model_trains_on_the_gpu() -> None:
    from cytoretrieve.queries.mil.metrics import auc
    from cytoretrieve.queries.mil.train import MILTrainConfig as TrainConfig
    from cytoretrieve.queries.mil.train import fit
    from helpers.mil_synthetic import synthetic_bags

    train_bags, _ = synthetic_bags(60, seed=0)
    test_bags, _ = synthetic_bags(40, seed=1)
    scorer = fit(train_bags, TrainConfig(method="gated", epochs=30, lr=2e-3, device="cuda"))
    p, _ = scorer.predict(test_bags.vectors)
    assert scorer.device == "cuda" and auc(test_bags.y, p) >= 0.9


def test_retrieval_centroids_search_on_the_gpu() -> None:
    """With faiss-gpu, references = centroids puts its k-means and both sides' flat indexes on GPU 0."""
    from cytoretrieve.store.ann import gpu_available

    if not gpu_available():
        pytest.skip("needs faiss-gpu")
    sys.path.insert(0, str(Path(__file__).parent / "queries"))
    from test_mil_retrieval import _cohort

    from cytoretrieve.queries.mil.bags import Bags
    from cytoretrieve.queries.mil.metrics import auc
    from cytoretrieve.queries.mil.retrieval import RetrievalConfig, fit_retrieval

    train, y = _cohort(40, seed=0)
    test, y_test = _cohort(20, seed=1)
    bags = Bags(names=[f"s{i}" for i in range(len(train))], y=y.astype(np.int8), vectors=train)
    scorer = fit_retrieval(bags, config=RetrievalConfig(k=5, top_m=3, references="centroids", centroids=48, rank=16,
                                                        exact_max=1000))
    assert "Gpu" in type(scorer.pos.index).__name__ and "Gpu" in type(scorer.neg.index).__name__
    s, _ = scorer.predict(test)
    assert auc(y_test, s) == 1.0
