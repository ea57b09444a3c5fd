"""Figures for k-NN results: one PNG with the F1-vs-k curve and the confusion matrix at k*.

matplotlib is imported inside the function (Agg canvas, no pyplot state) so importing cytoretrieve stays light
and plotting works headless.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cytoretrieve.queries.knn import ClassifyResult


def plot_classify(result: ClassifyResult, path: Path, title: str | None = None) -> None:
    """Write `path` (PNG): weighted F1 vs k (mean, +-std band, k* marked) and the row-normalised confusion at k*."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_classes = len(result.classes)
    side = max(4.5, 0.6 * n_classes + 2)
    fig = Figure(figsize=(6.5 + side, side), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    curve_ax, conf_ax = fig.subplots(1, 2, width_ratios=[6.5, side])
    _draw_curve(curve_ax, result)
    _draw_confusion(fig, conf_ax, result)
    fig.suptitle(title or (f"k-NN ({result.vote} vote), {result.runs} runs: k*={result.k_best}, "
                           f"weighted F1 {result.weighted_f1_mean:.3f} ± {result.weighted_f1_std:.3f}"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def _draw_curve(ax, result: ClassifyResult) -> None:
    ks = np.array(result.ks)
    mean, std = np.array(result.f1_curve_mean), np.array(result.f1_curve_std)
    ax.plot(ks, mean, color="tab:blue", marker="o" if len(ks) < 15 else None, label="mean weighted F1")
    ax.fill_between(ks, mean - std, mean + std, color="tab:blue", alpha=0.2, label="± std over runs")
    ax.axvline(result.k_best, color="tab:red", linestyle="--", linewidth=1)
    ax.plot([result.k_best], [result.weighted_f1_mean], "o", color="tab:red",
            label=f"k* = {result.k_best} ({result.weighted_f1_mean:.3f})")
    ax.set_xlabel("k (neighbours)")
    ax.set_ylabel("weighted F1")
    ax.set_title("Weighted F1 vs k")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")


def _draw_confusion(fig, ax, result: ClassifyResult) -> None:
    counts = np.array(result.confusion)
    rows = counts.sum(axis=1, keepdims=True)
    share = counts / np.maximum(rows, 1)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i, j in np.ndindex(counts.shape):
        ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                color="white" if share[i, j] > 0.5 else "black")
    ticks = range(len(result.classes))
    ax.set_xticks(ticks, result.classes, rotation=45, ha="right")
    ax.set_yticks(ticks, result.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion at k*={result.k_best} (summed over {result.runs} runs)")
    fig.colorbar(image, ax=ax, fraction=0.046, label="row share")


def plot_roc(result, path, title: str | None = None) -> None:  # noqa: ANN001 - a queries.mil.evaluate.CVResult
    """ROC of the out-of-fold slide scores (bold) and of each test fold (thin), with the AUCs."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cytoretrieve.queries.mil.metrics import auc, roc_curve

    fig = Figure(figsize=(5, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    y, s, fo = np.asarray(result.y), np.asarray(result.scores), np.asarray(result.fold_of)
    for fr in result.folds:
        m = fo == fr.fold
        if len(set(y[m].tolist())) == 2:
            fpr, tpr = roc_curve(y[m], s[m])
            ax.plot(fpr, tpr, lw=0.8, alpha=0.5, label=f"fold {fr.fold} (AUC {fr.metrics['auc']:.3f})")
    fpr, tpr = roc_curve(y, s)
    ax.plot(fpr, tpr, lw=2.2, color="black", label=f"out-of-fold (AUC {auc(y, s):.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title or f"{result.method}: slide ROC")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path))
