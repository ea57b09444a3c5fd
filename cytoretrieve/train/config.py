"""Every hyperparameter of a run, the two recipes that fill their defaults, and what may change on resume.

Recipes (official DINO README / main_dino.py defaults, with 0 local crops as in the paper):
- `vit_small` (ViT-S/16): AdamW, lr 5e-4 (x batch/256), min lr 1e-6, 10 warm-up epochs, weight decay 0.04 -> 0.4
  (cosine), teacher temperature 0.04 -> 0.07 over 30 epochs, norm_last_layer false, teacher momentum 0.996,
  drop-path 0.1, batch 192.
- `resnet50`: SGD (momentum 0.9), lr 0.03, weight decay 1e-4 constant, teacher temperature 0.04, norm_last_layer
  true, teacher momentum 0.9995, no drop-path, batch 256.
Both: 300 epochs, out_dim 65536, head 3 layers (hidden 2048, bottleneck 256), student temperature 0.1, centre
momentum 0.9, clip 3.0, last layer frozen for 1 epoch, 2 global crops at 224 with scale (0.14, 1); local crops
(none by default) at 96 px with scale (0.05, 0.4), (0.05, 0.14) for resnet50.

Each default is declared once: views in `ViewSpec`, copy-paste in `PasteSpec`, the rest in `RECIPES`;
`TrainConfig`'s field defaults are read from those.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cytoretrieve.errors import CytoError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewSpec:
    """How views are made: DINO's defaults (local crops at scale 0.05-0.4) and the cytology additions. The
    one declaration of these settings: `TrainConfig` and the recipes take their defaults from here."""

    image_size: int = 224
    global_scale: tuple[float, float] = (0.14, 1.0)  # DINO's advice without local crops (with them: 0.4-1)
    local_crops: int = 0
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    rot90: bool = True
    vflip: bool = True
    hed_jitter: float = 0.0
    colour_strength: float = 1.0  # x DINO's saturation (0.2) and hue (0.1) jitter; brightness, contrast stay 0.4
    grayscale_p: float = 0.2  # DINO's; stain colour carries much of a Pap cell's class, so tiny turns it off


@dataclass(frozen=True)
class PasteSpec:
    """Paste 1..max_cells cells with probability p; a cell's longer side becomes U(scale) x the tile's shorter side."""

    p: float = 0.5
    max_cells: int = 3
    scale: tuple[float, float] = (0.1, 0.4)


VIEW_FIELDS = tuple(f.name for f in dataclasses.fields(ViewSpec))  # TrainConfig fields of the same names
_VIEWS = {f.name: f.default for f in dataclasses.fields(ViewSpec)}

COMMON: dict[str, Any] = {
    **_VIEWS,
    "epochs": 300,
    "out_dim": 65536,
    "hidden_dim": 2048,
    "bottleneck_dim": 256,
    "head_layers": 3,
    "use_bn_in_head": False,
    "warmup_teacher_temp": 0.04,
    "student_temp": 0.1,
    "center_momentum": 0.9,
    "min_lr": 1e-6,
    "warmup_epochs": 10,
    "clip_grad": 3.0,
    "freeze_last_layer": 1,
}

RECIPES: dict[str, dict[str, Any]] = {
    "vit_small": {
        **COMMON,
        "arch": "vit_small_patch16_224",
        "batch_size": 192,
        "optimizer": "adamw",
        "lr": 5e-4,
        "weight_decay": 0.04,
        "weight_decay_end": 0.4,
        "teacher_temp": 0.07,
        "warmup_teacher_temp_epochs": 30,
        "norm_last_layer": False,
        "momentum_teacher": 0.996,
        "drop_path": 0.1,
    },
    "resnet50": {
        **COMMON,
        "arch": "resnet50",
        "batch_size": 256,
        "optimizer": "sgd",
        "lr": 0.03,
        "weight_decay": 1e-4,
        "weight_decay_end": 1e-4,
        "teacher_temp": 0.04,
        "warmup_teacher_temp_epochs": 0,
        "norm_last_layer": True,
        "momentum_teacher": 0.9995,
        "drop_path": 0.0,
        "local_scale": (0.05, 0.14),  # DINO's ResNet-50 command line
    },
}
# a short CPU run (10 epochs of the 2,121 CRIC crops: ~6 min on 2 idle cores): the resnet50 recipe on resnet18 at
# 64 px with a fast teacher (momentum 0.99), 1 warm-up epoch, a 1024-d head output, batch 64, crops of at least 30%
# of the image; against what limited the 6-epoch version (BENCHMARKS.md, "DINO pre-training against its starting
# point"): a sharper teacher (0.02: at 0.04 its outputs went near-uniform), a quarter of DINO's hue / saturation
# jitter and no grey views (Herlev's classes live in stain colour)
RECIPES["tiny"] = {**RECIPES["resnet50"], "arch": "resnet18", "image_size": 64, "epochs": 10, "batch_size": 64,
                   "out_dim": 1024, "momentum_teacher": 0.99, "warmup_epochs": 1, "global_scale": (0.3, 1.0),
                   "teacher_temp": 0.02, "warmup_teacher_temp": 0.02, "colour_strength": 0.25, "grayscale_p": 0.0}
DEFAULT_RECIPE = "resnet50"
_R = RECIPES[DEFAULT_RECIPE]  # TrainConfig's defaults: the default recipe, declared once above

# may differ between a checkpoint and the command that resumes it (they do not change what is computed)
RUNTIME = ("out", "store", "workers", "device", "precision", "compile", "deterministic", "log_every", "save_every", "max_steps")


@dataclass
class TrainConfig:
    """A run: data, recipe-filled hyperparameters, augmentation, runtime. Plain values only (it is stored in
    checkpoints as a dict and read back with weights_only loading). Every default is the `resnet50` recipe's
    (views: `ViewSpec`'s, copy-paste: `PasteSpec`'s)."""

    data: list[str]
    out: str
    recipe: str = DEFAULT_RECIPE
    arch: str = _R["arch"]
    epochs: int = _R["epochs"]
    batch_size: int = _R["batch_size"]  # global: split evenly over the processes
    split: str | None = None
    fold: int | None = None
    # views
    image_size: int = _R["image_size"]
    global_scale: tuple[float, float] = _R["global_scale"]
    local_crops: int = _R["local_crops"]
    local_size: int = _R["local_size"]
    local_scale: tuple[float, float] = _R["local_scale"]
    rot90: bool = _R["rot90"]
    vflip: bool = _R["vflip"]
    hed_jitter: float = _R["hed_jitter"]
    colour_strength: float = _R["colour_strength"]
    grayscale_p: float = _R["grayscale_p"]
    paste_cells: list[str] = field(default_factory=list)
    paste_p: float = PasteSpec.p
    paste_max: int = PasteSpec.max_cells
    paste_scale: tuple[float, float] = PasteSpec.scale
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # head and loss
    out_dim: int = _R["out_dim"]
    hidden_dim: int = _R["hidden_dim"]
    bottleneck_dim: int = _R["bottleneck_dim"]
    head_layers: int = _R["head_layers"]
    use_bn_in_head: bool = _R["use_bn_in_head"]
    norm_last_layer: bool = _R["norm_last_layer"]
    momentum_teacher: float = _R["momentum_teacher"]
    warmup_teacher_temp: float = _R["warmup_teacher_temp"]
    teacher_temp: float = _R["teacher_temp"]
    warmup_teacher_temp_epochs: int = _R["warmup_teacher_temp_epochs"]
    student_temp: float = _R["student_temp"]
    center_momentum: float = _R["center_momentum"]
    # optimisation
    optimizer: str = _R["optimizer"]
    lr: float = _R["lr"]
    min_lr: float = _R["min_lr"]
    warmup_epochs: int = _R["warmup_epochs"]
    weight_decay: float = _R["weight_decay"]
    weight_decay_end: float = _R["weight_decay_end"]
    clip_grad: float = _R["clip_grad"]
    freeze_last_layer: int = _R["freeze_last_layer"]
    drop_path: float = _R["drop_path"]
    seed: int = 0
    # runtime
    store: str | None = None  # where tile tables named by --data live (default: the CYTORETRIEVE_STORE / indexes)
    workers: int | None = None
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False
    deterministic: bool = False
    log_every: int = 1
    save_every: int = 0  # keep checkpoint_eNNNN.pth every this many epochs (0: only the latest)
    max_steps: int | None = None  # stop (and checkpoint) after this many steps in total

    def views(self) -> ViewSpec:
        """The run's view settings."""
        values = {name: getattr(self, name) for name in VIEW_FIELDS}
        return ViewSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def paste(self) -> PasteSpec:
        """The run's copy-paste settings."""
        return PasteSpec(p=self.paste_p, max_cells=self.paste_max, scale=tuple(self.paste_scale))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(names)
        if unknown:
            raise CytoError(f"unknown training arguments {sorted(unknown)} (written by another cytoretrieve version?)")
        values = {k: tuple(v) if isinstance(v, list) and k not in ("data", "paste_cells") else v for k, v in d.items()}
        return cls(**values)

    def validate(self) -> None:
        if self.recipe not in RECIPES:
            raise CytoError(f"unknown recipe {self.recipe!r}: use {' or '.join(RECIPES)}")
        if self.optimizer not in ("adamw", "sgd"):
            raise CytoError(f"unknown optimizer {self.optimizer!r}: use adamw or sgd")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise CytoError(f"unknown precision {self.precision!r}: use auto, bf16, fp16 or fp32")
        positive = {"epochs": self.epochs, "batch size": self.batch_size, "image size": self.image_size,
                    "out_dim": self.out_dim, "hidden dim": self.hidden_dim, "bottleneck dim": self.bottleneck_dim,
                    "log every": self.log_every}
        for name, value in positive.items():
            if value < 1:
                raise CytoError(f"{name} must be at least 1, got {value}")
        for name, (lo, hi) in (("global crop scale", self.global_scale), ("local crop scale", self.local_scale),
                               ("paste scale", self.paste_scale)):
            if not 0 < lo <= hi:
                raise CytoError(f"{name} must be two numbers 0 < min <= max, got {lo} {hi}")
        for name, value in (("teacher momentum", self.momentum_teacher), ("centre momentum", self.center_momentum),
                            ("paste probability", self.paste_p)):
            if not 0 <= value <= 1:
                raise CytoError(f"{name} must be within [0, 1], got {value}")
        if min(self.teacher_temp, self.warmup_teacher_temp, self.student_temp) <= 0:
            raise CytoError("temperatures must be positive")
        if (self.split is None) != (self.fold is None):
            raise CytoError("`split` and `fold` go together: the split file says which slides are in fold F")
        if self.hed_jitter < 0 or self.hed_jitter >= 1:
            raise CytoError(f"`hed_jitter` must be within [0, 1), got {self.hed_jitter}")
        if self.colour_strength < 0:
            raise CytoError(f"`colour_strength` must be at least 0, got {self.colour_strength}")
        if not 0 <= self.grayscale_p <= 1:
            raise CytoError(f"`grayscale_p` must be within [0, 1], got {self.grayscale_p}")
        if self.paste_max < 1:
            raise CytoError(f"`paste_max` must be at least 1, got {self.paste_max}")
        if self.max_steps is not None and self.max_steps < 1:
            raise CytoError(f"`max_steps` must be at least 1, got {self.max_steps}")


