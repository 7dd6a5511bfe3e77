"""The Ray Data pipeline on text, JSONL, Parquet and save_to_disk inputs, and its input checks."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raylm.data.corpus import stories
from raylm.data.pipeline import check_data, documents, packed_blocks, resolve_format
from raylm.data.tokenizer import train_tokenizer
from raylm.spec.sections import DataSpec

TEXTS = stories(200, seed=1)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, "char", 0)


def write_inputs(tmp_path):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("\n".join(TEXTS[:100]) + "\n")
    (tmp_path / "txt" / "b.txt").write_text("\n".join(TEXTS[100:]) + "\n")
    with open(tmp_path / "data.jsonl", "w") as f:
        for text in TEXTS:
            f.write(json.dumps({"body": text, "id": 1}) + "\n")
    pq.write_table(pa.table({"text": TEXTS, "n": list(range(len(TEXTS)))}), tmp_path / "data.parquet")
    import datasets

    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "hf"))
    return {
        "text": DataSpec(path=str(tmp_path / "txt"), seq_len=32, val_fraction=0.1),
        "jsonl": DataSpec(path=str(tmp_path / "data.jsonl"), text_field="body", seq_len=32, val_fraction=0.1),
        "parquet": DataSpec(path=str(tmp_path / "data.parquet"), seq_len=32, val_fraction=0.1),
        "hf": DataSpec(path=str(tmp_path / "hf"), seq_len=32, val_fraction=0.1),
    }


def test_every_format_reads_tokenizes_packs_and_splits(ray_local, tmp_path, tokenizer):
    total_chars = sum(len(t) for t in TEXTS)
    for fmt, spec in write_inputs(tmp_path).items():
        assert resolve_format(spec) == fmt
        assert check_data(spec) == []
        docs = documents(spec)
        assert set(docs.schema().names) == {"text"}
        texts = [row["text"] for row in docs.take_all()]
        assert "".join(texts).replace("\n", "") == "".join(TEXTS), fmt
        rows = packed_blocks(docs, tokenizer, spec).take_all()
        train = np.stack([r["input_ids"] for r in rows if not r["val"]])
        val = np.stack([r["input_ids"] for r in rows if r["val"]])
        assert train.shape[1] == val.shape[1] == 32 and train.dtype == np.int32
        blocks = len(train) + len(val)
        # Packing drops less than one block per batch of documents; EOS adds one token per document.
        assert total_chars // 32 - 2 <= blocks <= (total_chars + len(TEXTS)) // 32 + 1, fmt
        assert 0.03 < len(val) / blocks < 0.2, fmt
        # The split is a pure function of the block: no block is in both.
        assert not {b.tobytes() for b in train} & {b.tobytes() for b in val}


def test_text_files_keep_lines_and_get_no_eos(ray_local, tmp_path, tokenizer):
    spec = write_inputs(tmp_path)["text"]
    ids = packed_blocks(documents(spec), tokenizer, spec).take(1)[0]["input_ids"]
    assert tokenizer.eos_token_id not in ids.tolist()


def test_generated_corpus_needs_no_files(ray_local, tokenizer):
    spec = DataSpec(generate={"documents": 50}, seq_len=16)
    assert check_data(spec) == [] and documents(spec).count() == 50


@pytest.mark.quick
def test_missing_path(tmp_path):
    [(where, what)] = check_data(DataSpec(path=str(tmp_path / "none.txt")))
    assert where == "data.path" and "does not exist" in what


@pytest.mark.quick
def test_empty_file_and_folder(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    assert "empty" in check_data(DataSpec(path=str(tmp_path / "empty.txt")))[0][1]
    (tmp_path / "folder").mkdir()
    assert "no text files" in check_data(DataSpec(path=str(tmp_path / "folder"), format="text"))[0][1]


@pytest.mark.quick
def test_undecodable_file(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 10)
    [(_, what)] = check_data(DataSpec(path=str(tmp_path / "latin1.txt")))
    assert "not UTF-8" in what


@pytest.mark.quick
def test_jsonl_without_text_field_and_broken_json(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n')
    [(_, what)] = check_data(DataSpec(path=str(tmp_path / "a.jsonl")))
    assert "no field 'text'" in what and "body" in what
    (tmp_path / "b.jsonl").write_text("not json\n")
    [(_, what)] = check_data(DataSpec(path=str(tmp_path / "b.jsonl")))
    assert "not JSON" in what


@pytest.mark.quick
def test_parquet_missing_column_and_corrupt(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    [(_, what)] = check_data(DataSpec(path=str(tmp_path / "a.parquet")))
    assert "no column 'text'" in what
    (tmp_path / "b.parquet").write_bytes(b"garbage")
    [(_, what)] = check_data(DataSpec(path=str(tmp_path / "b.parquet")))
    assert "Parquet" in what


def test_a_dataset_reads_through_load_dataset(ray_local, tmp_path, tokenizer):
    """`data.dataset` goes through datasets.load_dataset: a builder with local data_files, or a local
    dataset folder (a hub id takes the same path, with the network)."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    with open(folder / "part.jsonl", "w") as f:
        for text in TEXTS:
            f.write(json.dumps({"body": text}) + "\n")
    for source in (
        {"name": "json", "data_files": [str(folder / "part.jsonl")]},
        {"name": str(folder), "split": "train[:50%]"},
    ):
        spec = DataSpec(dataset=source, text_field="body", seq_len=32)
        assert check_data(spec) == []
        texts = [row["text"] for row in documents(spec).take_all()]
        assert texts == TEXTS[: len(texts)] and len(texts) in (len(TEXTS), len(TEXTS) // 2)
    assert "does not exist" in check_data(DataSpec(dataset={"name": str(tmp_path / "nope")}))[0][1]
    assert DataSpec(path="hf://org/name").dataset.name == "org/name"


def test_inputs_in_the_bucket_are_checked_and_read_where_they_are(
    ray_local, object_store, tmp_path, tokenizer
):
    """data.path may be a storage URI (a file or a folder of files): the driver lists and sniffs the
    objects through pyarrow (nothing is downloaded), Ray Data's read tasks stream them, the packed rows
    equal those of the same files on local disk, the cache key follows the objects' identity, and each
    check names the object and the fix."""
    from raylm.data.cache import input_digest
    from tests.runtime.test_object_store import upload

    bucket = object_store("data-inputs")
    local = write_inputs(tmp_path)
    upload(tmp_path, f"{bucket}/corpus")
    for fmt, spec in local.items():
        name = spec.path[len(str(tmp_path)) :]
        remote = spec.model_copy(update={"path": f"{bucket}/corpus{name}"})
        if fmt == "hf":
            [(where, what)] = check_data(remote)
            assert where == "data.path" and "save_to_disk" in what and "to_parquet" in what
            continue
        assert resolve_format(remote) == fmt and check_data(remote) == [], fmt
        rows = packed_blocks(documents(remote), tokenizer, remote).take_all()
        expected = packed_blocks(documents(spec), tokenizer, spec).take_all()
        assert [r["input_ids"].tolist() for r in rows] == [r["input_ids"].tolist() for r in expected], fmt

    fs, root = pafs.FileSystem.from_uri(bucket)
    before = input_digest(f"{bucket}/corpus/txt")
    assert input_digest(f"{bucket}/corpus/txt") == before
    with fs.open_output_stream(f"{root}/corpus/txt/a.txt") as out:
        out.write(b"another text\n")
    assert input_digest(f"{bucket}/corpus/txt") != before

    with fs.open_output_stream(f"{root}/bad/rows.jsonl") as out:
        out.write(b'{"body": "x"}\n')
    [(_, what)] = check_data(DataSpec(path=f"{bucket}/bad/rows.jsonl"))
    assert what.startswith(f"{bucket}/bad/rows.jsonl: ") and "no field 'text'" in what
    [(_, what)] = check_data(DataSpec(path=f"{bucket}/corpus/none.txt"))
    assert "does not exist in the store" in what
    assert check_data(DataSpec(path=f"{bucket}/bad", format="text"))[0][1].startswith("no text files")


@pytest.mark.quick
def test_a_home_path_reaches_the_readers_expanded_and_one_list_takes_one_store(tmp_path, monkeypatch):
    from raylm.data.pipeline import input_files

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("some text\n")
    spec = DataSpec(path="~/corpus")
    assert check_data(spec) == []
    assert input_files(spec, "text") == [str(tmp_path / "corpus" / "a.txt")]  # Ray Data does not expand ~
    [(where, what)] = check_data(DataSpec(path=["~/corpus", "s3://bucket/more.txt"]))
    assert where == "data.path" and "one place" in what
