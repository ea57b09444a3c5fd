"""DINO's pieces against their definitions: loss, centre, schedules, head, clipping, freezing, EMA, collapse watch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cytoretrieve.train.collapse import CollapseWatch
from cytoretrieve.train.head import DINOHead, DINOModel, WeightNormLinear
from cytoretrieve.train.loss import DINOLoss
from cytoretrieve.train.optim import (
    cancel_gradients_last_layer,
    clip_gradients,
    ema_update,
    get_params_groups,
)
from cytoretrieve.train.schedules import cosine_scheduler, teacher_temp_schedule


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("n_views", [2, 4])
def test_loss_equals_the_definition_and_centre_moves_as_defined(n_views: int) -> None:
    g = torch.Generator().manual_seed(0)
    batch, dim, t_temp, s_temp, m = 5, 7, 0.04, 0.1, 0.9
    student = torch.randn(n_views * batch, dim, generator=g, dtype=torch.float64)
    teacher = torch.randn(2 * batch, dim, generator=g, dtype=torch.float64)
    centre0 = torch.randn(1, dim, generator=g, dtype=torch.float64)
    loss_fn = DINOLoss(dim, n_views, student_temp=s_temp, center_momentum=m).double()
    loss_fn.center.copy_(centre0)
    loss = loss_fn(student, teacher, t_temp).item()

    s, t, c = student.numpy(), teacher.numpy(), centre0.numpy()
    p_t = [_softmax((t[i * batch:(i + 1) * batch] - c) / t_temp) for i in range(2)]
    log_p_s = [np.log(_softmax(s[v * batch:(v + 1) * batch] / s_temp)) for v in range(n_views)]
    terms = [(-p_t[q] * log_p_s[v]).sum(axis=1).mean() for q in range(2) for v in range(n_views) if v != q]
    assert len(terms) == 2 * n_views - 2
    assert loss == pytest.approx(float(np.mean(terms)), rel=1e-10)
    assert np.allclose(loss_fn.center.numpy(), m * c + (1 - m) * t.mean(axis=0, keepdims=True))


def test_uniform_outputs_give_ln_out_dim() -> None:
    loss_fn = DINOLoss(256, 2)
    assert loss_fn(torch.zeros(8, 256), torch.zeros(8, 256), 0.04).item() == pytest.approx(math.log(256), rel=1e-6)


def test_cosine_schedule_equals_its_closed_form() -> None:
    base, final, epochs, niter, warm = 0.5, 0.01, 5, 4, 2
    s = cosine_scheduler(base, final, epochs, niter, warmup_epochs=warm, start_warmup_value=0.0)
    assert len(s) == epochs * niter
    w = warm * niter
    assert np.allclose(s[:w], np.linspace(0.0, base, w))
    t = np.arange(epochs * niter - w)
    assert np.allclose(s[w:], final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / len(t))))
    assert s[w] == pytest.approx(base) and s[-1] > final
    # teacher momentum: base -> 1, monotone; constant weight decay stays constant
    m = cosine_scheduler(0.996, 1.0, epochs, niter)
    assert m[0] == pytest.approx(0.996) and np.all(np.diff(m) >= 0) and m[-1] < 1
    assert np.allclose(cosine_scheduler(1e-4, 1e-4, epochs, niter), 1e-4)
    # a warm-up longer than the run is cut to the run (the recipe's 10 epochs on a 2-epoch test run)
    assert np.allclose(cosine_scheduler(1.0, 0.0, 2, 3, warmup_epochs=10), np.linspace(0, 1, 6))


def test_teacher_temperature_warms_up_linearly_per_epoch() -> None:
    s = teacher_temp_schedule(0.04, 0.07, 30, 100)
    assert len(s) == 100
    assert np.allclose(s[:30], np.linspace(0.04, 0.07, 30)) and np.allclose(s[30:], 0.07)
    assert np.allclose(teacher_temp_schedule(0.04, 0.04, 0, 3), 0.04)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_head_weight_norm_and_frozen_norm() -> None:
    torch.manual_seed(0)
    head = DINOHead(16, 32, norm_last_layer=True, hidden_dim=24, bottleneck_dim=8)
    assert [m.out_features for m in head.mlp if isinstance(m, torch.nn.Linear)] == [24, 24, 8]
    assert not head.last_layer.weight_g.requires_grad and head.last_layer.weight_v.requires_grad
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(32))  # g = 1: unit rows
    assert head(torch.randn(3, 16)).shape == (3, 32)
    free = DINOHead(16, 32, norm_last_layer=False, hidden_dim=24, bottleneck_dim=8)
    assert free.last_layer.weight_g.requires_grad
    # state dict names of torch.nn.utils.weight_norm: official DINO heads load
    assert {"last_layer.weight_g", "last_layer.weight_v"} <= set(free.state_dict())
    ref = torch.nn.utils.weight_norm(torch.nn.Linear(8, 32, bias=False))
    wn = WeightNormLinear(8, 32)
    with torch.no_grad():
        ref.weight_v.copy_(wn.weight_v)
        ref.weight_g.copy_(torch.rand(32, 1))
        wn.weight_g.copy_(ref.weight_g)
    x = torch.randn(4, 8)
    assert torch.allclose(wn(x), ref(x), atol=1e-6)


def test_param_groups_leave_biases_and_norms_undecayed() -> None:
    model = DINOModel(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6)), DINOHead(6, 10, hidden_dim=8, bottleneck_dim=4))
    decayed, undecayed = get_params_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert undecayed["weight_decay"] == 0.0
    assert all(names[id(p)].endswith(".bias") or p.ndim == 1 for p in undecayed["params"])
    assert all(p.ndim > 1 for p in decayed["params"])
    assert "head.last_layer.weight_g" not in {names[id(p)] for g in (decayed, undecayed) for p in g["params"]}


def test_clipping_is_per_parameter_and_last_layer_freezes() -> None:
    model = DINOModel(torch.nn.Linear(3, 5), DINOHead(5, 7, norm_last_layer=False, hidden_dim=4, bottleneck_dim=3))
    for p in model.parameters():
        p.grad = torch.full_like(p, 2.0)
    before = {n: p.grad.norm().item() for n, p in model.named_parameters()}
    norms = clip_gradients(model, 1.5)
    assert sorted(norms.tolist()) == pytest.approx(sorted(before.values()))
    for n, p in model.named_parameters():  # DINO's rule: each gradient alone, scaled by clip / (norm + 1e-6)
        expected = min(1.0, 1.5 / (before[n] + 1e-6)) * before[n]
        assert p.grad.norm().item() == pytest.approx(expected, rel=1e-5)
    cancel_gradients_last_layer(epoch=1, model=model, freeze_last_layer=1)
    assert model.head.last_layer.weight_v.grad is not None
    cancel_gradients_last_layer(epoch=0, model=model, freeze_last_layer=1)
    assert model.head.last_layer.weight_v.grad is None and model.head.last_layer.weight_g.grad is None
    assert model.backbone.weight.grad is not None


def test_ema_update_is_the_convex_combination() -> None:
    g = torch.Generator().manual_seed(1)
    t = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    s = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    expected = [0.99 * a + 0.01 * b for a, b in zip(t, s)]
    ema_update(t, s, 0.99)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(t, expected))


def test_collapse_watch_reads_the_two_signatures_only_after_warm_up() -> None:
    ln_k = math.log(256)
    watch = CollapseWatch(256, after_step=10, window=5)
    # warm-up: a healthy run starts near-uniform (the false alarm of issue 14); nothing is judged
    assert all(watch.update(step, ln_k, ln_k) is None for step in range(1, 11))
    assert all(watch.update(step, ln_k, ln_k) is None for step in range(11, 15))  # the window is not full yet
    message = watch.update(15, ln_k - 0.01, ln_k)
    assert message is not None and "uniform" in message and "`teacher_temp`" in message
    assert all(watch.update(step, ln_k, ln_k) is None for step in range(16, 30))  # once
    dominant = CollapseWatch(256, after_step=0, window=3)
    found = [dominant.update(step, 0.01, 0.02) for step in range(1, 6)]
    assert found[:2] == [None, None] and "one dimension" in found[2] and found[3:] == [None, None]
    healthy = CollapseWatch(256, after_step=0, window=3)
    assert all(healthy.update(step, 2.0, 4.5) is None for step in range(1, 50)) and healthy.judging


def test_dino_loss_stats_show_both_collapse_signatures() -> None:
    """What the loss reports is what the watch reads: a constant teacher output is uniform after centring;
    with the centre held at 0, one dominant output dimension gives a batch-mean entropy near 0."""
    k, batch = 64, 6
    student = torch.randn(2 * batch, k, generator=torch.Generator().manual_seed(0))
    loss = DINOLoss(k, 2)
    loss(student, torch.zeros(2 * batch, k), 0.04)
    assert float(loss.last_stats["teacher_entropy"]) == pytest.approx(math.log(k), rel=1e-6)
    dominant = torch.zeros(2 * batch, k)
    dominant[:, 3] = 1.0
    held = DINOLoss(k, 2, center_momentum=1.0)  # the centre never moves: sharpening alone
    held(student, dominant, 0.04)
    assert float(held.last_stats["teacher_batch_entropy"]) < 0.01 * math.log(k)
    spread = torch.eye(k)[: 2 * batch] * 5  # each image its own dimension: a healthy, sharp teacher
    held(student, spread, 0.04)
    assert float(held.last_stats["teacher_batch_entropy"]) > 0.5 * math.log(k)