def recipe_for(arch: str | None, recipe: str | None) -> str:
    """The recipe named, else the one matching the arch (ViTs -> vit_small, anything else -> resnet50)."""
    if recipe:
        if recipe not in RECIPES:
            raise CytoError(f"unknown recipe {recipe!r}: use {' or '.join(RECIPES)}")
        return recipe
    return "vit_small" if arch and arch.lower().startswith(("vit", "deit")) else "resnet50"


def make_config(data: list[str], out: str, *, arch: str | None = None, recipe: str | None = None,
                **overrides: Any) -> TrainConfig:
    """A config from a recipe; `overrides` set to None keep the recipe's value."""
    name = recipe_for(arch, recipe)
    values = dict(RECIPES[name])
    values["arch"] = arch or values["arch"]
    values.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("paste_cells",):
        if key in values:
            values[key] = [normal_source(v) for v in values[key]]
    if values.get("split") is not None:
        values["split"] = normal_source(values["split"])
    config = TrainConfig(data=[normal_source(d) for d in data], out=str(out), recipe=name, **values)
    config.validate()
    return config


def normal_source(value: Any) -> str:
    """An existing path as an absolute one (so a run resumes from any folder); anything else (a table name) as is."""
    path = Path(str(value)).expanduser()
    return str(path.resolve()) if path.exists() else str(value)


def conflicts(saved: TrainConfig, given: dict[str, Any]) -> list[str]:
    """Arguments given explicitly to a resuming command that differ from the checkpoint's (runtime ones may)."""
    out = []
    saved_d = saved.to_dict()
    for key, value in given.items():
        if value is None or key in RUNTIME or key not in saved_d:
            continue
        v = list(value) if isinstance(value, tuple) else value
        if key in ("data", "paste_cells"):
            v = [normal_source(x) for x in value]
        elif key == "split":
            v = normal_source(value)
        if v != saved_d[key]:
            out.append(f"{key}={v!r} (checkpoint: {saved_d[key]!r})")
    return out
