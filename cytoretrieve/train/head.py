"""The DINO head and the student / teacher network (timm backbone + head).

`DINOHead` follows DINO's `vision_transformer.DINOHead`: an MLP (3 layers, hidden 2048, bottleneck 256, GELU,
optional BatchNorm), L2 normalisation, then a weight-normalised linear layer to `out_dim` whose norm (`weight_g`)
is fixed to 1 when `norm_last_layer`. The weight norm is written out here (parameters `weight_g`, `weight_v`, the
names of `torch.nn.utils.weight_norm`) so state dicts match official DINO checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """y = x W^T with W = g * v / ||v|| (row-wise), no bias: `nn.utils.weight_norm(nn.Linear(..., bias=False))`."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        linear = nn.Linear(in_features, out_features, bias=False)  # nn.Linear's default init for v, as in DINO
        self.weight_v = nn.Parameter(linear.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))  # DINO: weight_g.data.fill_(1)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """MLP -> L2 normalise -> weight-normalised linear to `out_dim` (DINO's projection head)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        *,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        nlayers = max(int(nlayers), 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(_init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0)


class DINOModel(nn.Module):
    """Backbone + head. `forward(views)` runs the backbone once per run of same-size views (global crops
    together, local crops together, as DINO's MultiCropWrapper), then the head on all features at once; one
    forward call per step keeps DistributedDataParallel happy."""

    def __init__(self, backbone: nn.Module, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(views, torch.Tensor):
            views = [views]
        features = []
        start = 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            out = self.backbone(torch.cat(views[start:end]))
            features.append(out[0] if isinstance(out, tuple) else out)
            start = end
        return self.head(torch.cat(features))


def feature_dim(backbone: nn.Module) -> int:
    """The pooled feature size of a timm model built with num_classes=0 (what `embed` stores)."""
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


def create_backbone(arch: str, *, image_size: int, drop_path_rate: float = 0.0) -> nn.Module:
    """A randomly initialised timm backbone with no classifier, drawn from the caller's RNG (the run's seed).
    Fixed-size models (ViTs) are built at `image_size` with dynamic_img_size, so local crops of another size
    pass and `embed` rebuilds the same model: `backbones.create_model` is the one place that creates them."""
    from cytoretrieve.models.backbones import create_model

    return create_model(arch, img_size=int(image_size), drop_path_rate=drop_path_rate, seed=None)


def build_student_teacher(
    arch: str,
    *,
    image_size: int,
    out_dim: int,
    hidden_dim: int = 2048,
    bottleneck_dim: int = 256,
    nlayers: int = 3,
    use_bn_in_head: bool = False,
    norm_last_layer: bool = True,
    drop_path_rate: float = 0.0,
) -> tuple[DINOModel, DINOModel]:
    """Student (with drop-path) and teacher (without), same weights, teacher frozen (no gradients: EMA only).
    Call under a seeded RNG: the student's random init is the run's."""
    student_backbone = create_backbone(arch, image_size=image_size, drop_path_rate=drop_path_rate)
    dim = feature_dim(student_backbone)
    head_kwargs = dict(use_bn=use_bn_in_head, nlayers=nlayers, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim)
    student = DINOModel(student_backbone, DINOHead(dim, out_dim, norm_last_layer=norm_last_layer, **head_kwargs))
    with torch.random.fork_rng(devices=[]):  # the teacher's own init is overwritten: keep the RNG stream as is
        teacher = DINOModel(
            create_backbone(arch, image_size=image_size), DINOHead(dim, out_dim, norm_last_layer=True, **head_kwargs)
        )
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher
