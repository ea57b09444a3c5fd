"""The classic MIL benchmark files (Musk1/2, Fox, Tiger, Elephant as npz or PRTools .mat; UCSB breast) -> `Bags`.

Research data, not a product input: the MIL experiments and their tests read them; the product scores bags from
store tables.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cytoretrieve.errors import CytoError
from cytoretrieve.queries.mil.bags import Bags


def read_npz(path: str | Path) -> Bags:
    """A MIL benchmark in the staged .npz layout: X, bag_offsets (CSR), bag_name, y_bag."""
    path = Path(path)
    if not path.is_file():
        raise CytoError(f"no MIL benchmark file {path}")
    try:
        z = np.load(path, allow_pickle=False)
        x, off, names, y = z["X"], z["bag_offsets"], z["bag_name"], z["y_bag"]
    except (KeyError, ValueError, OSError) as e:
        raise CytoError(f"{path} is not a MIL benchmark .npz (X, bag_offsets, bag_name, y_bag): {e}") from None
    if len(off) != len(names) + 1 or len(y) != len(names) or off[-1] != len(x):
        raise CytoError(f"{path}: bag_offsets, bag_name and y_bag disagree")
    x = x.astype(np.float32)
    return Bags(names=[str(n) for n in names], y=(np.asarray(y) > 0).astype(np.int8),
                vectors=[x[a:b] for a, b in zip(off[:-1], off[1:])])


def read_prtools_mat(path: str | Path) -> Bags:
    """A MIL benchmark as a PRTools dataset object (miproblems.org .mat): `x.data`, `x.nlab` (1 negative,
    2 positive, per instance), `x.ident.milbag` (bag id per instance). Bags keep the order of first appearance."""
    import scipy.io

    path = Path(path)
    if not path.is_file():
        raise CytoError(f"no MIL benchmark file {path}")
    try:
        obj = scipy.io.loadmat(path)["x"][0, 0]
        data = np.asarray(obj["data"], dtype=np.float32)
        nlab = np.asarray(obj["nlab"]).ravel().astype(int)
        milbag = obj["ident"][0, 0]["milbag"]
    except Exception as e:  # noqa: BLE001 - any parse failure means "not this format"
        raise CytoError(f"{path} is not a PRTools MIL dataset (.mat with x.data, x.nlab, x.ident.milbag): {e}") from None
    if milbag.dtype.kind in "US":
        bag_of = [str(s).strip() for s in np.asarray(milbag).ravel()]
    else:
        bag_of = [str(int(v)) for v in np.asarray(milbag).ravel()]
    if len(bag_of) != len(data) or len(nlab) != len(data):
        raise CytoError(f"{path}: data, nlab and milbag have different lengths")
    order: dict[str, list[int]] = {}
    for i, b in enumerate(bag_of):
        order.setdefault(b, []).append(i)
    names = list(order)
    y = []
    for b in names:
        labs = set(nlab[order[b]].tolist())
        if len(labs) != 1:
            raise CytoError(f"{path}: bag {b} has instances with different labels")
        y.append(1 if labs.pop() == 2 else 0)
    return Bags(names=names, y=np.array(y, dtype=np.int8), vectors=[data[order[b]] for b in names])


def read_benchmark(path: str | Path) -> Bags:
    """`read_npz` or `read_prtools_mat` by suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".npz":
        return read_npz(path)
    if suffix == ".mat":
        return read_prtools_mat(path)
    raise CytoError(f"{path}: a MIL benchmark file is .npz or .mat (PRTools), not {suffix or 'without suffix'}")
