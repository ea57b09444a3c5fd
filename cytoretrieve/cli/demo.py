"""`cytoretrieve demo`: the spine end to end (embed -> classify -> search) on data that needs no download."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cytoretrieve.cli import classify as classify_cmd
from cytoretrieve.cli import embed as embed_cmd
from cytoretrieve.cli import options
from cytoretrieve.cli import search as search_cmd


def demo(
    data: Annotated[Path | None, typer.Option("--data", help="A dataset folder to use instead of synthetic cells (e.g. a Herlev download).")] = None,
    store: options.Store = options.DEFAULT_STORE,
    backbone: Annotated[str, typer.Option("--backbone", "-b", help="timm model name.")] = "resnet18",
    weights: Annotated[str, typer.Option("--weights", "-w", help="'random' works offline; 'timm' downloads ImageNet weights; or a file.")] = "random",
    image_size: Annotated[int, typer.Option("--image-size", help="Input side in px (small is fast on a CPU).")] = 96,
    per_class: Annotated[int, typer.Option("--per-class", min=20, help="Synthetic cells per class.")] = 40,
) -> None:
    """Run the whole spine once: make (or take) a cell dataset, embed it, classify it by k-NN, search one cell.

    Without --data it draws 7 classes of synthetic Pap-stained cells into <store>/demo-cells (no download, no
    internet). With the default random-weight backbone the numbers show the pipeline working, not a trained
    model; see the README for the same run on Herlev with pretrained or DINO weights.
    """
    from cytoretrieve.sources.cells import open_dataset
    from cytoretrieve.sources.cells.synthetic import make_cells
    from cytoretrieve.store.tables import Store, table_name_for

    console = Console()
    label_map = None
    if data is None:
        data = Path(store) / "demo-cells"
        if not (data / "label_map.json").exists():
            console.print(f"drawing {7 * per_class} synthetic cells into {data}")
            make_cells(data, per_class=per_class)
        label_map = data / "label_map.json"
    table = table_name_for(open_dataset(data, label_map=label_map).name, backbone)  # the name `embed` gives it
    console.print(f"[bold]1/3[/] embed {data} -> table {table}")
    embed_cmd.embed(data, backbone=backbone, weights=weights, table=table, store=store, label_map=label_map,
                    image_size=image_size, batch_size=32, workers=None, device="auto", commit_rows=2048, wait=0.0)
    console.print("[bold]2/3[/] classify (k-NN protocol, 4 runs, k 1-100)")
    classify_cmd.classify(table=[table], store=store, runs=4, train_fraction=0.75, k="1-100", vote="majority",
                          temperature=0.07, seed=0, json_out=None, plot=Path(store) / "demo-classify.png")
    first = Store(store).open(table).vectors(["id"])[1].column("id")[0].as_py()
    console.print(f"[bold]3/3[/] search: the 5 cells most similar to {first}")
    search_cmd.search(table=table, image=None, row_id=first, k="5", where=None, store=store, device="auto",
                      json_out=None, html=Path(store) / "demo-search.html", png=None, geojson=None, evaluate=False)
    console.print(f"\ndone: open {Path(store) / 'demo-search.html'} to see the hits; `cytoretrieve serve --store {store}` "
                  f"opens the viewer; `cytoretrieve tables --store {store}` lists the store; rerunning the demo re-embeds "
                  "nothing.")
