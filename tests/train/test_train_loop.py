"""The DINO job end to end on real cells, small (resnet18 at 64 px, out_dim 256): the loss goes down, the
teacher moves by EMA only, stop + resume equals the uninterrupted run bit for bit, Ctrl-C checkpoints, and an
exported backbone embeds with the fingerprint `export` printed."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cytoretrieve.cli import run
from cytoretrieve.train import checkpoint as ckpt
from cytoretrieve.train.config import make_config
from cytoretrieve.train.head import build_student_teacher
from cytoretrieve.train.loop import train
from helpers.paths import SVS

TINY = dict(arch="resnet18", image_size=64, out_dim=256, hidden_dim=256, workers=0, device="cpu")
TINY_CLI = ["--arch", "resnet18", "--image-size", "64", "--out-dim", "256", "--hidden-dim", "256", "--device", "cpu"]
CLASSES = ("carcinoma_in_situ", "normal_intermediate")


@pytest.fixture(scope="module")
def cells(herlev_root: Path, tmp_path_factory) -> Path:
    """8 real Herlev cells in 2 class folders (symlinks: read in place)."""
    root = tmp_path_factory.mktemp("cells")
    for cls in CLASSES:
        (root / cls).mkdir()
        for src in sorted((herlev_root / cls).glob("*.jpg"))[:4]:
            (root / cls / src.name).symlink_to(src)
    return root


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on a 2-core machine shared with other jobs, torch's OpenMP threads spin and wait on
    each other (a tiny step measured 3x slower with 2 threads than with 1 under load); on an idle machine 1 thread
    costs less than 2x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _steps(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if '"event"' not in line]


def test_short_run_on_real_cells_lowers_the_loss(cells: Path, tmp_path: Path) -> None:
    # fast-moving settings (no warm-up, teacher momentum 0.9): a few steps show the optimisation at work
    config = make_config([cells], tmp_path / "run", **TINY, batch_size=8, epochs=4, optimizer="adamw", lr=0.05,
                         warmup_epochs=0, freeze_last_layer=0, momentum_teacher=0.9)
    report = train(config)
    steps = _steps(tmp_path / "run" / "log.jsonl")
    losses = [s["loss"] for s in steps]
    assert len(losses) == report.steps == report.total_steps == 4 and report.finished
    assert sum(losses[-2:]) / 2 < 0.6 * losses[0], losses
    fields = {"loss", "lr", "wd", "momentum", "teacher_temp", "images_per_s", "teacher_entropy", "data_wait", "step"}
    assert fields <= set(steps[0])
    assert steps[0]["lr"] == pytest.approx(0.05 * 8 / 256) and steps[0]["teacher_temp"] == pytest.approx(0.04)


@pytest.fixture(scope="module")
def one_step(cells: Path, tmp_path_factory) -> tuple[Path, object]:
    """A run stopped after its first step (--max-steps 1): its folder and config."""
    out = tmp_path_factory.mktemp("one_step")
    config = make_config([cells], out, **TINY, batch_size=8, epochs=1, max_steps=1,
                         momentum_teacher=0.99, freeze_last_layer=0, warmup_epochs=0)
    report = train(config)
    assert report.steps == 1
    return out, config


def test_teacher_gets_no_gradient_and_moves_by_ema_only(one_step) -> None:  # noqa: ANN001
    out, config = one_step
    state = ckpt.load(out / "checkpoint.pth")
    torch.manual_seed(config.seed)  # the loop's init, rebuilt
    student0, teacher0 = build_student_teacher(config.arch, image_size=64, out_dim=256, hidden_dim=256)
    assert all(not p.requires_grad for p in teacher0.parameters())
    m = 0.99  # the momentum schedule at step 0
    init = dict(student0.named_parameters())
    moved = 0
    for name, t1 in state["teacher"].items():
        if name not in init:
            continue  # BatchNorm statistics: the teacher's own
        s1 = state["student"][name]
        assert torch.allclose(t1, m * init[name].detach() + (1 - m) * s1, atol=1e-6), name
        moved += not torch.equal(t1, init[name].detach())
    assert moved > 0
    # one step by hand: the loss reaches the student's parameters only
    loss_input = [torch.randn(2, 3, 64, 64)] * 2
    with torch.no_grad():
        t_out = teacher0(loss_input)
    (student0(loss_input) - t_out).square().mean().backward()
    assert all(p.grad is None for p in teacher0.parameters())
    assert any(p.grad is not None for p in student0.parameters())


def test_stop_and_resume_reproduces_the_uninterrupted_run_exactly(cells: Path, tmp_path: Path) -> None:
    # 8 images, batch 4: 2 steps per epoch, 2 epochs; stopped mid-epoch after step 1 (drop-path on: RNG matters)
    kw = dict(**TINY, batch_size=4, epochs=2, drop_path=0.1, warmup_epochs=1, deterministic=True)
    full = train(make_config([cells], tmp_path / "full", **kw))
    assert full.steps == 4

    def stop_after_1(stats) -> None:  # noqa: ANN001
        if stats.step == 1:
            raise KeyboardInterrupt  # what Ctrl-C does: finish the step, checkpoint, stop

    half = train(make_config([cells], tmp_path / "half", **kw), on_step=stop_after_1)
    assert half.interrupted and half.steps == 1
    assert ckpt.load(tmp_path / "half" / "checkpoint.pth")["step"] == 1
    rest = train(make_config([cells], tmp_path / "half", **kw), resume=True)
    assert rest.start_step == 1 and rest.steps == 4 and rest.finished

    a, b = ckpt.load(tmp_path / "full" / "checkpoint.pth"), ckpt.load(tmp_path / "half" / "checkpoint.pth")
    for net in ("student", "teacher"):
        assert a[net].keys() == b[net].keys()
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net]), net
    assert torch.equal(a["center"], b["center"])
    assert all(torch.equal(x, y) for x, y in zip(_tensors(a["optimizer"]), _tensors(b["optimizer"])))
    log = [s["step"] for s in _steps(tmp_path / "half" / "log.jsonl")]
    assert log == [1, 2, 3, 4]  # the log continues where it stopped
    # the checkpoint holds only plain data: weights_only loading, RNG states as tensors, args as a dict
    assert isinstance(a["args"], dict) and isinstance(a["rng"]["torch"], torch.Tensor)
    torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=True)


def _tensors(obj) -> list[torch.Tensor]:  # noqa: ANN001
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def test_export_then_embed_records_the_same_fingerprint(cells: Path, one_step, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    run_dir, _ = one_step
    weights = tmp_path / "models" / "dino_r18.safetensors"
    assert run(["export", str(run_dir / "checkpoint.pth"), "--out", str(weights)]) == 0
    assert weights.stat().st_mode & 0o777 == 0o644  # readable by the colleague who embeds with it
    printed = capsys.readouterr().out
    fingerprint = printed.split("fingerprint: ")[1].split()[0]
    meta = json.loads(weights.with_suffix(".json").read_text())
    assert meta["arch"] == "resnet18" and meta["preprocessing"]["size"] == 64 and meta["dino"]["network"] == "teacher"

    from cytoretrieve.models.backbones import load_backbone
    from cytoretrieve.store.tables import Store

    backbone = load_backbone(None, str(weights))
    teacher = ckpt.load(run_dir / "checkpoint.pth")["teacher"]
    assert backbone.fingerprint == fingerprint
    assert all(torch.equal(v, teacher[f"backbone.{k}"]) for k, v in backbone.model.state_dict().items())

    store = tmp_path / "store"
    assert run(["embed", str(cells), "--backbone", "resnet18", "--weights", str(weights), "--store", str(store),
                "--workers", "0", "--device", "cpu", "--table", "cells_dino"]) == 0
    stored = Store(store).open("cells_dino").meta["backbone"]
    assert stored["fingerprint"] == fingerprint and stored["dim"] == 512 and stored["preprocessing"]["size"] == 64


def test_ctrl_c_checkpoints_and_resume_finishes(cells: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cytoretrieve.train", "--data", str(cells), *TINY_CLI, "--batch-size", "4",
           "--epochs", "50", "--workers", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = out / "log.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and _steps(log):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr
    stopped = ckpt.load(out / "checkpoint.pth")["step"]
    assert stopped >= 1 and _steps(log)[-1]["step"] == stopped
    # resume to one more step; a changed hyperparameter is refused, a runtime one is not
    assert run(["train", "--out", str(out), "--resume", "--lr", "0.5"]) == 2
    assert run(["train", "--out", str(out), "--resume", "--workers", "0", "--max-steps", str(stopped + 1)]) == 0
    assert ckpt.load(out / "checkpoint.pth")["step"] == stopped + 1


def test_trains_from_a_tile_table_and_the_split_holds_its_slide_out(cells: Path, tmp_path: Path, capsys) -> None:
    svs = SVS
    if not svs.is_file():
        pytest.skip(f"{svs} not found")
    store = tmp_path / "store"
    assert run(["tile", str(svs), "--store", str(store), "--table", "cmu_tiles"]) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    assert run(["train", "--data", "cmu_tiles", "--store", str(store), *TINY_CLI, "--batch-size", "8", "--workers", "0",
                "--max-steps", "1", "--out", str(out)]) == 0
    start = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    from cytoretrieve.store.tables import Store
    from cytoretrieve.store.tiles import open_tile_table

    assert start["event"] == "start" and start["images"] == open_tile_table(Store(store), "cmu_tiles").count() >= 8
    assert [s["step"] for s in _steps(out / "log.jsonl")] == [1]
    split = tmp_path / "split.csv"
    split.write_text("slide,fold\nCMU-1-Small-Region,0\nother,1\n")
    args = ["train", "--data", "cmu_tiles", "--store", str(store), *TINY_CLI, "--split", str(split), "--out", str(tmp_path / "r2")]
    assert run([*args, "--fold", "0"]) == 2  # its only slide is held out: nothing left to train on
    assert "held-out fold 0" in capsys.readouterr().err
    assert run(["train", "--data", "no_such_table", "--store", str(store), *TINY_CLI, "--out", str(tmp_path / "r3")]) == 2
    assert "neither a folder, a CSV manifest nor a tile table" in capsys.readouterr().err
    # crops of a table read from the slide serve as paste cells too (as `annotations import` writes <table>_cells)
    assert run(["train", "--data", str(cells), "--paste-cells", "cmu_tiles", "--store", str(store), "--paste-p", "1",
                "--image-size", "48", "--preview", "2", "--out", str(tmp_path / "r4")]) == 0
    assert (tmp_path / "r4" / "preview.png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{missing}"], "not found"),
        (["--data", "{cells}", "--split", "{cells}/x.csv"], "--split and --fold go together"),
        (["--data", "{cells}", "--batch-size", "64"], "too few for a batch of 64"),
        (["--data", "{cells}", "--recipe", "vit_large"], "unknown recipe"),
        (["--data", "{cells}", "--resume"], "checkpoint not found"),
        (["--data", "{cells}", "--precision", "fp16"], "needs a CUDA GPU"),
    ],
)
def test_train_user_errors_are_one_line_exit_2(cells: Path, tmp_path: Path, capsys, args, message) -> None:
    args = [a.format(cells=cells, missing=tmp_path / "missing") for a in args]
    assert run(["train", *args, *TINY_CLI, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_export_and_rerun_errors(cells: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "run").mkdir()
    torch.save({"model": {}}, tmp_path / "run" / "checkpoint.pth")
    assert run(["train", "--data", str(cells), *TINY_CLI, "--out", str(tmp_path / "run")]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert run(["export", str(tmp_path / "run" / "checkpoint.pth"), "--out", str(tmp_path / "b.safetensors")]) == 2
    assert "not a cytoretrieve DINO checkpoint" in capsys.readouterr().err
    assert run(["export", str(tmp_path / "run" / "checkpoint.pth"), "--out", str(tmp_path / "b.pt")]) == 2
    assert "must end with .safetensors" in capsys.readouterr().err


def test_preview_writes_the_grid_and_trains_nothing(cells: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert run(["train", "--data", str(cells), "--paste-cells", str(cells), "--paste-p", "1", "--hed-jitter", "0.05",
                "--image-size", "48", "--preview", "3", "--out", str(out)]) == 0
    assert Path(capsys.readouterr().out.strip()) == out / "preview.png"
    assert (out / "preview.png").is_file() and not (out / "checkpoint.pth").exists()


def test_help_documents_recipes_splits_resume_and_torchrun(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # rich shortens long option names in narrow terminals
    assert run(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for word in ("--recipe", "--arch", "--split", "--fold", "--resume", "--preview", "--paste-cells", "--hed-jitter",
                 "--local-crops", "--norm-last-layer", "--momentum-teacher", "--compile", "torchrun"):
        assert word in out, word
    assert run(["export", "--help"]) == 0
    assert "embed --weights" in capsys.readouterr().out


def _forced_teacher(monkeypatch, output) -> None:  # noqa: ANN001
    """Make the run's teacher head return `output(head_output)`: a collapse forced from step 1."""
    import cytoretrieve.train.run as run_module

    build = run_module.build_student_teacher

    def collapsed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        student, teacher = build(*args, **kwargs)
        teacher.head.register_forward_hook(lambda module, inputs, out: output(out))
        return student, teacher

    monkeypatch.setattr(run_module, "build_student_teacher", collapsed)


