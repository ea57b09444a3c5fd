"""Two gloo processes under torchrun: DDP averages the gradients, each rank trains on its own share of the
data, and rank 0 alone writes the checkpoint and the log (tiny config: resnet18 at 64 px, out_dim 256)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cytoretrieve.train import checkpoint as ckpt

SCRIPT = r'''
import json, os, sys
import torch
import torch.distributed as dist
import cytoretrieve.train.data as data_module
from cytoretrieve.train.config import make_config
from cytoretrieve.distributed import setup
from cytoretrieve.train.head import build_student_teacher
from cytoretrieve.train.loop import train

cells, out = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])

# 1. the DDP wrapper the trainer uses averages gradients: synced grads == mean of the local ones
d = setup("cpu")
torch.manual_seed(0)
student, _ = build_student_teacher("resnet18", image_size=64, out_dim=16, hidden_dim=32)
ddp = torch.nn.parallel.DistributedDataParallel(student)
x = [torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(100 + rank))]  # different data per rank
with ddp.no_sync():
    ddp(x).square().mean().backward()
local = [p.grad.clone() for p in student.parameters() if p.grad is not None]
mean = [g.clone() for g in local]
for g in mean:
    dist.all_reduce(g)
    g /= 2
student.zero_grad(set_to_none=True)
ddp(x).square().mean().backward()
synced = [p.grad for p in student.parameters() if p.grad is not None]
averaged = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(mean, synced))
differ = any(not torch.allclose(a, b) for a, b in zip(local, synced))

# 2. the trainer itself, 2 steps, recording which images this rank loaded
seen = []
getitem = data_module.TrainDataset.__getitem__
def spy(self, key):
    seen.append(int(key[1]))
    return getitem(self, key)
data_module.TrainDataset.__getitem__ = spy
report = train(make_config([cells], out, arch="resnet18", image_size=64, out_dim=256, hidden_dim=256,
                           batch_size=8, epochs=1, workers=0, device="cpu"))
with open(os.path.join(sys.argv[3], f"rank{rank}.json"), "w") as f:
    json.dump({"rank": rank, "averaged": averaged, "differ": differ, "seen": sorted(seen), "steps": report.steps}, f)
'''


def test_two_gloo_processes_average_gradients_and_split_the_data(herlev_root: Path, tmp_path: Path) -> None:
    cells = tmp_path / "cells"
    cells.mkdir()
    for src in sorted((herlev_root / "normal_columnar").glob("*.jpg"))[:16]:
        (cells / src.name).symlink_to(src)
    script = tmp_path / "ddp_check.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(cells), str(out), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["averaged"] and r["differ"] for r in results)  # different local grads, one averaged update
    assert all(r["steps"] == 2 for r in results)  # 16 images, 8 per step over 2 ranks
    a, b = results[0]["seen"], results[1]["seen"]
    assert len(a) == len(b) == 8 and not set(a) & set(b) and sorted(a + b) == list(range(16))
    state = ckpt.load(out / "checkpoint.pth")
    assert state["world_size"] == 2 and state["step"] == 2
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "event" not in line] == [1, 2]  # one writer
    start = next(line for line in lines if line.get("event") == "start")
    assert start["world_size"] == 2 and start["batch_per_process"] == 4
    assert not list(out.glob(".*tmp*"))
