"""A nucleus detector trained from point annotations (one click inside each nucleus), small enough for a CPU.

Annotators mark nuclei with points, not outlines, so the network learns a heat map: a Gaussian of `sigma_um`
around each point, 0 elsewhere. Everything happens at a fixed working resolution (`work_mpp`), so one model serves
scans of any pixel size, and on the same darkness map as the classic detector (`darkness`: optical density
against the glass), so grey and RGB fields look alike to it.

- **model**: a U-Net of 3x3 convolutions, one level per entry of `widths` (three by default; tens of thousands of
  weights), which sees about 20 um around each pixel: enough to tell a nucleus from a fold or a speck by its shape
  and surroundings; its input is the darkness, plus with `contrast_um` > 0 a second channel of local contrast
  (the darkness minus its blur at that scale);
- **training** (`train_point_detector`): random `patch_px` crops with flips, 90-degree turns, brightness /
  contrast changes of the darkness, blur and noise; a weighted squared error (`loss="mse"`) or cross-entropy
  (`"bce"`), pixels near a point weighing more so the few positives are not drowned by the background; Adam with a
  one-cycle schedule; one torch thread, seeded;
- **ensemble** (`ensemble` = N > 1): N networks trained alike but for their seeds (`seed`, `seed` + 1, ...), each
  exactly the model a single training with that seed would give; their maps are averaged, which evens out the
  seed-to-seed variation of one small network (N times the training and detection work); `combine` joins
  separately trained members into one;
- **detection**: the predicted map (the mean over the ensemble's members; with `tta`, also over the field's eight
  flips and turns: eight times the work); its local maxima at least `min_separation_um` apart and at least
  `threshold` high (the threshold with the best F1 on the training fields unless given) are the nuclei;
  `confidence` is the map's value there; area, darkness and the cell around it are measured as the classic
  detector measures its regions (watershed on the background-removed darkness, from these seeds);
- **file** (`save` / `load`): one torch file with the weights of every member, the settings (the ensemble's size
  and first seed among them), the working mpp, a JSON-able record of the training data (names, counts of fields
  and points, each member's seed and training time) and the library versions; files of the first format (one
  network) still load.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi
from torch import nn

from cytoretrieve.sources.slides.detectors import Nuclei, darkness
from cytoretrieve.sources.slides.detectors.classic import (
    Candidates,
    ClassicSettings,
    _check_mpp,
    _tophat,
    measure_regions,
    nuclei_from,
    to_working,
)
from cytoretrieve.sources.slides.detectors.evaluate import Counts, count

FORMAT = "cytoretrieve-point-detector/2"
FORMATS = ("cytoretrieve-point-detector/1", FORMAT)  # /1: one network, `state_dict`


@dataclass(frozen=True)
class PointSettings:
    """Settings of the point-trained detector (training and detection); lengths in um."""

    work_mpp: float = 0.75
    sigma_um: float = 2.5  # chosen on 15 held-out Cervix93 training fields (BENCHMARKS.md, "Cells")
    widths: tuple[int, ...] = (16, 32, 48)
    patch_px: int = 96
    batch: int = 8
    steps: int = 1200
    lr: float = 3e-3
    positive_weight: float = 10.0
    seed: int = 0
    threshold: float = 0.5
    min_separation_um: float = 3.0
    match_radius_um: float = 4.0
    contrast_um: float = 0.0
    tta: bool = False
    loss: str = "mse"
    ensemble: int = 1  # members, seeds `seed` .. `seed` + ensemble - 1

    def validate(self) -> None:
        for name in ("work_mpp", "sigma_um", "lr", "min_separation_um", "match_radius_um"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, not {getattr(self, name)}")
        if self.patch_px % 8 or self.patch_px < 16:
            raise ValueError(f"`patch_px` must be a multiple of 8, at least 16; not {self.patch_px}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"`threshold` must be in (0, 1), not {self.threshold}")
        if len(self.widths) < 2:
            raise ValueError(f"`widths` needs at least two levels, not {self.widths}")
        if self.contrast_um < 0:
            raise ValueError(f"`contrast_um` must be 0 (off) or positive, not {self.contrast_um}")
        if self.loss not in ("mse", "bce"):
            raise ValueError(f"`loss` must be 'mse' or 'bce', not {self.loss!r}")
        if int(self.ensemble) != self.ensemble or self.ensemble < 1:
            raise ValueError(f"`ensemble` must be a whole number of members, at least 1; not {self.ensemble}")

    @property
    def channels(self) -> int:
        return 2 if self.contrast_um > 0 else 1

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.widths) - 1)

    @property
    def seeds(self) -> list[int]:
        """The members' seeds."""
        return [int(self.seed) + i for i in range(int(self.ensemble))]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["widths"] = list(self.widths)
        return out


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class HeatNet(nn.Module):
    """U-Net of `len(widths)` levels: input (N, C, H, W), H and W multiples of 2**(levels-1) -> heat-map logits
    (N, 1, H, W). Modules are named enc0.., dec0.. so three-level files keep loading."""

    def __init__(self, widths: Sequence[int] = (16, 32, 48), in_channels: int = 1) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        self.levels = len(widths)
        for i, w in enumerate(widths):
            setattr(self, f"enc{i}", _block(in_channels if i == 0 else widths[i - 1], w))
        for i in range(self.levels - 1):
            setattr(self, f"dec{i}", _block(widths[i + 1] + widths[i], widths[i]))
        self.head = nn.Conv2d(widths[0], 1, 1)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i in range(self.levels):
            x = getattr(self, f"enc{i}")(x if i == 0 else self.pool(x))
            skips.append(x)
        for i in range(self.levels - 2, -1, -1):
            x = getattr(self, f"dec{i}")(torch.cat([self.up(x), skips[i]], 1))
        return self.head(x)


