"""The command line built from the config dataclasses (commands/flags.py) and the one settings loader
(prunetune/configfile.py): spellings, aliases, precedence, and hostile settings files (issue 12 items 13-14)."""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from prunetune import configfile
from prunetune.cli import COMMANDS
from prunetune.cli import main as cli_main
from prunetune.commands import flags
from prunetune.commands.flags import Flag
from prunetune.errors import UserError
from prunetune.finetune.config import FinetuneConfig
from prunetune.pipeline.config import load_pipeline

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Knobs:
    """A config as a command sees it."""

    out: str
    """Where results go."""
    block_size: int = 1024
    """Tokens per block; 100% of them count."""
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    """Module types."""
    dirs: list[str] | None = None
    """Repeatable."""
    fast: bool = True
    """Take the shortcut."""
    rate: float | None = None
    sequential: bool = True
    """Calibrate on the pruned previous layers."""


def parser_for(cls: type = Knobs, **kw) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t")
    flags.add_config_file_flag(parser)
    flags.add_config_flags(parser, cls, **kw)
    return parser


def build(argv: list[str], cls: type = Knobs, **kw):
    return flags.config_from_args(cls, parser_for(cls, **kw).parse_args(argv), command="t")


def test_one_field_is_one_flag_with_its_docstring_as_help():
    text = parser_for(flags={"sequential": Flag(names=("--one-shot",), invert=True, help="dense activations")}).format_help()
    assert "--block-size N" in text and "Tokens per block; 100% of them count. (default: 1024)" in text
    assert "--out OUT" in text and "Where results go. (required)" in text
    assert "--one-shot" in text and "--sequential" not in text
    assert "--block_size" not in text  # accepted, not shown twice


def test_spellings_types_bools_lists_and_tuples():
    cfg = build(["--out", "o", "--block_size", "512.0", "--targets", "a,b", "c", "--dirs", "x", "--dirs", "y",
                 "--no-fast", "--rate", "1e-3"])
    assert (cfg.block_size, cfg.targets, cfg.dirs, cfg.fast, cfg.rate) == (512, ("a", "b", "c"), ["x", "y"], False, 1e-3)
    assert build(["--out", "o", "--fast", "false"]).fast is False
    assert build(["--out", "o", "--fast"]).fast is True
    assert build(["--out", "o", "--one-shot"], flags={"sequential": Flag(names=("--one-shot",), invert=True)}).sequential is False
    with pytest.raises(SystemExit):
        build(["--out", "o", "--block-size", "1.5"])
    with pytest.raises(UserError, match="--out is required"):
        build([])


