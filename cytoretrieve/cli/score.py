"""`cytoretrieve score`: slide scoring by multiple-instance learning over stored tile vectors, cross-validated over
the split file's folds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cytoretrieve.cli import options
from cytoretrieve.cli.messages import incomplete_tables
from cytoretrieve.queries.mil.methods import DEFAULT_METHOD, methods_help

_SHORT = {"auc": "AUC", "balanced_accuracy": "bal. acc.", "sensitivity": "sens.", "specificity": "spec.", "f1": "F1",
          "accuracy": "acc."}


def score(
    tiles: Annotated[str, typer.Option("--tiles", "-t", help="Vector table of tiles (or any vector table with a group column).")],
    labels: Annotated[Path, typer.Option("--labels", help="Slide labels CSV (slide,label,binary): the group-label file.")],
    split: Annotated[Path, typer.Option("--split", help="Split file from `cytoretrieve split` covering the labelled slides.")],
    method: Annotated[str, typer.Option("--method", "-m", help=f"{methods_help()}.")] = DEFAULT_METHOD,
    store: options.Store = options.DEFAULT_STORE,
    group_column: Annotated[str, typer.Option("--group-column", help="Column naming each row's bag (slide, group).")] = "slide",
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs (trained methods).")] = 40,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 5e-4,
    clip: Annotated[float, typer.Option("--clip", min=0.0, help="Trained methods: the standardised tile features are limited to +- this many standard deviations, in training and in scoring, so that one outlying value cannot drive a slide's score (0 = off; BENCHMARKS.md, \"MIL benchmarks\").")] = 5.0,
    instance_negatives: Annotated[float, typer.Option("--instance-negatives", help="Weight of the loss making every tile of a negative slide a negative instance (0 = off).")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", help="k of top-k instance pooling (--method topk).")] = 4,
    positives: Annotated[str | None, typer.Option("--positives", help="Table of annotated cells / tiles (e.g. an embedded `annotations import` table); its binary = 1 rows are the retrieval positives (default: tiles of positive training slides) and the cells --augment-positives inserts. A fold never uses those of its own validation / test slides.")] = None,
    row_labels: Annotated[str, typer.Option("--row-labels", help="Which labels of the rows pick the --positives (--labels is the slide labels file): stored, or reviewed (a row's latest expert review where it has one, `cytoretrieve labels`).")] = "stored",
    augment_positives: Annotated[float, typer.Option("--augment-positives", min=0.0, max=1.0, help="Positive-bag augmentation (trained methods, needs --positives): each epoch, each negative training slide is, with this probability, also trained on as a positive holding 1..--augment-max annotated positives (0 = off).")] = 0.0,
    augment_max: Annotated[int, typer.Option("--augment-max", min=1, help="Most annotated positives inserted into one augmented bag.")] = 4,
    stream: Annotated[bool | None, typer.Option("--stream/--no-stream", help="Read each slide's vectors from the store when needed instead of holding all bags in memory (default: stream only when they would take over half the available memory).", show_default=False)] = None,
    neighbours: Annotated[int, typer.Option("--neighbours", help="Neighbours per reference set (retrieval).")] = 10,
    top_m: Annotated[int, typer.Option("--top-m", help="Slide score = mean of its top-m tile scores (retrieval).")] = 10,
    references: Annotated[str, typer.Option("--references", help="Retrieval references of more than 50,000 tiles: centroids (cluster means of one k-means of both sides, plus small clusters of the positive tiles the tile score itself flags, so rare abnormal patterns keep their own; ~5 s instead of ~2 min for a 1.5M-tile cohort, slide AUC within noise of tiles on the benchmark's cohorts) or tiles (every training tile, searched one by one; BENCHMARKS.md).")] = "centroids",
    device: options.Device = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the training runs.")] = 0,
    json_out: options.JsonOut = None,
    out: Annotated[Path | None, typer.Option("--out", help="Folder: roc.png, top_tiles.json (each slide's top tiles, ids `search --id` opens), scores.csv, and heatmaps/<slide>.png (tile scores over the slide thumbnail) and geojson/<slide>.geojson (QuPath objects: tile score measured, predicted class; tile tables only).")] = None,
    n_top: Annotated[int, typer.Option("--n-top", help="Top tiles per slide written by --out.")] = 10,
    objects: Annotated[str, typer.Option("--objects", help="QuPath object type of the tiles in --out's geojson/<slide>.geojson: tile or detection.")] = "tile",
    where: Annotated[str | None, typer.Option("--where", help="SQL filter on the tile rows: only those it matches join the bags, e.g. \"focus > 0.2\" (sharp tiles only).")] = None,
    save_scores: Annotated[str | None, typer.Option("--save-scores", metavar="NAME", help="Save the run's out-of-fold tile scores in the store under NAME, for `serve` to draw over each slide (a name already saved is refused without --overwrite).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="With --save-scores: replace the run saved under NAME.")] = False,
) -> None:
    """Score whole slides from their tile vectors, cross-validated over the folds of --split.

    Each slide is a bag of its tile vectors. For each fold f: test = fold f, validation = fold f+1, train = the
    rest; the threshold maximises sensitivity + specificity - 1 on validation. Reports AUC, balanced accuracy,
    sensitivity, specificity and F1 per fold and as mean ± std. Tiles of slides without a label are ignored (and
    counted); labels naming slides without tiles are an error.

    Cytology-aware options: --instance-negatives (every tile of a negative slide is a negative instance),
    --method topk, --augment-positives with --positives (annotated abnormal cells inserted into negative slides
    make extra positive bags). Bags larger than half the free memory are streamed from the store.

    Example: cytoretrieve score --tiles cohort_tiles_dino_vits --labels slides.csv --split split.json --method gated --out scores/

    Sharp tiles only, scores kept for the viewer: ... --where "focus > 0.2" --save-scores gated-sharp

    With annotated cells: cytoretrieve score --tiles cohort_tiles_dino_vits --labels slides.csv --split split.json --positives cohort_annotations_cells_dino_vits --augment-positives 0.3
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table as RichTable

    with Console(stderr=True).status("loading torch, the store and the MIL methods", spinner="dots"):
        from cytoretrieve.errors import CytoError
        from cytoretrieve.queries.mil.methods import get_method
        from cytoretrieve.queries.mil.metrics import METRICS
        from cytoretrieve.queries.mil.retrieval import REFERENCES, RetrievalConfig
        from cytoretrieve.queries.mil.score import score_table, top_tiles
        from cytoretrieve.queries.mil.train import MILTrainConfig, resolve_device
        from cytoretrieve.views.plots import plot_roc

    get_method(method)  # an unknown one fails here, before any work
    if epochs < 1 or top_k < 1 or neighbours < 1 or top_m < 1 or n_top < 1 or lr <= 0 or instance_negatives < 0:
        raise CytoError("--epochs, --top-k, --neighbours, --top-m, --n-top must be >= 1, --lr > 0, --instance-negatives >= 0")
    if references not in REFERENCES:
        raise CytoError(f"unknown --references '{references}' (one of {', '.join(REFERENCES)})")
    if out is not None and out.exists() and not out.is_dir():
        raise CytoError(f"--out {out} exists and is not a folder")
    if objects not in ("tile", "detection"):
        raise CytoError(f"--objects must be tile or detection, not {objects!r}")
    _check_save(store, save_scores, overwrite)
    train_cfg = MILTrainConfig(epochs=epochs, lr=lr, top_k=top_k, clip=clip, instance_negatives=instance_negatives,
                               augment_positives=augment_positives, augment_max=augment_max, seed=seed,
                               device=resolve_device(device))  # the method's record sets its pooling
    ret_cfg = RetrievalConfig(k=neighbours, top_m=top_m, references=references)
    with incomplete_tables(store, [tiles, *([positives] if positives else [])]):
        result, bags, table = score_table(store, tiles, labels, split, method, group_column=group_column,
                                          train_config=train_cfg, retrieval_config=ret_cfg, positives_table=positives,
                                          stream=stream, row_labels=row_labels, where=where)

    console = Console()
    view = RichTable(title=f"{method}: slide scores, {len(result.folds)} folds of {split.name}", box=box.SIMPLE_HEAD)
    view.add_column("fold", no_wrap=True)
    view.add_column("tr/va/te", justify="right", no_wrap=True)
    for k in METRICS:
        view.add_column(_SHORT[k], justify="right")
    for fr in result.folds:
        view.add_row(str(fr.fold), f"{fr.n_train}/{fr.n_val}/{fr.n_test}", *[f"{fr.metrics[k]:.3f}" for k in METRICS])
    view.add_row("mean", "", *[f"{result.mean[k]:.3f}" for k in METRICS], style="bold")
    view.add_row("± std", "", *[f"{result.std[k]:.3f}" for k in METRICS])
    console.print(view)
    console.print(f"{len(bags)} slides ({int(bags.y.sum())} positive), {bags.instances} tiles of dimension {bags.dim}")
    for note in result.notes:
        console.print(f"note: {note}")

    if save_scores is not None:
        saved = _save(store, save_scores, overwrite, result, bags, table)
        console.print(f"saved {saved.tiles} tile scores of {saved.slides} slide(s) as score run '{saved.run}' "
                      "(`serve` draws them over each slide)")
    if json_out:
        options.write_json({"tiles": tiles, "labels": str(labels), "split": str(split), **result.to_dict()}, json_out)
    if out is not None:
        from cytoretrieve.views.heatmap import write_heatmaps
        from cytoretrieve.views.score_geojson import write_score_geojson

        out.mkdir(parents=True, exist_ok=True)
        maps, map_notes = write_heatmaps(table, result, bags, out, group_column=group_column)
        shapes, shape_notes = write_score_geojson(table, result, bags, out, group_column=group_column, object_type=objects)
        for note in map_notes + shape_notes:
            console.print(f"note: {note}")
        plot_roc(result, out / "roc.png", title=f"{tiles}: {method}")
        options.write_json(top_tiles(result, bags, n_top), str(out / "top_tiles.json"))
        from cytoretrieve.faults import failpoint

        failpoint("score-output")
        lines = [f"{s},{y},{fo},{sc:.6g}\n" for s, y, fo, sc in zip(result.slides, result.y, result.fold_of, result.scores)]
        partial = out / "scores.csv.tmp"  # written whole, then renamed: a killed run never leaves half a file
        partial.write_text("slide,binary,fold,score\n" + "".join(lines))
        partial.replace(out / "scores.csv")
        heat = f", {len(maps)} heat maps in {out / 'heatmaps'}" if maps else ""
        heat += f", {len(shapes)} QuPath GeoJSON files in {out / 'geojson'}" if shapes else ""
        console.print(f"written: {out / 'roc.png'}, {out / 'top_tiles.json'}, {out / 'scores.csv'}{heat}")


def _check_save(store: str, name: str | None, overwrite: bool) -> None:
    """--save-scores NAME / --overwrite checked before any work: a bad or taken name is refused at once."""
    from cytoretrieve.errors import CytoError

    if name is None:
        if overwrite:
            raise CytoError("--overwrite replaces a run saved by --save-scores NAME: give --save-scores too")
        return
    from cytoretrieve.store.scores import check_run_name, find_run
    from cytoretrieve.store.tables import Store

    check_run_name(name)
    if not overwrite and find_run(Store(store), name) is not None:
        raise CytoError(f"a score run named '{name}' is already saved: choose another --save-scores NAME or pass --overwrite")


def _save(store: str, name: str, overwrite: bool, result: Any, bags: Any, table: Any) -> Any:  # noqa: ANN401
    """The run's out-of-fold tile scores saved in the store under `name` (as the heat maps colour them)."""
    from cytoretrieve.queries.mil.score import tile_score_rows
    from cytoretrieve.store.scores import save_scores
    from cytoretrieve.store.tables import Store
    from cytoretrieve.views.heatmap import display_scores

    rows = tile_score_rows(result, bags, table, display=display_scores)
    return save_scores(Store(store), name, table.name, table.version, result.method, rows, overwrite=overwrite)
