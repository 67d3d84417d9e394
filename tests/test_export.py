"""`prunetune export`: compressed-tensors sparse formats, checked by the package's own decompressor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from prunetune.errors import UserError
from prunetune.export.run import ExportConfig, run_export
from prunetune.exported import decompressed_weights, load_exported
from prunetune.perplexity import perplexity
from prunetune.pruning.config import PruneConfig
from prunetune.pruning.engine import run_prune

pytest.importorskip("compressed_tensors")


def _prune(tiny_model_dir: Path, out: Path, pattern: str, sparsity: float | None = 0.5) -> Path:
    cfg = PruneConfig(model=str(tiny_model_dir), out=str(out), method="magnitude", pattern=pattern,
                      sparsity=None if ":" in pattern else sparsity, device="cpu")
    return run_prune(cfg, console=Console(quiet=True))


@pytest.fixture(scope="module")
def pruned_block(tmp_path_factory, tiny_model_dir) -> Path:
    return _prune(tiny_model_dir, tmp_path_factory.mktemp("block") / "pruned", "block16x16")


@pytest.fixture(scope="module")
def pruned_24(tmp_path_factory, tiny_model_dir) -> Path:
    return _prune(tiny_model_dir, tmp_path_factory.mktemp("nm") / "pruned", "2:4")


def _source_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in model_dir.glob("model*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    return tensors


@pytest.mark.parametrize(("fixture", "compressor", "keys"), [
    ("pruned_block", "sparse-bitmask", {"shape", "compressed", "bitmask", "row_offsets"}),
    ("pruned_24", "sparse-24-bitmask", {"shape", "compressed", "bitmask"}),
])
def test_export_round_trip_is_bit_exact(request, tmp_path, fixture, compressor, keys):
    pruned = request.getfixturevalue(fixture)
    result = run_export(ExportConfig(model_dir=str(pruned), out=str(tmp_path / "ct")), log=lambda _: None)
    out = tmp_path / "ct"
    assert result.record["compressor"] == compressor
    assert result.verified == result.matrices == 14  # 2 layers x 7 linears
    sizes = result.record["bytes"]
    assert sizes["compressed_safetensors"] < sizes["dense_safetensors"]
    assert sizes["linear_compressed"] < sizes["linear_dense"]

    sparsity_config = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sparsity_config["format"] == compressor
    assert sparsity_config["sparsity_structure"] == ("2:4" if compressor == "sparse-24-bitmask" else "unstructured")
    assert "lm_head" in sparsity_config["ignore"]
    assert sparsity_config["global_sparsity"] == pytest.approx(0.5, abs=0.02)
    stored = _source_tensors(out)
    q = "model.layers.0.self_attn.q_proj"
    assert {k.rsplit(".", 1)[1] for k in stored if k.startswith(q + ".")} == keys
    assert "model.embed_tokens.weight" in stored  # dense tensors stay as they were

    # Every tensor, decompressed by compressed-tensors, equals the pruned source bit for bit.
    source = _source_tensors(pruned)
    decompressed = dict(decompressed_weights(out))
    assert set(decompressed) == set(source)
    for name, tensor in decompressed.items():
        assert tensor.dtype == source[name].dtype
        assert torch.equal(tensor.view(torch.int32), source[name].view(torch.int32)), name
    assert (out / "export.json").is_file() and (out / "tokenizer.json").is_file()


def test_export_in_bfloat16_is_the_cast_source_bit_for_bit(tmp_path, pruned_24):
    result = run_export(ExportConfig(model_dir=str(pruned_24), out=str(tmp_path / "ct"), dtype="bfloat16"),
                               log=lambda _: None)
    assert result.record["dtype"] == "bfloat16" and result.verified == 14
    source = _source_tensors(pruned_24)
    for name, tensor in decompressed_weights(tmp_path / "ct"):
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor.view(torch.int16), source[name].to(torch.bfloat16).view(torch.int16)), name
    assert load_exported(tmp_path / "ct").dtype == torch.bfloat16


def test_exported_model_has_the_same_perplexity(tmp_path, pruned_block, tokenizer_dir):
    run_export(ExportConfig(model_dir=str(pruned_block), out=str(tmp_path / "ct")), log=lambda _: None)
    ids = torch.randint(0, 500, (4 * 64,), generator=torch.Generator().manual_seed(0))
    reference = perplexity(AutoModelForCausalLM.from_pretrained(pruned_block), ids, seqlen=64)
    loaded = perplexity(load_exported(tmp_path / "ct"), ids, seqlen=64)
    assert loaded.perplexity == reference.perplexity


def test_2_4_compressor_refuses_a_block_model_and_names_the_alternative(tmp_path, pruned_block):
    with pytest.raises(UserError, match="use --compressor sparse-bitmask"):
        run_export(ExportConfig(model_dir=str(pruned_block), out=str(tmp_path / "ct"),
                                       compressor="sparse-24-bitmask"), log=lambda _: None)
    assert not (tmp_path / "ct").exists()


def test_dense_model_is_refused(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="is not sparse"):
        run_export(ExportConfig(model_dir=str(tiny_model_dir), out=str(tmp_path / "ct")), log=lambda _: None)


def test_2_4_record_but_broken_groups_is_refused(tmp_path, pruned_24):
    broken = tmp_path / "broken"
    shutil.copytree(pruned_24, broken)
    model = AutoModelForCausalLM.from_pretrained(broken)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, :4] = 1.0  # a group of 4 with 4 non-zeros
    model.save_pretrained(broken)
    with pytest.raises(UserError, match="groups of 4 hold more than 2 non-zeros"):
        run_export(ExportConfig(model_dir=str(broken), out=str(tmp_path / "ct")), log=lambda _: None)


def test_bad_options_and_foreign_out(tmp_path, pruned_block):
    with pytest.raises(UserError, match="--format 'onnx'"):
        ExportConfig(model_dir=str(pruned_block), out=str(tmp_path / "x"), format="onnx")
    with pytest.raises(UserError, match="--compressor 'zip'"):
        ExportConfig(model_dir=str(pruned_block), out=str(tmp_path / "x"), compressor="zip")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        run_export(ExportConfig(model_dir=str(pruned_block), out=str(foreign)), log=lambda _: None)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_transformers_alone_refuses_the_export_instead_of_loading_random_weights(tmp_path, pruned_24):
    """Transformers 5 reads only quantization configs of compressed-tensors: it must fail, never load garbage."""
    run_export(ExportConfig(model_dir=str(pruned_24), out=str(tmp_path / "ct")), log=lambda _: None)
    with pytest.raises((ImportError, ValueError, OSError)):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ct")


def test_export_command_writes_exactly_these_files(tmp_path, pruned_24):
    import argparse

    from prunetune.commands import export as command

    parser = argparse.ArgumentParser()
    command.configure_parser(parser)
    out = tmp_path / "ct"
    assert command.main(parser.parse_args([str(pruned_24), "--out", str(out)])) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        ".prunetune-files.json", "config.json", "export.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json"]
    record = json.loads((out / "export.json").read_text())
    assert record["compressor"] == "sparse-24-bitmask" and record["verified_bit_exact"] == 14
    assert record["prune"]["pruning"].startswith("magnitude 2:4")
    # A second export into the same directory needs --overwrite, then replaces only its own files.
    with pytest.raises(UserError, match="--overwrite"):
        command.main(parser.parse_args([str(pruned_24), "--out", str(out)]))
    assert command.main(parser.parse_args([str(pruned_24), "--out", str(out), "--overwrite"])) == 0