def network_input(od: np.ndarray, params: PointSettings, work_px: float) -> np.ndarray:
    """(C, H, W) network input of a working-resolution darkness map: the darkness, and with `contrast_um` its
    local contrast (darkness minus its Gaussian blur of `contrast_um`)."""
    od = np.asarray(od, dtype=np.float32)
    if params.contrast_um <= 0:
        return od[None]
    local = od - ndi.gaussian_filter(od, params.contrast_um / work_px, mode="reflect")
    return np.stack([od, local.astype(np.float32)])


@dataclass
class _Field:
    od: np.ndarray  # network input (C, H, W) at the working resolution
    target: np.ndarray  # heat map, 1 at each point
    points: np.ndarray  # working px, x y
    scale: float


def _prepare(image: np.ndarray, points_xy: np.ndarray, mpp: float, settings: PointSettings) -> _Field:
    od, scale = to_working(darkness(image), _check_mpp(mpp), settings.work_mpp)
    pts = (np.asarray(points_xy, dtype=float).reshape(-1, 2) + 0.5) * scale - 0.5
    mask = np.ones(od.shape, dtype=bool)
    rc = np.round(pts[:, ::-1]).astype(int)
    ok = (rc[:, 0] >= 0) & (rc[:, 0] < od.shape[0]) & (rc[:, 1] >= 0) & (rc[:, 1] < od.shape[1])
    mask[rc[ok, 0], rc[ok, 1]] = False
    if ok.any():
        dist = ndi.distance_transform_edt(mask)
        sigma = settings.sigma_um / (mpp / scale)
        target = np.exp(-(dist**2) / (2 * sigma**2)).astype(np.float32)
    else:
        target = np.zeros(od.shape, dtype=np.float32)
    return _Field(od=network_input(od, settings, mpp / scale), target=target, points=pts, scale=scale)


def _pad_to(arr: np.ndarray, size: int) -> np.ndarray:
    """Pad the last two axes up to `size`."""
    h, w = arr.shape[-2:]
    ph, pw = max(0, size - h), max(0, size - w)
    pad = [(0, 0)] * (arr.ndim - 2) + [(0, ph), (0, pw)]
    return np.pad(arr, pad, mode="reflect" if min(h, w) > max(ph, pw) else "edge")


