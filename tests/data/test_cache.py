"""The tokenized cache: written once from the Ray Data pipeline, read back row for row, keyed by what
the rows depend on, and read by each worker in a disjoint, resumable order."""

import numpy as np
import pytest

from raylm.data.cache import cache_key, ensure, load_manifest
from raylm.data.corpus import stories
from raylm.data.pipeline import documents, packed_blocks
from raylm.data.sft import examples, token_rows
from raylm.data.tokenizer import train_tokenizer
from raylm.spec.sections import DataSpec
from raylm.spec.sft import SFTDataSpec
from raylm.train.reader import CachedSplit, TrainShard, val_batches

TEXTS = stories(300, seed=2)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, "char", 0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "a.txt").write_text("\n".join(TEXTS) + "\n")
    return folder


def test_cache_holds_the_pipelines_rows_and_is_written_once(ray_local, tmp_path, tokenizer, corpus):
    spec = DataSpec(path=str(corpus), seq_len=32, val_fraction=0.1)
    expected = packed_blocks(documents(spec), tokenizer, spec).take_all()  # the reference: Ray Data's rows
    where = str(tmp_path / cache_key(spec, tokenizer, spec.paths))
    manifest, written = ensure(where, lambda: packed_blocks(documents(spec), tokenizer, spec))
    assert written
    for split, wanted in (("train", False), ("val", True)):
        rows = [r["input_ids"] for r in expected if r["val"] == wanted]
        info = manifest["splits"][split]
        assert info["rows"] == len(rows) == sum(f["rows"] for f in info["files"])
        read = CachedSplit(where, split, info).read(0, info["rows"])["input_ids"]
        np.testing.assert_array_equal(read, np.stack(rows))
    calls = []
    again, written = ensure(where, lambda: calls.append(1))
    assert not written and not calls and again == manifest
    # a folder left without its manifest (a crash while writing) is rebuilt, not read
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "train").mkdir()
    assert load_manifest(str(tmp_path / "broken")) is None
    rebuilt, written = ensure(
        str(tmp_path / "broken"), lambda: packed_blocks(documents(spec), tokenizer, spec)
    )
    assert written and rebuilt["splits"] == manifest["splits"]


def test_sft_rows_keep_their_columns_and_shapes(ray_local, tmp_path, tokenizer):
    spec = SFTDataSpec(generate={"task": "recall", "examples": 120}, format="choices", seq_len=48)
    expected = [r for r in token_rows(examples(spec), tokenizer, spec).take_all() if not r["val"]]
    manifest, _ = ensure(str(tmp_path / "c"), lambda: token_rows(examples(spec), tokenizer, spec))
    info = manifest["splits"]["train"]
    read = CachedSplit(str(tmp_path / "c"), "train", info).read(3, 9)
    assert read["input_ids"].shape == (6, 4, 48) and read["answer"].shape == (6,)
    for name in ("input_ids", "labels", "attention_mask", "answer"):
        np.testing.assert_array_equal(read[name], np.stack([r[name] for r in expected[3:9]]))


@pytest.mark.quick
def test_the_key_follows_inputs_tokenizer_and_settings(tmp_path, tokenizer, corpus):
    spec = DataSpec(path=str(corpus), seq_len=32)
    key = cache_key(spec, tokenizer, spec.paths)
    assert cache_key(spec.model_copy(update={"shuffle_buffer": 7}), tokenizer, spec.paths) == key
    assert cache_key(spec.model_copy(update={"seq_len": 64}), tokenizer, spec.paths) != key
    assert cache_key(spec, train_tokenizer([*TEXTS, "~^|"], "char", 0), spec.paths) != key
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "a.txt").write_text("\n".join(TEXTS) + "\n")
    assert cache_key(spec, tokenizer, [str(changed)]) == key  # the same bytes elsewhere: the same key
    (changed / "a.txt").write_text("\n".join(TEXTS) + "\nmore\n")
    assert cache_key(spec, tokenizer, [str(changed)]) != key


