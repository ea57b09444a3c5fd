"""The short-CPU-run recipe (`--recipe tiny`): what it sets, and that flags still override it."""

from __future__ import annotations

from pathlib import Path

import pytest

from cytoretrieve.errors import CytoError
from cytoretrieve.train.config import RECIPES, make_config


def test_tiny_recipe_is_the_resnet50_recipe_made_short(tmp_path: Path) -> None:
    config = make_config([str(tmp_path)], str(tmp_path / "run"), recipe="tiny")
    assert (config.recipe, config.arch, config.image_size, config.batch_size) == ("tiny", "resnet18", 64, 64)
    assert (config.epochs, config.warmup_epochs, config.out_dim) == (10, 1, 1024)
    assert config.momentum_teacher == 0.99 and config.global_scale == (0.3, 1.0)
    assert (config.teacher_temp, config.warmup_teacher_temp) == (0.02, 0.02)  # sharper than resnet50's 0.04
    assert (config.colour_strength, config.grayscale_p) == (0.25, 0.0)  # stain colour kept
    changed = {"arch", "image_size", "epochs", "batch_size", "out_dim", "momentum_teacher", "warmup_epochs",
               "global_scale", "teacher_temp", "warmup_teacher_temp", "colour_strength", "grayscale_p"}
    assert {k: v for k, v in RECIPES["tiny"].items() if k not in changed} == \
        {k: v for k, v in RECIPES["resnet50"].items() if k not in changed}  # SGD, lr, wd, temperatures: resnet50's


def test_flags_override_the_tiny_recipe(tmp_path: Path) -> None:
    config = make_config([str(tmp_path)], str(tmp_path / "run"), recipe="tiny", epochs=12, momentum_teacher=0.996)
    assert (config.epochs, config.momentum_teacher, config.arch) == (12, 0.996, "resnet18")


def test_other_recipes_keep_dinos_colour_augmentation(tmp_path: Path) -> None:
    for name in ("resnet50", "vit_small"):
        config = make_config([str(tmp_path)], str(tmp_path / name), recipe=name)
        assert (config.colour_strength, config.grayscale_p) == (1.0, 0.2)


@pytest.mark.parametrize("bad", [{"colour_strength": -0.1}, {"grayscale_p": 1.5}])
def test_bad_colour_knobs_are_one_line_errors(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(CytoError, match=next(iter(bad))):
        make_config([str(tmp_path)], str(tmp_path / "run"), recipe="tiny", **bad)
