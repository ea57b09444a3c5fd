"""The short-CPU-run recipe (`--recipe tiny`): what it sets, and that flags still override it."""

from __future__ import annotations

from pathlib import Path

from cytoretrieve.train.config import RECIPES, make_config


def test_tiny_recipe_is_the_resnet50_recipe_made_short(tmp_path: Path) -> None:
    config = make_config([str(tmp_path)], str(tmp_path / "run"), recipe="tiny")
    assert (config.recipe, config.arch, config.image_size, config.batch_size) == ("tiny", "resnet18", 64, 64)
    assert (config.epochs, config.warmup_epochs, config.out_dim) == (6, 1, 1024)
    assert config.momentum_teacher == 0.99 and config.global_scale == (0.3, 1.0)
    changed = {"arch", "image_size", "epochs", "batch_size", "out_dim", "momentum_teacher", "warmup_epochs",
               "global_scale"}
    assert {k: v for k, v in RECIPES["tiny"].items() if k not in changed} == \
        {k: v for k, v in RECIPES["resnet50"].items() if k not in changed}  # SGD, lr, wd, temperatures: resnet50's


def test_flags_override_the_tiny_recipe(tmp_path: Path) -> None:
    config = make_config([str(tmp_path)], str(tmp_path / "run"), recipe="tiny", epochs=12, momentum_teacher=0.996)
    assert (config.epochs, config.momentum_teacher, config.arch) == (12, 0.996, "resnet18")