def test_config_file_then_flags_and_the_same_aliases_everywhere(tmp_path):
    settings = tmp_path / "ft.yaml"
    settings.write_text("pruned: p\noutput_dir: o\nlearning_rate: 5e-4\nnum_train_epochs: 2\nwarmup_ratio: 0.1\n")
    parser = argparse.ArgumentParser()
    flags.add_config_file_flag(parser)
    flags.add_config_flags(parser, FinetuneConfig)
    cfg = flags.config_from_args(FinetuneConfig, parser.parse_args(["--config", str(settings), "--epochs", "3"]),
                                 command="finetune")
    assert (cfg.pruned, cfg.out, cfg.lr, cfg.epochs, cfg.warmup_steps) == ("p", "o", 5e-4, 3.0, 0.1)
    # The pipeline's finetune section reads the same aliases (it refused `learning_rate` before).
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("model: smollm2-135m\nfinetune:\n  learning_rate: 2e-4\n  num_train_epochs: 2\n")
    loaded = load_pipeline(pipeline)
    assert loaded.finetune == {"lr": 2e-4, "epochs": 2.0} and loaded.configs["finetune"].lr == 2e-4


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"lora_targets: [[q_proj]]\n", r"lora_targets: expected tuple\[str, \.\.\.\], got \[\['q_proj'\]\]"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is a binary file, not YAML or JSON text"),
        (b"lr: \xff\xfe\n", "is not UTF-8 text"),
        (b"lora_r: [unclosed\n", r"invalid YAML at line \d+"),
        (b"- a\n- b\n", "expected a mapping of settings"),
        (b"lora_rank: 4\n", r"unknown setting 'lora_rank' \(did you mean 'lora_r'\?\)"),
    ],
)
def test_hostile_finetune_config_files_are_one_line_errors(tmp_path, capsys, content, message):
    settings = tmp_path / "bad.yaml"
    settings.write_bytes(content)
    code = cli_main(["finetune", "--config", str(settings), "--pruned", "p", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("prunetune finetune: error:") and err.count("\n") == 1
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "o").exists()


def test_a_directory_as_config_says_so(tmp_path, capsys):
    assert cli_main(["finetune", "--config", str(tmp_path), "--pruned", "p", "--out", "o"]) == 2
    assert "is a directory, expected a file" in capsys.readouterr().err
    with pytest.raises(UserError, match="is a directory, expected a file"):
        load_pipeline(tmp_path)


def _alias_bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\nlora_targets: *a{levels - 1}\n"


def test_yaml_alias_bomb_is_refused_before_values_are_built(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb())  # 9**9 = 387 million strings once expanded
    code = cli_main(["finetune", "--config", str(bomb), "--pruned", "p", "--out", "o"])
    err = capsys.readouterr().err
    assert code == 2 and "alias bomb" in err and err.count("\n") == 1 and len(err) < 300
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("model: smollm2-135m\n" + _alias_bomb().replace("lora_targets:", "name:"))
    with pytest.raises(UserError, match="alias bomb"):
        load_pipeline(pipeline)
    # A few honest aliases (shared settings) are fine.
    fine = tmp_path / "fine.yaml"
    fine.write_text("model: smollm2-135m\nprune: &p {seqlen: 64}\nfinetune: {block_size: 64}\n")
    assert load_pipeline(fine).prune == {"seqlen": 64}


def test_recursive_alias_and_huge_values_never_reach_a_message(tmp_path):
    with pytest.raises(UserError, match="refers to itself|alias"):
        configfile.parse_text("a: &a [*a]\n", "x.yaml")
    huge = tmp_path / "huge.yaml"
    huge.write_text("pruned: p\nout: o\nlora_r: [" + ", ".join(["1"] * 5000) + "]\n")
    with pytest.raises(UserError) as info:
        flags.config_from_args(FinetuneConfig, parser_for(FinetuneConfig).parse_args(["--config", str(huge)]),
                               command="finetune")
    assert "<list of 5000 items>" in str(info.value) and len(str(info.value)) < 200


def test_no_library_module_imports_a_command_module():
    src = REPO / "src" / "prunetune"
    offenders = []
    for path in src.rglob("*.py"):
        if path.is_relative_to(src / "commands") or path.name in ("cli.py", "__main__.py") or path.name.endswith("command.py"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.relative_to(src)} -> {n}" for n in names if n.startswith("prunetune.commands")]
    assert offenders == []


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_builds_its_parser(name):
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"prunetune {name}")
    module.configure_parser(parser)
    assert parser.format_help()


def test_run_refuses_an_unwritable_out_in_one_line(tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"model": "smollm2-135m"}))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli_main(["run", str(cfg), "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err


def test_help_is_instant_and_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "prunetune", "--help"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and all(name in proc.stdout for name in COMMANDS)


def test_run_config_json_is_a_valid_config(tmp_path):
    cfg = FinetuneConfig(pruned="p", out="o", lora_r=4)
    saved = tmp_path / "run_config.json"
    saved.write_text(json.dumps({"config": cfg.to_dict(), "provenance": {}}))
    again = build(["--config", str(saved)], FinetuneConfig)
    assert again.lora_r == 4 and again.lora_targets == cfg.lora_targets


def test_two_runs_on_one_directory_cannot_both_write(tmp_path, tiny_model_dir, shared_data, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "data": {"data_dir": str(shared_data)},
                                   "prune": {"nsamples": 2, "seqlen": 64}}))
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom prunetune.rundir import run_lock\n"
         f"with run_lock({str(run)!r}, 'run'):\n    print('locked', flush=True)\n    time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli_main(["run", str(cfg), "--out", str(run)]) == 2
        err = capsys.readouterr().err
        assert "is being written by" in err and f"pid {holder.pid}" in err and err.count("\n") == 1
        assert not (run / "prune").exists()  # nothing was written
    finally:
        holder.kill()
        holder.wait()


def test_finetune_distill_bare_flag_and_choices():
    from prunetune.commands.finetune import FLAGS

    parser = argparse.ArgumentParser()
    flags.add_config_flags(parser, FinetuneConfig, flags=FLAGS)
    build_ft = lambda argv: flags.config_from_args(FinetuneConfig, parser.parse_args(argv), command="finetune")  # noqa: E731
    assert build_ft(["--pruned", "p", "--out", "o", "--distill"]).distill == "logits"
    assert build_ft(["--pruned", "p", "--out", "o", "--distill", "layerwise"]).distill == "layerwise"
    assert build_ft(["--pruned", "p", "--out", "o"]).distill == "none"
    with pytest.raises(SystemExit):
        parser.parse_args(["--pruned", "p", "--out", "o", "--method", "qlora"])
