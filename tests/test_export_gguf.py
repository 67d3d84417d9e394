"""`prunetune export --format gguf`: a tiny pruned Llama written as GGUF and read back by an independent reader
(Transformers' GGUF loader, which de-quantises with the gguf package): same perplexity, pruned zeros exactly 0,
the tokenizer and chat template carried."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunetune.errors import UserError
from prunetune.evaluate import perplexity
from prunetune.export import gguf as gguf_format
from prunetune.export.run import ExportConfig, run_export
from prunetune.pruning.config import PruneConfig
from prunetune.pruning.engine import run_prune
from prunetune.rundir import load_masks

pytest.importorskip("gguf")

TEMPLATE = "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_model_dir) -> Path:
    source = tmp_path_factory.mktemp("chat") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = TEMPLATE
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    out = tmp_path_factory.mktemp("gguf") / "pruned"
    return run_prune(PruneConfig(model=str(source), out=str(out), method="magnitude", pattern="block16x16",
                                 sparsity=0.5, device="cpu"), console=Console(quiet=True))


def _export(pruned: Path, out: Path, kind: str, shared_data: Path, **kw) -> dict:
    result = run_export(ExportConfig(model_dir=str(pruned), out=str(out), format="gguf", gguf_type=kind,
                                     data_dir=[str(shared_data)], **kw), log=lambda _: None)
    return result.record


def _read(out: Path, kind: str):
    name = f"model-{kind}.gguf"
    return (AutoModelForCausalLM.from_pretrained(str(out), gguf_file=name, dtype=torch.float32),
            AutoTokenizer.from_pretrained(str(out), gguf_file=name))


@pytest.mark.parametrize("kind", ["bf16", "f16", "q8_0"])
def test_gguf_round_trip_through_transformers(tmp_path, pruned, shared_data, kind):
    record = _export(pruned, tmp_path / "g", kind, shared_data)
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == [
        ".prunetune-files.json", "export.json", f"model-{kind}.gguf"]
    model, tokenizer = _read(tmp_path / "g", kind)
    source = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32)

    # Every pruned weight is exactly 0 in what the independent reader loaded.
    masks = load_masks(pruned)
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        assert bool((params[f"{name}.weight"][~keep] == 0).all()), name
    assert record["zeros_kept"] == record["zeros_source"] > 0

    # Same model: logits (RoPE rows permuted and back) and perplexity on real text.
    ids = torch.randint(0, 500, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = source(ids).logits, model(ids).logits
    assert (theirs - ours).abs().max() < (0.05 if kind == "q8_0" else 0.02) * ours.abs().max()
    ppl = record["perplexity"]
    assert ppl["reader"] == "transformers" and ppl["data"] == "wikitext2/test"
    assert abs(ppl["change"]) < (0.01 if kind == "q8_0" else 0.005)
    text = (shared_data / "wikitext-2-raw-v1" / "wiki.test.raw").read_text()[:4000]
    tokens = AutoTokenizer.from_pretrained(pruned)(text).input_ids
    direct = perplexity(model, torch.tensor(tokens), seqlen=128).perplexity
    assert direct == pytest.approx(perplexity(source, torch.tensor(tokens), seqlen=128).perplexity,
                                   rel=0.01 if kind == "q8_0" else 0.005)

    # The tokenizer and chat template travel in the file.
    assert tokenizer(text).input_ids == tokens
    assert tokenizer.chat_template == TEMPLATE
    assert record["tokenizer"] == {"model": "gpt2", "pre": "gpt2", "chat_template": True}
    if kind != "q8_0":
        assert record["bit_exact"] == record["tensors"]


def test_rope_permutation_is_inverted_exactly():
    w = torch.randn(64, 32)
    permuted = gguf_format.rope_permute(w, heads=4)
    assert not torch.equal(permuted, w)
    assert torch.equal(gguf_format.rope_unpermute(permuted, heads=4), w)
    # Within a head, GGML interleaves the halves: row 1 is Transformers' row head_dim/2.
    assert torch.equal(permuted[1], w[8])


def test_q8_0_falls_back_to_f16_on_short_rows_and_keeps_norms_f32():
    assert gguf_format.tensor_type("blk.0.ffn_down.weight", (64, 48), "q8_0") == "f16"
    assert gguf_format.tensor_type("blk.0.ffn_down.weight", (64, 64), "q8_0") == "q8_0"
    assert gguf_format.tensor_type("blk.0.attn_norm.weight", (64,), "bf16") == "f32"


def test_f16_refuses_a_weight_it_would_store_as_infinity():
    gguf_format.check_f16_range({"w": torch.full((2, 2), 6e4)})
    with pytest.raises(UserError, match="use --gguf-type bf16"):
        gguf_format.check_f16_range({"w": torch.full((2, 2), 7e4)})


def test_unsupported_models_and_options_are_one_line_errors(tmp_path, tiny_model_dir, shared_data):
    from tiny import make_tiny_model

    qwen = make_tiny_model(tmp_path / "qwen", tiny_model_dir, "qwen2")
    with pytest.raises(UserError, match="Llama-family"):
        _export(qwen, tmp_path / "g", "bf16", shared_data, eval=False)
    assert not (tmp_path / "g").exists()
    with pytest.raises(UserError, match="--gguf-type"):
        ExportConfig(model_dir=str(qwen), out=str(tmp_path / "g"), format="gguf", gguf_type="q4_k")
    with pytest.raises(UserError, match="--dtype does not apply"):
        ExportConfig(model_dir=str(qwen), out=str(tmp_path / "g"), format="gguf", dtype="float16")


def test_export_command_gguf_exit_codes(tmp_path, pruned, shared_data, capsys):
    from prunetune.cli import main

    out = tmp_path / "g"
    assert main(["export", str(pruned), "--out", str(out), "--format", "gguf", "--gguf-type", "q8_0",
                 "--data-dir", str(shared_data)]) == 0
    console = capsys.readouterr().out
    assert "the cost of q8_0" in console and "Loads in: Transformers" in console and "Not vLLM" in console
    record = json.loads((out / "export.json").read_text())
    assert record["format"] == "gguf" and record["gguf_type"] == "q8_0" and "not yet loaded by llama.cpp" in record["loads_in"]
    assert main(["export", str(pruned), "--out", str(tmp_path / "h"), "--format", "gguf", "--dtype", "float16"]) == 2
    assert "--dtype does not apply" in capsys.readouterr().err