def _one_hot(out: torch.Tensor) -> torch.Tensor:
    forced = torch.zeros_like(out)
    forced[:, 0] = 1.0
    return forced


@pytest.mark.parametrize(
    "output, extra, signature",
    [(torch.zeros_like, {}, "uniform"), (_one_hot, {"center_momentum": 1.0}, "one dimension")],
)
def test_a_forced_collapse_warns_after_warm_up_only(cells: Path, tmp_path: Path, monkeypatch, output, extra,
                                                    signature) -> None:  # noqa: ANN001
    _forced_teacher(monkeypatch, output)
    # 8 images, batch 8: 1 step per epoch; 2 warm-up epochs, then 5 judged steps (the watch's window)
    kw = dict(**TINY, batch_size=8, epochs=7, warmup_epochs=2, freeze_last_layer=1, **extra)
    events: list[tuple[str, dict]] = []
    report = train(make_config([cells], tmp_path / "run", **kw), on_event=lambda n, f: events.append((n, f)))
    warnings = [f for name, f in events if name == "warning"]
    assert len(report.warnings) == 1 and signature in report.warnings[0], report.warnings
    assert [w["step"] for w in warnings] == [7]  # judged after warm-up (step 2), once the window is full
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any(line.get("event") == "warning" and signature in line["message"] for line in logged)
    # the same collapse inside warm-up is not judged: no warning
    short = train(make_config([cells], tmp_path / "short", **{**kw, "epochs": 6}))
    assert short.warnings == [] and short.finished


def test_a_healthy_short_run_gives_no_collapse_warning(cells: Path, tmp_path: Path) -> None:
    # the issue-14 case: a loss at ln(out_dim) in warm-up, then learning; judged over 5 steps after warm-up
    config = make_config([cells], tmp_path / "run", **TINY, batch_size=8, epochs=8, warmup_epochs=2,
                         freeze_last_layer=1, momentum_teacher=0.9)
    report = train(config)
    steps = _steps(tmp_path / "run" / "log.jsonl")
    judged = [s for s in steps if s["step"] > 2]
    assert report.finished and len(judged) >= 5
    assert report.warnings == [], report.warnings
    assert max(s["teacher_entropy"] for s in judged) < 0.98 * math.log(256)  # neither signature is there
    assert min(s["teacher_batch_entropy"] for s in judged) > 0.02 * math.log(256)
