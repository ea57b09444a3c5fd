"""`cytoretrieve transfer`: k-NN fitted on support tables' binary labels, scored on a target table (paper's Table 3)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table as RichTable

from cytoretrieve.cli import options
from cytoretrieve.cli.messages import incomplete_tables
from cytoretrieve.queries.knn import votes_help


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _metrics(results: list, positives_only: bool) -> list[tuple[str, list[str]]]:  # noqa: ANN001 - TransferResults
    rows = [("sensitivity", [_num(r.sensitivity) for r in results])]
    if not positives_only:
        rows += [("specificity", [_num(r.specificity) for r in results]), ("F1", [_num(r.f1) for r in results]),
                 ("balanced accuracy", [_num(r.balanced_accuracy) for r in results])]
    return rows + [("k", [f"{r.k} (cv)" if r.k_selected else str(r.k) for r in results])]


def _view(title: str, backbone: str, columns: list[str], results: list, positives_only: bool,
          width: int) -> RichTable:  # noqa: ANN001
    """One column per support set when they fit the terminal; else one row per support set (never a dropped
    column)."""
    metrics = _metrics(results, positives_only)
    wide = len(backbone) + 3 + len("balanced accuracy") + 3 + sum(max(len(c), 6) + 3 for c in columns) + 2
    view = RichTable(title=title, box=box.SIMPLE_HEAD)
    if wide <= width:
        view.add_column("backbone", no_wrap=True)
        view.add_column("", no_wrap=True)
        for name in columns:
            view.add_column(name, justify="right", no_wrap=True)
        for i, (metric, values) in enumerate(metrics):
            view.add_row(backbone if i == 0 else "", metric, *values, style="bold" if i == 0 else None)
        return view
    view.caption = f"backbone {backbone}"
    view.add_column("support", overflow="fold")
    for metric, _ in metrics:
        view.add_column("bal. acc." if metric == "balanced accuracy" else metric, justify="right", no_wrap=True)
    for j, name in enumerate(columns):
        view.add_row(name, *[values[j] for _, values in metrics])
    return view


def _column_names(groups: list[list]) -> list[str]:
    """One column per support set: its datasets joined by '+' (herlev+sipakmed); table names when those collide."""
    def dataset(t) -> str:  # noqa: ANN001 - a store.VectorTable
        return str((t.meta.get("dataset") or {}).get("name") or t.name)

    names = ["+".join(dataset(t) for t in group) for group in groups]
    if len(set(names)) != len(names):
        names = ["+".join(t.name for t in group) for group in groups]
    return names


def transfer(
    support: Annotated[list[str], typer.Option("--support", "-s", help="Support table(s), comma-separated to merge (H+S); repeat for more columns.")],
    target: Annotated[str, typer.Option("--target", help="Table the k-NN is evaluated on (its binary labels).")],
    store: options.Store = options.DEFAULT_STORE,
    k: Annotated[int | None, typer.Option("--k", help="Neighbours; default: chosen by weighted F1 in cross-validation on the support.")] = None,
    ks: Annotated[str, typer.Option("--ks", help="k values tried when --k is not given: 1-50, or 1,5,10,20.")] = "1-50",
    folds: Annotated[int, typer.Option("--folds", help="Stratified folds of the cross-validation choosing k.")] = 5,
    vote: Annotated[str, typer.Option("--vote", help=f"{votes_help()}.")] = "majority",
    temperature: Annotated[float, typer.Option("--temperature", help="T of the weighted vote.")] = 0.07,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the cross-validation folds.")] = 0,
    labels: options.Labels = "stored",
    json_out: options.JsonOut = None,
) -> None:
    """Cross-dataset transfer, as in the paper (Table 3): fit k-NN on support tables, evaluate on a target table.

    Support tables are reduced to their binary labels (positive / negative; rows with neither are left out) and
    merged. k is the k with the best weighted F1 in --folds stratified cross-validation on the support, unless
    --k is given. On the target: sensitivity when it holds positives only; otherwise also specificity, F1,
    balanced accuracy and the confusion matrix. Every table must come from the same backbone. Each --support is
    one column of the output.

    Example: cytoretrieve transfer --support herlev_resnet50 --support sipakmed_resnet50 --support herlev_resnet50,sipakmed_resnet50 --target cric_resnet50 --json t3.json
    """
    with Console(stderr=True).status("loading the store and the k-NN protocol", spinner="dots"):
        from cytoretrieve.errors import CytoError
        from cytoretrieve.queries.knn import parse_ks
        from cytoretrieve.queries.transfer import check_fingerprints
        from cytoretrieve.queries.transfer import transfer as run_transfer
        from cytoretrieve.store.tables import Store

    specs = [[name.strip() for name in s.split(",")] for s in support]
    if any(not name for spec in specs for name in spec):
        raise CytoError(f"empty table name in --support {', '.join(support)!r}")
    if k is not None and k < 1:
        raise CytoError(f"--k must be >= 1 (got {k})")
    k_values = parse_ks(ks) if k is None else None
    st = Store(store)
    opened = {name: st.open(name) for spec in specs for name in spec}
    target_table = st.open(target)
    check_fingerprints([*opened.values(), target_table])  # every column at once: one error names them all
    groups = [[opened[name] for name in spec] for spec in specs]
    with incomplete_tables(store, [*opened, target]):
        results = [run_transfer(group, target_table, k, ks=k_values, folds=folds, vote=vote, temperature=temperature,
                                seed=seed, labels=labels) for group in groups]
    columns = _column_names(groups)

    first = results[0]
    negatives = first.n_target - first.n_target_positive
    title = (f"Transfer to {target}: {first.n_target} cells ({first.n_target_positive} positive, {negatives} "
             f"negative), {vote} vote")
    console = Console()
    view = _view(title, f"{first.arch} {first.fingerprint[:12]}", columns, results, first.positives_only,
                 console.width)
    console.print(view)
    for name, r in zip(columns, results):
        line = (f"{name}: support {r.n_support} vectors ({r.n_support_positive} positive) from "
                f"{', '.join(r.support)}")
        if r.k_selected:
            line += f"; k by {r.folds}-fold weighted F1 {max(r.cv_f1_curve):.3f}"
        if r.confusion is not None:
            (tn, fp), (fn, tp) = r.confusion
            line += f"; confusion TN {tn} FP {fp} FN {fn} TP {tp}"
        console.print(line, soft_wrap=True)
    reviews = ", ".join(f"{name} {n}" for name, n in first.reviewed_rows.items())
    console.print(f"{first.labels} labels; rows carrying a review: {reviews}", soft_wrap=True)
    if first.n_target_unlabelled:
        console.print(f"{target}: {first.n_target_unlabelled} rows without a binary label left out", soft_wrap=True)

    if json_out:
        options.write_json({"target": target, "backbone": target_table.meta["backbone"],
                            "results": [{"column": name, **r.to_dict()} for name, r in zip(columns, results)]},
                           json_out)
