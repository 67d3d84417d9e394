"""`prunetune speed`: sparse-kernel linears compute what the dense ones do; the measurement runs end to end."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from torch import nn
from transformers import AutoModelForCausalLM

from prunetune.errors import UserError
from prunetune.pruning.config import PruneConfig
from prunetune.pruning.engine import run_prune
from prunetune.sparsity.patterns import parse_pattern
from prunetune.speed import (
    SparseLinear,
    SpeedConfig,
    block_sparse_weight,
    breakeven_sweep,
    layout_for,
    run_speed,
    sparsify,
    speedup_table,
    tensor_bytes,
    weight_bytes,
)


@pytest.fixture(scope="module")
def pruned_block(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("speed") / "pruned"
    return run_prune(PruneConfig(model=str(tiny_model_dir), out=str(out), method="magnitude", pattern="block16x16",
                                 sparsity=0.5, device="cpu"), console=Console(quiet=True))


@pytest.mark.parametrize("layout", ["bsr", "csr"])
def test_sparse_linear_matches_dense(layout):
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(block_sparse_weight(48, 64, 0.5, (16, 16), torch.float32))
    x = torch.randn(2, 5, 64)  # (B, T, in)
    sparse = SparseLinear(linear, layout, (16, 16))
    torch.testing.assert_close(sparse(x), linear(x), rtol=1e-5, atol=1e-5)
    assert sparse.weight.layout == {"bsr": torch.sparse_bsr, "csr": torch.sparse_csr}[layout]


def test_block_sparse_weight_and_memory_accounting():
    w = block_sparse_weight(64, 64, 0.75, (16, 16), torch.float32)
    tiles = w.view(4, 16, 4, 16).abs().sum(dim=(1, 3))  # (4, 4) tile sums
    assert int((tiles == 0).sum()) == 12
    dense = tensor_bytes(w)
    assert dense == 64 * 64 * 4
    bsr = w.to_sparse_bsr((16, 16))
    # 4 kept tiles of 256 floats + 4 int64 column indices + 5 int64 row pointers
    assert tensor_bytes(bsr) == 4 * 256 * 4 + 4 * 8 + 5 * 8
    # CSR at 50% in float32 costs more than dense: an int64 column index per kept value.
    half = block_sparse_weight(64, 64, 0.5, (16, 16), torch.float32)
    assert tensor_bytes(half.to_sparse_csr()) > dense


def test_layout_choice_is_honest_about_devices():
    assert layout_for(parse_pattern("block16x16"), "cpu", torch.float32)[0] == "bsr"
    layout, why = layout_for(parse_pattern("2:4"), "cpu", torch.float32)
    assert layout == "csr" and "CUDA-only" in why
    assert layout_for(parse_pattern("unstructured"), "cpu", torch.float32)[0] == "csr"


def test_sparsified_model_gives_the_same_logits(pruned_block):
    model = AutoModelForCausalLM.from_pretrained(pruned_block).eval()
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        dense_bytes = weight_bytes(model)
        _, replaced = sparsify(model, parse_pattern("block16x16"), "cpu", torch.float32)
        assert replaced == 14
        assert all(isinstance(m, SparseLinear) and m.layout == "bsr"
                   for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj")))
        torch.testing.assert_close(model(input_ids=ids).logits, reference, rtol=1e-4, atol=1e-4)
    assert weight_bytes(model) < dense_bytes


def test_breakeven_sweep_reports_every_sparsity():
    sweep = breakeven_sweep((32, 32), 4, (0.5, 0.75), (16, 16), "cpu", torch.float32, rounds=2)
    assert [r["sparsity"] for r in sweep["rows"]] == [0.5, 0.75]
    assert all(r["dense_ms"] > 0 and r["bsr_ms"] > 0 for r in sweep["rows"])
    assert sweep["breakeven_sparsity"] in (None, 0.5, 0.75)


def test_run_speed_end_to_end(tmp_path, pruned_block, tiny_model_dir):
    out = tmp_path / "speed.json"
    cfg = SpeedConfig(model_dir=str(pruned_block), dense=str(tiny_model_dir), batch="1,2", seqlen=16, prompt=4,
                      new_tokens=3, repeats=1, breakeven=False, device="cpu", out=str(out))
    lines: list[str] = []
    result = run_speed(cfg, log=lines.append)
    # Something on screen for every variant as it goes: its load, then each round of each measurement.
    assert sum(line.startswith("Loaded ") for line in lines) == 3
    rounds = [line for line in lines if line.startswith("  batch ")]
    assert len(rounds) == 2 * 2 * (1 + cfg.repeats)  # 2 batches x (forward, generation) x (warm-up + rounds)
    assert all(v in rounds[0] for v in ("dense", "pruned (dense kernels)", "pruned (sparse kernels)"))
    assert [(r.variant, r.batch) for r in result.rows] == [
        ("dense", 1), ("pruned (dense kernels)", 1), ("pruned (sparse kernels)", 1),
        ("dense", 2), ("pruned (dense kernels)", 2), ("pruned (sparse kernels)", 2)]
    assert all(r.forward_tokens_per_s > 0 and r.generate_tokens_per_s > 0 for r in result.rows)
    assert result.pattern == "block16x16" and "BSR" in result.kernel
    table = speedup_table(result)
    assert table[0]["forward_x"] == table[3]["forward_x"] == 1.0  # each batch relative to its dense row
    assert table[2]["weight_mib"] < table[1]["weight_mib"]  # BSR at 50% holds fewer bytes
    saved = json.loads(out.read_text())
    assert saved["machine"]["cpu_count"] and len(saved["rows"]) == 6


def test_bad_values():
    with pytest.raises(UserError, match="--batch"):
        SpeedConfig(model_dir="x", batch="1,a")
    with pytest.raises(UserError, match="--seqlen 0"):
        SpeedConfig(model_dir="x", seqlen=0)
    with pytest.raises(UserError, match="--device 'tpu'"):
        SpeedConfig(model_dir="x", device="tpu")


def test_speed_command_parses_batches_and_prints(tmp_path, pruned_block, tiny_model_dir, capsys):
    import argparse

    from prunetune.commands import flags
    from prunetune.commands import speed as command

    parser = argparse.ArgumentParser()
    command.configure_parser(parser)
    args = parser.parse_args([str(pruned_block), "--dense", str(tiny_model_dir), "--batch", "1,2", "--seqlen", "8",
                              "--prompt", "2", "--new-tokens", "2", "--repeats", "1", "--no-breakeven",
                              "--device", "cpu", "--out", str(tmp_path / "s.json")])
    cfg = flags.config_from_args(SpeedConfig, args, command="speed")
    assert cfg.batch == (1, 2) and cfg.breakeven is False
    assert command.main(parser.parse_args([str(pruned_block), "--batch", "1", "--seqlen", "8", "--prompt", "2",
                                           "--new-tokens", "2", "--repeats", "1", "--no-breakeven"])) == 0
    printed = capsys.readouterr().out
    assert "pruned (sparse kernels)" in printed and "Serving runtimes" in printed


def test_defaults_are_sized_for_a_small_cpu():
    """`prunetune speed DIR` on SmolLM2 finishes in about 2 minutes on 2 cores (bench/RESULTS.md): one batch of
    128 tokens, 16 generated, 2 rounds, a 5-round sweep; larger sizes are flags."""
    cfg = SpeedConfig(model_dir="x")
    assert (cfg.batch, cfg.seqlen, cfg.new_tokens, cfg.repeats, cfg.sweep_rounds) == ((1,), 128, 16, 2, 5)


@pytest.mark.gpu
def test_semi_structured_2_4_linear_matches_dense_on_cuda():
    from prunetune.sparsity.patterns import nm_mask

    weight = torch.randn(128, 128)
    keep = nm_mask(weight.abs(), 2, 4)
    linear = nn.Linear(128, 128, bias=False).to("cuda", torch.float16)
    with torch.no_grad():
        linear.weight.copy_((weight * keep).to("cuda", torch.float16))
    assert layout_for(parse_pattern("2:4"), "cuda", torch.float16)[0] == "semi"
    sparse = SparseLinear(linear, "semi")
    x = torch.randn(64, 128, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(sparse(x), linear(x), rtol=1e-2, atol=1e-2)
    assert tensor_bytes(sparse.weight.data) < tensor_bytes(linear.weight.data)


def test_speed_of_an_export_without_a_dense_model(tmp_path, pruned_block):
    from prunetune.export.run import ExportConfig, run_export

    run_export(ExportConfig(model_dir=str(pruned_block), out=str(tmp_path / "ct")), log=lambda _: None)
    messages: list[str] = []
    result = run_speed(SpeedConfig(model_dir=str(tmp_path / "ct"), batch="1", seqlen=8, prompt=2, new_tokens=2,
                                   repeats=1, breakeven=False, device="cpu"), log=messages.append)
    assert [r.variant for r in result.rows] == ["pruned (dense kernels)", "pruned (sparse kernels)"]
    assert result.pattern == "block16x16"  # from export.json
    assert any("No dense model" in m for m in messages)


def test_2_4_check_of_the_semi_structured_path():
    from prunetune.speed import _is_2_4

    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    assert _is_2_4(w)
    w[0, 1] = 5.0  # three non-zeros in the first group of 4
    assert not _is_2_4(w)
    assert not _is_2_4(torch.zeros(2, 6))  # 6 columns do not form groups of 4


# ---- issue 24: measurements the model or the machine cannot hold are refused before any weight loads ----------


@pytest.mark.parametrize(("sizes", "message"), [
    ({"seqlen": 2048}, r"--seqlen 2048 exceeds the model's context of 1024 tokens"),
    ({"prompt": 1000, "new_tokens": 100}, r"--prompt 1000 \+ --new-tokens 100 exceeds the model's context of 1024"),
])
def test_a_measurement_beyond_the_context_is_refused(pruned_block, tiny_model_dir, monkeypatch, sizes, message):
    """Before: speed measured positions the model never handles, without a word."""
    from prunetune import speed

    monkeypatch.setattr(speed, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(UserError, match=message):
        run_speed(SpeedConfig(model_dir=str(pruned_block), dense=str(tiny_model_dir), batch=1, device="cpu",
                              breakeven=False, **sizes), log=lambda _: None)


def test_a_batch_that_cannot_be_allocated_is_refused_before_loading(pruned_block, tiny_model_dir, monkeypatch):
    from prunetune import speed

    monkeypatch.setattr(speed, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(UserError, match=r"--batch 100000000 x --seqlen 128 needs at least [\d,.]+ GiB on cpu .* "
                                        r"GiB are free; lower --batch or --seqlen"):
        run_speed(SpeedConfig(model_dir=str(pruned_block), dense=str(tiny_model_dir), batch=100_000_000,
                              device="cpu", breakeven=False), log=lambda _: None)


def test_out_of_memory_while_measuring_is_one_line(pruned_block, tiny_model_dir, monkeypatch):
    from prunetune import speed

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] . DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(speed, "_best_interleaved", no_memory)
    with pytest.raises(UserError, match=r"out of memory measuring --batch 1 x --seqlen 16 on cpu; lower --batch"):
        run_speed(SpeedConfig(model_dir=str(pruned_block), dense=str(tiny_model_dir), batch=1, seqlen=16, prompt=2,
                              new_tokens=2, repeats=1, device="cpu", breakeven=False), log=lambda _: None)
