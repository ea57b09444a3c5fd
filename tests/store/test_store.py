"""The LanceDB store: schema and metadata, batched appends, resume ids, backbone refusal, lookups."""

from __future__ import annotations

import numpy as np
import pytest

from cytoretrieve.errors import CytoError
from cytoretrieve.store.tables import Store, row_key, table_name_for

DIM = 16


def backbone_meta(fp: str = "a" * 64, arch: str = "resnet18") -> dict:
    return {"arch": arch, "fingerprint": fp, "dim": DIM, "weights": "random", "preprocessing": {"size": 64}}


def rows(n: int, start: int = 0) -> list[dict]:
    return [
        {"id": f"c{i:04d}", "dataset": "toy", "path": f"/data/c{i}.png", "label": "AB"[i % 2], "binary": i % 2, "thumbnail": b"jpg"}
        for i in range(start, start + n)
    ]


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "store")


def test_create_append_read_back(store: Store) -> None:
    t = store.create_or_open("toy_resnet18", backbone_meta(), {"name": "toy"})
    rng = np.random.default_rng(0)
    v1, v2 = rng.normal(size=(5, DIM)).astype(np.float32), rng.normal(size=(3, DIM)).astype(np.float32)
    t.add(t.make_rows(rows(5), v1))
    t.add(t.make_rows(rows(3, start=5), v2))
    assert t.count() == 8
    assert t.ids() == {f"c{i:04d}" for i in range(8)}
    vectors, meta = t.vectors(["id", "label"])
    order = np.argsort(meta.column("id").to_pylist())
    np.testing.assert_array_equal(vectors[order], np.concatenate([v1, v2]))
    assert t.tbl.schema.field("vector").type.list_size == DIM

    reopened = Store(store.uri).open("toy_resnet18")
    assert reopened.meta["backbone"]["fingerprint"] == "a" * 64
    assert reopened.meta["dataset"]["name"] == "toy"
    assert reopened.dim == DIM


def test_other_backbone_is_refused_naming_both(store: Store) -> None:
    store.create_or_open("t", backbone_meta("a" * 64), {"name": "toy"})
    with pytest.raises(CytoError, match=r"aaaaaaaaaaaaaaaa.*bbbbbbbbbbbbbbbb"):
        store.create_or_open("t", backbone_meta("b" * 64, arch="resnet50"), {"name": "toy"})
    assert store.create_or_open("t", backbone_meta("a" * 64), {"name": "toy"}).name == "t"


def test_missing_table_lists_existing(store: Store) -> None:
    store.create_or_open("herlev_resnet18", backbone_meta(), {"name": "toy"})
    with pytest.raises(CytoError, match="no table 'nope'.*herlev_resnet18"):
        store.open("nope")


def test_lookups_and_where(store: Store) -> None:
    t = store.create_or_open("t", backbone_meta(), {"name": "toy"})
    vec = np.arange(10 * DIM, dtype=np.float32).reshape(10, DIM)
    t.add(t.make_rows(rows(10), vec))
    t.finish()
    row = t.row_by_id("c0003", ["label", "vector"])
    assert row["label"] == "B" and row["vector"] == pytest.approx(vec[3])
    hits = t.rows_by_keys([row_key("c0001"), row_key("c0004")], ["id", "label"])
    assert {h["id"] for h in hits.values()} == {"c0001", "c0004"}
    _, only_a = t.vectors(["id"], where="label = 'A'")
    assert only_a.num_rows == 5
    with pytest.raises(CytoError, match="no row with id"):
        t.row_by_id("missing", ["label"])
    with pytest.raises(CytoError, match="invalid `where` filter"):
        t.vectors(["id"], where="label === 'A'")


def test_describe_and_names(store: Store) -> None:
    t = store.create_or_open("b_table", backbone_meta(), {"name": "toy"})
    t.add(t.make_rows(rows(4), np.zeros((4, DIM), np.float32)))
    store.create_or_open("a_table", backbone_meta(), {"name": "toy"})
    infos = {i.name: i for i in store.describe()}
    assert list(infos) == ["a_table", "b_table"]
    assert infos["b_table"].rows == 4 and infos["b_table"].dim == DIM and infos["b_table"].arch == "resnet18"
    assert infos["b_table"].bytes > 0


def test_row_key_and_table_names() -> None:
    assert row_key("x") == row_key("x") != row_key("y")
    assert -(2**63) <= row_key("carcinoma_in_situ/1.jpg") < 2**63
    assert table_name_for("cric_crops_100px", "vit_small_patch16_224") == "cric_crops_100px_vit_small_patch16_224"
    assert table_name_for("My Set", "resnet18") == "my_set_resnet18"


def test_tables_without_vectors_are_listed_but_not_opened_as_vectors(store: Store) -> None:
    import json

    import pyarrow as pa

    schema = pa.schema([pa.field("id", pa.string())], metadata={b"cytoretrieve": json.dumps({"kind": "tiles"}).encode()})
    store.db.create_table("bag", schema=schema).add(pa.table({"id": ["s@0,0,320"]}, schema=schema))
    info = {i.name: i for i in store.describe()}["bag"]
    assert info.rows == 1 and info.dim == 0 and info.arch == "(tiles)"
    with pytest.raises(CytoError, match="a tiles table.*no vectors"):
        store.open("bag")