@pytest.fixture(scope="module")
def numbered(tmp_path_factory, ray_local):
    """A cache whose row i is [i, i, ...] and has i % 23 + 1 real tokens (a length to group by)."""
    import ray.data

    def rows(batch):
        ids = batch["id"].astype(np.int64)
        mask = (np.arange(24)[None, :] < (ids % 23 + 1)[:, None]).astype(np.int64)
        yield {"input_ids": np.repeat(ids[:, None], 24, 1), "attention_mask": mask, "val": ids % 10 == 0}

    where = str(tmp_path_factory.mktemp("numbered") / "cache")
    manifest, _ = ensure(where, lambda: ray.data.range(1000).map_batches(rows, batch_format="numpy"))
    return where, manifest["splits"]


def ids_of(batches) -> list[int]:
    return [int(i) for _, b in batches for i in b["input_ids"][:, 0]]


def test_workers_read_disjoint_rows_that_cover_the_epoch_and_resume_in_place(numbered):
    where, splits = numbered
    split = CachedSplit(where, "train", splits["train"])  # 900 rows
    shards = [TrainShard(split, rank, 2, 8, shuffle_buffer=100, seed=0) for rank in (0, 1)]
    seen = [ids_of(shard.epoch(0, 0)) for shard in shards]
    assert len(seen[0]) == len(seen[1]) == 900 // 8 // 2 * 8
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 900 // 8 // 2 * 2 * 8  # all but the last partial round
    assert seen[0] != sorted(seen[0])  # shuffled ...
    assert ids_of(TrainShard(split, 0, 2, 8, 100, seed=0).epoch(1, 0)) != seen[0]  # ... anew each epoch
    # Resuming at global micro-batch 40 reads nothing before it and continues the same sequence.
    resumed = TrainShard(split, 1, 2, 8, 100, seed=0)
    assert ids_of(resumed.epoch(0, 40)) == seen[1][20 * 8 :]
    assert resumed.rows_returned == len(seen[1]) - 20 * 8
    # An elastic resize to 3 workers continues the same global order at the same position.
    three = [ids_of(TrainShard(split, r, 3, 8, 100, seed=0).epoch(0, 40)) for r in range(3)]
    whole = ids_of(TrainShard(split, 0, 1, 8, 100, seed=0).epoch(0, 0))
    assert sorted(sum(three, [])) == sorted(whole[40 * 8 : 40 * 8 + len(sum(three, []))])


def test_group_by_length_batches_similar_lengths_and_keeps_every_row(numbered):
    where, splits = numbered
    split = CachedSplit(where, "train", splits["train"])
    grouped = list(TrainShard(split, 0, 1, 8, 100, seed=0, group_by_length=True).epoch(0, 0))
    plain = list(TrainShard(split, 0, 1, 8, 100, seed=0).epoch(0, 0))
    assert sorted(ids_of(grouped)) == sorted(ids_of(plain))

    def spread(batches):
        return np.mean([np.ptp(b["attention_mask"].sum(1)) for _, b in batches])

    assert spread(grouped) < 2 < 15 < spread(plain)
    # two workers: in each round (micro-batches j for rank 0, j + 1 for rank 1) rank 0's is not always
    # the longer one (runs visited longest-first would give it the longer every time)
    ranks = [list(TrainShard(split, r, 2, 8, 100, seed=0, group_by_length=True).epoch(0, 0)) for r in (0, 1)]
    longer = [
        a["attention_mask"].sum() > b["attention_mask"].sum() for (_, a), (_, b) in zip(*ranks, strict=True)
    ]
    assert 0.25 < np.mean(longer) < 0.75, np.mean(longer)


def test_validation_rows_are_split_evenly(numbered):
    where, splits = numbered
    split = CachedSplit(where, "val", splits["val"])  # 100 rows
    parts = [
        [int(i) for b in val_batches(split, r, 3, 8, None) for i in b["input_ids"][:, 0]] for r in range(3)
    ]
    assert len(parts[0]) == len(parts[1]) == len(parts[2]) == 33
    assert len(set(sum(parts, []))) == 99
