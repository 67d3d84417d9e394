"""`prunetune prune` through the CLI on the tiny model: the exact set of files, the console, one-line errors."""

import json

import pytest

from prunetune.cli import main
from prunetune.commands.prune import config_from_args, configure_parser


def _argv(tiny_model_dir, shared_data, out, *extra):
    return ["prune", "--model", str(tiny_model_dir), "--calib-dataset", "wikitext2", "--data-dir", str(shared_data),
            "--nsamples", "4", "--seqlen", "64", "--out", str(out), *extra]


@pytest.mark.slow
def test_prune_cli_writes_exact_files_and_table(tmp_path, tiny_model_dir, shared_data, capsys):
    out = tmp_path / "pruned"
    assert main(_argv(tiny_model_dir, shared_data, out, "--pattern", "block16x16", "--reconstruct")) == 0
    assert {p.name for p in out.iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "prune.json",
        "prunetune",  # prunetune's own tensors (masks.safetensors), where weight loaders do not look
        "tokenizer.json", "tokenizer_config.json", ".prunetune-files.json",  # the marker of prunetune's files
    }
    console = capsys.readouterr().out
    assert "Sparsity by module type" in console and "overall" in console and "layer 2/2" in console
    info = json.loads((out / "prune.json").read_text())
    assert info["config"]["reconstruct"] is True and info["pattern"] == "block16x16"
    assert abs(info["overall"]["achieved"] - 0.5) < 0.05 and info["pattern_check"]["ok"]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--sparsity", "1.5"], "--sparsity 1.5 is outside [0, 1)"),
        (["--pattern", "2:2"], "0 < N < M"),
        (["--pattern", "block999x16"], "does not fit the smallest matrix"),
        (["--nsamples", "0"], "--nsamples 0 must be at least 1"),
    ],
)
def test_prune_cli_bad_input_is_one_line_exit_2(tmp_path, tiny_model_dir, shared_data, capsys, extra, fragment):
    assert main(_argv(tiny_model_dir, shared_data, tmp_path / "o", *extra)) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # (Transformers may draw a loading bar above it)
    assert fragment in last and last.startswith("prunetune prune: error:") and "Traceback" not in err


def test_cli_args_map_onto_config(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["--model", "m", "--out", str(tmp_path), "--pattern", "4:8", "--skip", "q_proj,k_proj",
                              "--one-shot", "--method", "magnitude", "--data-dir", "a", "--data-dir", "b"])
    cfg = config_from_args(args)
    assert cfg.pattern == "4:8" and cfg.sparsity == 0.5 and cfg.skip == ("q_proj", "k_proj")
    assert cfg.sequential is False and cfg.resolved_compare == "group" and cfg.data_dir == ["a", "b"]
    assert cfg.nsamples == 128 and cfg.seed == 0 and cfg.seqlen == 2048  # Wanda's defaults
