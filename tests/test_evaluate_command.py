import json
import subprocess
import sys

import pytest
import torch

from prunetune.cli import main
from tiny import REPO, SHARED_DATA, make_tiny_model

ARGS = ["--dataset", "wikitext2", "--seqlen", "64", "--max-windows", "3"]


def run(argv, capsys):
    code = main(["evaluate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_evaluate_writes_results_json(tmp_path, tiny_model_dir, shared_data, capsys):
    out = tmp_path / "eval.json"
    code, stdout, _ = run(["--model", str(tiny_model_dir), *ARGS, "--data-dir", str(SHARED_DATA), "--out", str(out)], capsys)
    assert code == 0 and "perplexity" in stdout
    r = json.loads(out.read_text())
    assert r["windows"] == 3 and r["tokens"] == 192 and r["perplexity"] > 1
    assert r["evaluated"]["seqlen"] == 64 and r["evaluated"]["dataset"] == "wikitext2"
    assert r["evaluated"]["origin"].endswith("wiki.test.raw")
    assert r["sparsity"]["overall"] == 0.0 and set(r["sparsity"]["by_type"]) >= {"q_proj", "down_proj"}
    assert r["versions"]["transformers"] and "machine" in r
    # the same run again refreshes our own file; a file that is not ours is never overwritten
    assert run(["--model", str(tiny_model_dir), *ARGS, "--data-dir", str(SHARED_DATA), "--out", str(out)], capsys)[0] == 0
    precious = tmp_path / "notes.json"
    precious.write_text('{"mine": 1}')
    code, _, err = run(["--model", str(tiny_model_dir), *ARGS, "--data-dir", str(SHARED_DATA), "--out", str(precious)], capsys)
    assert code == 2 and "not a prunetune eval file" in err and precious.read_text() == '{"mine": 1}'


def _adapter(model_dir, out, nonzero: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    if nonzero:
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


def test_adapter_changes_perplexity_and_mismatch_is_refused(tmp_path, tiny_model_dir, tokenizer_dir, shared_data, capsys):
    base = ["--model", str(tiny_model_dir), *ARGS, "--data-dir", str(SHARED_DATA)]
    outs = {}
    for name, adapter in [("none", None), ("zero", _adapter(tiny_model_dir, tmp_path / "zero", False)),
                          ("trained", _adapter(tiny_model_dir, tmp_path / "trained", True))]:
        extra = ["--adapter", str(adapter)] if adapter else []
        assert run([*base, *extra, "--out", str(tmp_path / f"{name}.json")], capsys)[0] == 0
        outs[name] = json.loads((tmp_path / f"{name}.json").read_text())["perplexity"]
    assert outs["zero"] == pytest.approx(outs["none"], rel=1e-6)  # LoRA B=0 is the identity
    assert outs["trained"] != pytest.approx(outs["none"], rel=1e-3)
    other = make_tiny_model(tmp_path / "wide", tokenizer_dir, "llama", hidden_size=96, intermediate_size=192)
    mismatched = _adapter(other, tmp_path / "wide-adapter", True)
    code, _, err = run([*base, "--adapter", str(mismatched)], capsys)
    assert code == 2 and "does not fit this base model" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seqlen", "4096"], "exceeds the model's context of 1024"),
        (["--data-dir", "/nonexistent/data"], "does not exist"),
        (["--dataset", "pile"], "unknown dataset"),
        (["--split", "bogus"], "unknown split"),
        (["--max-windows", "0"], "at least 1"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, tiny_model_dir, shared_data, capsys, extra, message):
    code, _, err = run(["--model", str(tiny_model_dir), "--seqlen", "64", "--data-dir", str(SHARED_DATA), *extra], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "prunetune", "evaluate", "--model", str(tmp_path / "missing")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"prunetune evaluate: error: model {str(tmp_path / 'missing')!r} not found: "
                                                "no such path, and not an alias (smollm2-135m) or a hub id (org/name)"]
