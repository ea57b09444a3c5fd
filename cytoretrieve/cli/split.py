"""`cytoretrieve split`: slide -> fold, stratified by slide label, in one file every experiment reads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table as RichTable


def split(
    labels: Annotated[Path, typer.Option("--labels", help="CSV slide,label[,binary][,path]: one row per slide.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The split file to write (JSON).")] = Path("split.json"),
    folds: Annotated[int, typer.Option("--folds", help="Number of folds (each slide is in exactly one).")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the shuffle: the same seed and labels give the same split.")] = 0,
    slides: Annotated[list[Path] | None, typer.Option("--slides", help="Slide files or folders to check the labels against (repeatable): labels naming slides not found there are an error.")] = None,
) -> None:
    """Assign every slide of a labels CSV to one of --folds folds, stratified by its label, and write the split
    file that training, transfer and MIL scoring read (`cytoretrieve.sources.cohort.split.load_split`), so every
    experiment uses the same slide-level splits.

    The slides named must exist: the CSV's path column (when it has one) and --slides are checked.

    Example: cytoretrieve split --labels slides.csv --folds 4 --seed 0 --out split.json
    """
    from cytoretrieve.sources.cohort.labels import expand_slides, match_labels, read_labels, slides_from_labels
    from cytoretrieve.sources.cohort.split import make_split, write_split

    table = read_labels(labels)
    if any(lab.path for lab in table.values()):
        slides_from_labels(table)  # every path must exist
    if slides:
        match_labels(expand_slides(slides), table)
    result, notes = make_split(table, folds=folds, seed=seed, source=str(labels))
    write_split(result, out)
    console = Console()
    view = RichTable(title=f"{len(result.fold_of)} slides in {folds} folds (seed {seed}) -> {out}", box=box.SIMPLE_HEAD)
    names = sorted(set(result.label_of.values()))
    view.add_column("fold")
    for name in names:
        view.add_column(name, justify="right")
    view.add_column("slides", justify="right")
    for fold, counts in result.counts().items():
        view.add_row(str(fold), *(str(counts.get(n, 0)) for n in names), str(sum(counts.values())))
    console.print(view)
    err = Console(stderr=True)
    for note in notes:
        err.print(f"warning: {note}", markup=False, highlight=False, soft_wrap=True)