def _augment(od: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`od` (C, H, W): channel 0 the darkness, any other a background-free contrast (no brightness shift)."""
    k = int(rng.integers(4))
    od, target = np.rot90(od, k, axes=(-2, -1)), np.rot90(target, k)
    if rng.random() < 0.5:
        od, target = od[..., ::-1], target[:, ::-1]
    od = od * rng.uniform(0.7, 1.4)  # contrast (stain strength)
    od[0] = od[0] + rng.uniform(-0.05, 0.05)  # brightness (glass)
    if rng.random() < 0.3:
        od = ndi.gaussian_filter(od, (0, *(2 * [rng.uniform(0.3, 1.2)])))  # focus
    od = od + rng.normal(0.0, rng.uniform(0.0, 0.02), od.shape)
    return np.ascontiguousarray(od, dtype=np.float32), np.ascontiguousarray(target)


def _batch(fields: list[_Field], settings: PointSettings, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    p = settings.patch_px
    xs, ys = [], []
    for _ in range(settings.batch):
        f = fields[int(rng.integers(len(fields)))]
        od, tg = _pad_to(f.od, p), _pad_to(f.target, p)
        r, c = int(rng.integers(od.shape[-2] - p + 1)), int(rng.integers(od.shape[-1] - p + 1))
        a, b = _augment(od[:, r : r + p, c : c + p].copy(), tg[r : r + p, c : c + p], rng)
        xs.append(a)
        ys.append(b)
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)[:, None])


class PointDetector:
    """Trained heat-map networks (one, or the members of an ensemble) with their settings; call it like any
    detector: `detector(image, mpp)`."""

    name = "points"

    def __init__(self, net: HeatNet | Sequence[HeatNet], params: PointSettings,
                 record: dict[str, Any] | None = None) -> None:
        self.nets: list[HeatNet] = [n.eval() for n in ([net] if isinstance(net, HeatNet) else net)]
        if len(self.nets) != params.ensemble:
            raise ValueError(f"{len(self.nets)} networks for an ensemble of {params.ensemble}")
        self.params = params
        self.record: dict[str, Any] = dict(record or {})
        self.settings: dict[str, Any] = {"detector": self.name, **params.to_dict()}

    @property
    def net(self) -> HeatNet:
        """The first (or only) member's network."""
        return self.nets[0]

    def heat_map(self, od: np.ndarray, work_px: float | None = None, tta: bool | None = None) -> np.ndarray:
        """The predicted map (0..1) of a working-resolution darkness map (`work_px` um per pixel, by default the
        working mpp): the mean of the members' maps; with `tta` (default: the setting) the mean over its eight
        flips and turns too."""
        h, w = od.shape
        m = self.params.multiple
        ph, pw = (-h) % m, (-w) % m
        inp = network_input(od, self.params, self.params.work_mpp if work_px is None else work_px)
        x = np.pad(inp, ((0, 0), (0, ph), (0, pw)), mode="reflect" if min(h, w) > max(ph, pw) else "edge")
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
        use_tta = self.params.tta if tta is None else tta
        out = torch.zeros_like(x[:, :1])
        with torch.inference_mode():
            for net in self.nets:
                if not use_tta:
                    out += torch.sigmoid(net(x))
                    continue
                for flip in (False, True):
                    xf = torch.flip(x, (-1,)) if flip else x
                    for k in range(4):
                        y = torch.rot90(torch.sigmoid(net(torch.rot90(xf, k, (-2, -1)))), -k, (-2, -1))
                        out += torch.flip(y, (-1,)) if flip else y
        out /= len(self.nets) * (8 if use_tta else 1)
        return out[0, 0, :h, :w].numpy()

    def peaks(self, heat: np.ndarray, work_px: float, threshold: float | None = None) -> np.ndarray:
        """(row, col) of the map's local maxima at least `min_separation_um` apart and `threshold` high."""
        thr = self.params.threshold if threshold is None else threshold
        window = int(round(2 * self.params.min_separation_um / work_px)) + 1
        top = (heat == ndi.maximum_filter(heat, size=window, mode="nearest")) & (heat >= thr)
        lab, n = ndi.label(top)
        if n == 0:
            return np.zeros((0, 2), dtype=int)
        return np.round(np.asarray(ndi.center_of_mass(top, lab, np.arange(1, n + 1)))).astype(int).reshape(-1, 2)

    def __call__(self, image: np.ndarray, mpp: float) -> Nuclei:
        mpp = _check_mpp(mpp)
        od, scale = to_working(darkness(image), mpp, self.params.work_mpp)
        work_px = mpp / scale
        heat = self.heat_map(od, work_px)
        seeds = self.peaks(heat, work_px)
        measure = replace(ClassicSettings(), work_mpp=self.params.work_mpp)
        smooth = ndi.gaussian_filter(_tophat(od, measure, work_px), measure.sigma_um / work_px)
        table, labels = measure_regions(od, smooth, seeds, measure, work_px,
                                        solidity_where=lambda t: np.zeros(len(t["x"]), dtype=bool))  # not used
        missing = ~np.isfinite(table["x"])  # a seed on a flat spot grows no region: keep it, area 0
        table["x"][missing], table["y"][missing] = seeds[missing, 1], seeds[missing, 0]
        table["area_um2"][missing] = 0.0
        table["darkness_od"][missing] = od[seeds[missing, 0], seeds[missing, 1]]
        table["x"], table["y"] = seeds[:, 1].astype(float), seeds[:, 0].astype(float)  # the map's peak is the spot
        cands = Candidates(table=table, labels=labels, od=od, scale=scale, mpp=mpp)
        confidence = heat[seeds[:, 0], seeds[:, 1]] if len(seeds) else np.zeros(0)
        return nuclei_from(cands, np.ones(len(seeds), dtype=bool), measure, confidence=confidence)

    def save(self, path: str | Path) -> Path:
        """One file: every member's weights, settings, working mpp, training record, versions."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "format": FORMAT,
                "state_dicts": [net.state_dict() for net in self.nets],
                "settings": self.params.to_dict(),
                "work_mpp": self.params.work_mpp,
                "record": json.loads(json.dumps(self.record)),
                "versions": _versions(),
            },
            path,
        )
        return path


def _versions() -> dict[str, str]:
    import scipy

    from cytoretrieve.version import __version__ as ours

    return {"cytoretrieve": str(ours), "torch": str(torch.__version__), "numpy": str(np.__version__),
            "scipy": str(scipy.__version__), "python": platform.python_version()}


def load(path: str | Path, **overrides: Any) -> PointDetector:
    """A detector saved by `PointDetector.save`; `overrides` change detection settings (e.g. `threshold`)."""
    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") not in FORMATS:
        raise ValueError(f"{path} is not a point-detector file ({' or '.join(FORMATS)})")
    states = blob["state_dicts"] if "state_dicts" in blob else [blob["state_dict"]]
    raw = dict(blob["settings"])
    raw["widths"] = tuple(raw["widths"])
    params = PointSettings(**raw)
    if "ensemble" in overrides:
        raise ValueError("`ensemble` is fixed by the file's networks")
    unknown = set(overrides) - set(raw)
    if unknown:
        raise ValueError(f"unknown point detector settings: {sorted(unknown)}")
    params = replace(params, **overrides)
    params.validate()
    if len(states) != params.ensemble:
        raise ValueError(f"{path} holds {len(states)} networks for an ensemble of {params.ensemble}")
    nets = []
    for state in states:
        net = HeatNet(params.widths, params.channels)
        net.load_state_dict(state)
        nets.append(net)
    record = {**blob.get("record", {}), "versions": blob.get("versions", {})}
    return PointDetector(nets, params, record)


# Settings that only change how a trained map is read, not the networks: members may differ in them.
DETECTION_SETTINGS = ("threshold", "min_separation_um", "match_radius_um", "tta")


def combine(members: Sequence[PointDetector], **detection: Any) -> PointDetector:
    """One ensemble detector of `members` trained alike (same settings and training data, consecutive seeds,
    one network each); `detection` sets `threshold`, `min_separation_um`, `match_radius_um` or `tta` (default:
    the first member's). The record keeps the members' own records."""
    if not members:
        raise ValueError("no members to combine")
    unknown = set(detection) - set(DETECTION_SETTINGS)
    if unknown:
        raise ValueError(f"only detection settings can be set when combining, not {sorted(unknown)}")
    members = sorted(members, key=lambda m: m.params.seed)
    if any(m.params.ensemble != 1 for m in members):
        raise ValueError("combine joins single-network detectors")
    fixed = [{k: v for k, v in m.params.to_dict().items() if k not in (*DETECTION_SETTINGS, "seed")} for m in members]
    if any(f != fixed[0] for f in fixed[1:]):
        raise ValueError("members differ in their training settings")
    names = [m.record.get("names") for m in members]
    if any(n != names[0] for n in names[1:]):
        raise ValueError("members were trained on different data")
    seeds = [m.params.seed for m in members]
    if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise ValueError(f"members need consecutive seeds, not {seeds}")
    params = replace(members[0].params, ensemble=len(members), **detection)
    params.validate()
    first = members[0].record
    record = {k: first[k] for k in ("fields", "points", "names", "mpps") if k in first}
    record["members"] = [{"seed": m.params.seed, **{k: m.record.get(k) for k in ("train_cpu_s", "final_loss")}}
                         for m in members]
    record["train_cpu_s"] = round(sum(float(m.record.get("train_cpu_s") or 0.0) for m in members), 1)
    return PointDetector([m.net for m in members], params, record)


Sample = tuple[np.ndarray, np.ndarray, float]  # image, points (n, 2) x y in its pixels, mpp


def choose_threshold(detector: PointDetector, samples: Sequence[Sample], grid: Sequence[float] | None = None) -> tuple[float, Counts]:
    """The map threshold with the best F1 on `samples` (matched within `match_radius_um`), and its counts."""
    grid = list(grid or np.round(np.arange(0.15, 0.96, 0.05), 2))
    totals = {t: Counts() for t in grid}
    for image, points, mpp in samples:
        od, scale = to_working(darkness(image), _check_mpp(mpp), detector.params.work_mpp)
        work_px = mpp / scale
        heat = detector.heat_map(od, work_px)
        truth = (np.asarray(points, dtype=float).reshape(-1, 2) + 0.5) * scale - 0.5
        radius = detector.params.match_radius_um / work_px
        for t in grid:
            rc = detector.peaks(heat, work_px, t)
            totals[t] = totals[t] + count(rc[:, ::-1].astype(float), truth, radius)
    best = max(grid, key=lambda t: (totals[t].f1, -abs(t - 0.5)))
    return float(best), totals[best]


def _train_net(fields: list[_Field], params: PointSettings, seed: int) -> tuple[HeatNet, dict[str, Any]]:
    """One network trained on prepared `fields` with `seed`, and its record (CPU time, final loss)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = HeatNet(params.widths, params.channels)
    opt = torch.optim.Adam(net.parameters(), lr=params.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=params.lr, total_steps=max(1, params.steps), pct_start=0.1)
    started = time.process_time()
    net.train()
    losses = []
    for _ in range(params.steps):
        x, y = _batch(fields, params, rng)
        logits = net(x)
        weight = 1.0 + params.positive_weight * y
        if params.loss == "bce":
            loss = (nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * weight).mean()
        else:
            loss = ((torch.sigmoid(logits) - y) ** 2 * weight).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return net, {"seed": seed, "train_cpu_s": round(time.process_time() - started, 1),
                 "final_loss": float(np.mean(losses[-50:])) if losses else None}


def train_point_detector(
    samples: Sequence[Sample],
    *,
    names: Sequence[str] | None = None,
    settings: PointSettings | None = None,
    tune_threshold: bool = True,
    **overrides: Any,
) -> PointDetector:
    """Train a `PointDetector` on (image, points_xy, mpp) samples; deterministic for a given `seed`.

    With `ensemble` = N > 1, N networks with seeds `seed` .. `seed` + N - 1, member i the very network a single
    training with seed `seed` + i gives. `names` (one per sample, e.g. file names) go into the model's training
    record. With `tune_threshold` the detection threshold is the one with the best F1 on the same samples (else
    `settings.threshold`).
    """
    params = replace(settings or PointSettings(), **overrides)
    params = replace(params, widths=tuple(int(w) for w in params.widths))
    params.validate()
    if params.patch_px % params.multiple:
        raise ValueError(f"`patch_px` must be a multiple of {params.multiple} for {len(params.widths)} levels")
    if not samples:
        raise ValueError("no training samples")
    fields = [_prepare(img, pts, mpp, params) for img, pts, mpp in samples]
    trained = [_train_net(fields, params, seed) for seed in params.seeds]
    record: dict[str, Any] = {
        "fields": len(samples),
        "points": int(sum(len(np.asarray(p).reshape(-1, 2)) for _, p, _ in samples)),
        "names": list(names) if names is not None else None,
        "mpps": sorted({float(m) for _, _, m in samples}),
        "train_cpu_s": round(sum(r["train_cpu_s"] for _, r in trained), 1),
    }
    if params.ensemble == 1:
        record["final_loss"] = trained[0][1]["final_loss"]
    else:
        record["members"] = [r for _, r in trained]
    nets = [net for net, _ in trained]
    detector = PointDetector(nets, params, record)
    if tune_threshold:
        thr, counts = choose_threshold(detector, samples)
        detector = PointDetector(nets, replace(params, threshold=thr), {**record, "threshold_train_counts": counts.to_dict()})
    return detector
