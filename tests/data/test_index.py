"""The dataset index from every source kind, combined with prefixes, filtered, split, summarised."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tunelab.data.images import read_rejects
from tunelab.data.index import IndexOptions, build_index, index_stats, key_uniform, read_footer, stats_text
from tunelab.data.sources import SourceSpec, iter_json_object
from tunelab.errors import TunelabError

from .conftest import image_bytes, write_image, write_tar


def _rows(path: Path) -> dict[str, dict]:
    return {r["key"]: r for r in pq.read_table(path).to_pylist()}


def test_folder_source_recursive_with_sidecars_and_rejects(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    write_image(root / "a.png", (1024, 512))
    (root / "a.txt").write_text("1girl, long_hair\n")
    write_image(root / "sub" / "deep" / "b.jpg", (600, 1200))
    (root / "sub" / "deep" / "b.caption").write_text("A tall picture.\nAnother line.")
    (root / "sub" / "broken.webp").write_bytes(b"RIFF\x00\x00")
    (root / "notes.md").write_text("ignored")
    summary = build_index([f"folder:{root}"], tmp_path / "idx.parquet", progress=False)
    rows = _rows(tmp_path / "idx.parquet")
    assert summary.rows == 2 and summary.rejected == 1
    assert rows["a"]["tags"] == "1girl, long_hair" and rows["a"]["caption"] is None
    assert (rows["a"]["width"], rows["a"]["height"]) == (1024, 512)
    assert (rows["a"]["bucket_width"], rows["a"]["bucket_height"]) == (1024, 512)
    assert rows["sub/deep/b"]["caption"] == "A tall picture.\nAnother line."
    assert (rows["sub/deep/b"]["bucket_width"], rows["sub/deep/b"]["bucket_height"]) == (512, 1024)
    assert rows["a"]["offset"] is None and rows["a"]["split"] == "train"
    rejects = read_rejects(tmp_path / "idx.rejects.jsonl")
    assert [r["key"] for r in rejects] == ["sub/broken"] and rejects[0]["path"].endswith("broken.webp")
    assert "1024 x 512" in (tmp_path / "idx.buckets.txt").read_text()
    assert read_footer(tmp_path / "idx.parquet")["rows"] == 2


def test_kohya_json_streamed_with_missing_images(tmp_path: Path) -> None:
    imgs = tmp_path / "train"
    write_image(imgs / "p1.webp", (800, 800))
    write_image(imgs / "x" / "p2.png", (1200, 700))
    meta = {
        "p1": {"tags": "astolfo, pink_hair", "caption": "A character.", "train_resolution": [1024, 1024]},
        "x/p2": {"tags": ["solo", "sky"], "train_resolution": [1216, 832]},
        "gone": {"tags": "nothing"},
    }
    path = tmp_path / "meta_lat.json"
    path.write_text(json.dumps(meta, indent=2))
    assert list(iter_json_object(path, chunk_chars=5)) == list(meta.items())  # tiny chunks: real streaming
    build_index([f"kohya:{path},images={imgs}"], tmp_path / "idx.parquet", progress=False)
    rows = _rows(tmp_path / "idx.parquet")
    assert set(rows) == {"p1", "x/p2"}
    assert rows["p1"]["caption"] == "A character." and rows["x/p2"]["tags"] == "solo, sky"
    assert (rows["x/p2"]["width"], rows["x/p2"]["height"]) == (1200, 700)
    assert [r["key"] for r in read_rejects(tmp_path / "idx.rejects.jsonl")] == ["gone"]


def test_json_reader_refuses_broken_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": {"tags": "x"}, "b": {"tags": ')
    with pytest.raises(TunelabError):
        list(iter_json_object(bad, chunk_chars=4))
    bad.write_text('["not", "an object"]')
    with pytest.raises(TunelabError, match="JSON object"):
        list(iter_json_object(bad))
    (tmp_path / "empty.json").write_text("  {}  ")
    assert list(iter_json_object(tmp_path / "empty.json")) == []


def test_parquet_and_csv_tables_with_path_templates(tmp_path: Path) -> None:
    table = pa.table({
        "id": [1, 22, 333],
        "tags": ["a, b", "c", None],
        "caption": ["cap one", None, "cap three"],
        "width": [1000, 500, 2000],
        "height": [1000, 1000, 500],
    })
    pq.write_table(table, tmp_path / "t.parquet")
    pacsv.write_csv(table.drop_columns(["width", "height"]), tmp_path / "t.csv")
    for i in (1, 22, 333):
        write_image(tmp_path / "img" / f"{i:05d}.png", (300, 200))
    build_index([f"table:{tmp_path / 't.parquet'},template={{id}}.webp,root=/data/img,prefix=db/"],
                tmp_path / "a.parquet", progress=False)
    rows = _rows(tmp_path / "a.parquet")
    assert set(rows) == {"db/1", "db/22", "db/333"}
    assert rows["db/22"]["path"] == "/data/img/22.webp"  # sizes came from the table: no file read
    assert (rows["db/333"]["bucket_width"], rows["db/333"]["bucket_height"]) == (1024, 256)
    assert rows["db/1"]["source"] == "db"
    # CSV without sizes: they are read from the image headers.
    build_index([f"table:{tmp_path / 't.csv'},template={{id:05d}}.png,root={tmp_path / 'img'}"],
                tmp_path / "b.parquet", progress=False)
    rows = _rows(tmp_path / "b.parquet")
    assert rows["333"]["path"].endswith("img/00333.png") and (rows["333"]["width"], rows["333"]["height"]) == (300, 200)
    assert rows["1"]["caption"] == "cap one"


def test_table_with_tar_shard_rule_and_tar_source(tmp_path: Path) -> None:
    for shard in range(2):
        members = {f"{i}.webp": image_bytes((640, 480), "WEBP") for i in range(shard, 6, 2)}
        members[f"{shard}.txt"] = b"tag_in_tar"
        write_tar(tmp_path / "shards" / f"{shard:04d}.tar", members)
    pq.write_table(pa.table({"id": list(range(7)), "tags": [f"t{i}" for i in range(7)]}), tmp_path / "t.parquet")
    build_index([f"table:{tmp_path / 't.parquet'},tar={{id % 2:04d}}.tar,root={tmp_path / 'shards'}"],
                tmp_path / "a.parquet", progress=False)
    rows = _rows(tmp_path / "a.parquet")
    assert set(rows) == {str(i) for i in range(6)}  # id 6 is not in its shard -> rejected
    assert rows["3"]["path"].endswith("0001.tar") and rows["3"]["offset"] > 0 and rows["3"]["size"] > 0
    assert (rows["3"]["width"], rows["3"]["height"]) == (640, 480)
    assert [r["key"] for r in read_rejects(tmp_path / "a.rejects.jsonl")] == ["6"]
    # The same shards as a tar source: webdataset-style grouping, text members read in place.
    summary = build_index([f"tar:{tmp_path / 'shards'},prefix=e621/"], tmp_path / "b.parquet", progress=False)
    rows = _rows(tmp_path / "b.parquet")
    assert summary.rows == 6 and rows["e621/0"]["tags"] == "tag_in_tar" and rows["e621/2"]["tags"] is None
    with open(rows["e621/4"]["path"], "rb") as f:
        f.seek(rows["e621/4"]["offset"])
        assert f.read(4) == b"RIFF"


def test_combined_sources_where_tag_holdout_and_stats(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for root, n in ((a, 30), (b, 30)):
        for i in range(n):
            write_image(root / f"{i}.png", (64 + 16 * (i % 5), 64))
            (root / f"{i}.txt").write_text("astolfo, x" if i % 3 == 0 else "other tag")
            if i % 2:
                (root / f"{i}.caption").write_text("a caption")
    with pytest.raises(TunelabError, match="prefix"):
        build_index([f"folder:{a}", f"folder:{b}"], tmp_path / "dup.parquet", progress=False)
    assert not (tmp_path / "dup.parquet").exists()
    opts = IndexOptions(where_tags=["astolfo"], holdout=0.5, seed=3)
    summary = build_index([f"folder:{a},prefix=a/", f"folder:{b},prefix=b/"], tmp_path / "i.parquet", opts, progress=False)
    assert summary.rows == 20 and summary.per_source == {"a": 10, "b": 10}
    rows = _rows(tmp_path / "i.parquet")
    assert all("astolfo" in r["tags"] for r in rows.values())
    held = {k for k, r in rows.items() if r["split"] == "holdout"}
    assert 0 < len(held) < 20
    again = build_index([f"folder:{b},prefix=b/"], tmp_path / "j.parquet", opts, progress=False)
    assert {k for k, r in _rows(tmp_path / "j.parquet").items() if r["split"] == "holdout"} == {
        k for k in held if k.startswith("b/")
    }  # the split depends on the key only, not on what else is indexed
    assert again.rows == 10
    stats = index_stats(tmp_path / "i.parquet", progress=False)
    assert stats["rows"] == 20 and stats["with_tags"] == 20 and stats["with_caption"] == 10
    assert stats["top_tags"][:2] == [("astolfo", 20), ("x", 20)] or stats["top_tags"][0][1] == 20
    assert stats["per_split"]["holdout"] == len(held)
    text = stats_text(stats)
    assert "astolfo" in text and "mean aspect error" in text


def test_key_hash_is_uniform_and_stable() -> None:
    keys = pa.array([f"danbooru/{i}" for i in range(20000)] + [""])
    u = key_uniform(keys, 0)
    assert u.shape == (20001,) and 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.01 and abs((u < 0.1).mean() - 0.1) < 0.01
    assert (key_uniform(keys.slice(5, 10), 0) == u[5:15]).all()
    assert not (key_uniform(keys, 1) == u).all()


def test_bad_sources_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TunelabError, match="folder:"):
        SourceSpec.parse("imgs")
    with pytest.raises(TunelabError, match="not found"):
        build_index([f"folder:{tmp_path / 'nope'}"], tmp_path / "x.parquet", progress=False)
    pq.write_table(pa.table({"post": [1], "tags": ["a"]}), tmp_path / "t.parquet")
    with pytest.raises(TunelabError, match="id=COLUMN"):
        build_index([f"table:{tmp_path / 't.parquet'},template={{id}}.png"], tmp_path / "x.parquet", progress=False)
    with pytest.raises(TunelabError, match="unknown option"):
        build_index([f"folder:{tmp_path},template=x"], tmp_path / "x.parquet", progress=False)
    with pytest.raises(TunelabError, match="not a tunelab index"):
        read_footer(tmp_path / "t.parquet")


def test_repeated_table_ids_are_refused(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": [1, 2, 2], "tags": ["a", "b", "c"], "width": [90] * 3, "height": [90] * 3}),
                   tmp_path / "t.parquet")
    with pytest.raises(TunelabError, match="repeated ids"):
        build_index([f"table:{tmp_path / 't.parquet'},template={{id}}.png"], tmp_path / "x.parquet", progress=False)
    pq.write_table(pa.table({"id": ["x", "x"], "tags": ["a", "b"], "width": [90] * 2, "height": [90] * 2}),
                   tmp_path / "s.parquet")
    with pytest.raises(TunelabError, match="duplicate keys"):
        build_index([f"table:{tmp_path / 's.parquet'},template={{id}}.png"], tmp_path / "x.parquet", progress=False)
    assert not (tmp_path / "x.parquet").exists()


def test_index_digest_follows_what_training_would_see(tmp_path: Path) -> None:
    from tunelab.data.index import index_digest

    root = tmp_path / "imgs"
    for name, size in (("a", (1024, 512)), ("b", (512, 1024)), ("c", (768, 768))):
        write_image(root / f"{name}.png", size)
    first = tmp_path / "one.parquet"
    build_index([f"folder:{root}"], first, progress=False)
    build_index([f"folder:{root}"], tmp_path / "two.parquet", progress=False)
    assert index_digest(first) == index_digest(tmp_path / "two.parquet")  # the same images: the same index
    (root / "c.txt").write_text("fixed, tags")  # a caption fix changes what is said, not which batches come
    build_index([f"folder:{root}"], tmp_path / "tags.parquet", progress=False)
    assert index_digest(tmp_path / "tags.parquet") == index_digest(first)
    write_image(root / "c.png", (1024, 512))  # same name, another shape: another bucket
    build_index([f"folder:{root}"], tmp_path / "three.parquet", progress=False)
    assert index_digest(tmp_path / "three.parquet") != index_digest(first)
