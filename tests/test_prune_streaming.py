"""`prune` streamed layer by layer (issue 23): the weights of each decoder layer are read from the checkpoint's
shards when the walk reaches it and written pruned into the output shards. The output must be the bytes a
whole-model prune writes (`--no-stream`, the behaviour before streaming), for every family and option that changes
the walk, for sharded inputs, hub ids and the GGUF cache; what cannot be streamed exactly is loaded whole, and
says why. Peak-memory targets are measured by bench/bench_prune_memory.py, not here."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM

from prunetune.errors import UserError
from prunetune.perplexity import perplexity
from prunetune.pruning import layer_store
from prunetune.pruning.config import PruneConfig
from prunetune.pruning.engine import run_prune
from prunetune.pruning.layer_eval import layerwise_perplexity
from prunetune.pruning.precision import Precision
from prunetune.pruning.skeleton import save_layout, write_config_files
from prunetune.rundir import MARKER, PRUNE_JSON
from prunetune.shards import ShardWriter
from tiny import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
# Written per run (time, the run's own record), so never byte-identical between two runs.
PER_RUN = {MARKER, PRUNE_JSON}


def digests(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in PER_RUN}


def prune_both(model: str | Path, tmp_path: Path, shared_data: Path, device: str = "cpu", **kw) -> tuple[dict, dict]:
    """The same prune streamed and whole; their prune.json records, after asserting their files are identical."""
    records = []
    files = []
    for stream in (True, False):
        out = tmp_path / f"stream-{stream}"
        cfg = PruneConfig(model=str(model), out=str(out), calib_dataset="wikitext2", data_dir=str(shared_data),
                          nsamples=4, seqlen=32, device=device, stream=stream, **kw)
        run_prune(cfg, console=Console(quiet=True))
        files.append(digests(out))
        records.append(json.loads((out / PRUNE_JSON).read_text()))
    assert files[0] == files[1]
    assert "model.safetensors" in files[0] and "prunetune/masks.safetensors" in files[0]
    assert records[0]["memory"]["streamed"] and not records[1]["memory"]["streamed"]
    return records[0], records[1]


@pytest.mark.parametrize("family,overrides", [("llama", {"tie_word_embeddings": True}), ("mistral", {}),
                                              ("qwen2", {}), ("qwen3", {})])
def test_streamed_prune_writes_the_bytes_of_a_whole_model_prune(tmp_path, tokenizer_dir, shared_data, family,
                                                                 overrides):
    model = make_tiny_model(tmp_path / "model", tokenizer_dir, family, **overrides)
    streamed, whole = prune_both(model, tmp_path, shared_data, method="wanda", pattern="unstructured", sparsity=0.5,
                                 eval=True, eval_seqlen=32, eval_max_windows=3)
    assert streamed["mask_digests"] == whole["mask_digests"]
    assert streamed["dense_perplexity"] == whole["dense_perplexity"]
    assert streamed["pruned_perplexity"] == whole["pruned_perplexity"] != streamed["dense_perplexity"]
    memory = streamed["memory"]
    assert memory["weights"].startswith("streamed layer by layer from ")
    assert memory["model_mib"] == pytest.approx(memory["peak_rss_mib"] - memory["rss_before_model_mib"], abs=0.2)
    assert whole["memory"]["weights"] == "the whole model in memory (--no-stream)"


def test_every_walk_option_streams_to_the_same_bytes(tmp_path, tiny_model_dir, shared_data):
    """OWL's extra pass over the dense layers, least squares, SparseGPT's Hessians, the block-wise stage with the
    dense model's own activations beside the pruned ones: each visits layers again; none may change a byte."""
    prune_both(tiny_model_dir, tmp_path, shared_data, method="sparsegpt", pattern="block16x16", sparsity=0.5,
               reconstruct=True, owl=True, block_reconstruct_epochs=1)


@pytest.mark.gpu
def test_streamed_prune_on_a_gpu_writes_the_same_bytes(tmp_path, tiny_model_dir, shared_data):
    """On CUDA each tensor goes from the shard to the GPU and back on its own (bf16 storage, as `auto` keeps it)."""
    prune_both(tiny_model_dir, tmp_path, shared_data, device="cuda", method="sparsegpt", pattern="2:4",
               reconstruct=True, eval=True, eval_seqlen=32, eval_max_windows=3)


def test_sharded_checkpoint_streams_and_a_sharded_layout_is_save_pretrained_s(tmp_path, tokenizer_dir, shared_data):
    model_dir = make_tiny_model(tmp_path / "model", tokenizer_dir, "llama")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shutil.copy(model_dir / "tokenizer.json", tmp_path / "sharded")
    shutil.copy(model_dir / "tokenizer_config.json", tmp_path / "sharded")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    streamed, _ = prune_both(tmp_path / "sharded", tmp_path, shared_data, method="wanda", pattern="2:4")
    assert "shards in" in streamed["memory"]["weights"]

    # The layout the streamed writer fills is save_pretrained's also when the output is sharded.
    model.save_pretrained(tmp_path / "theirs", max_shard_size="100KB")
    ours = tmp_path / "ours"
    ours.mkdir()
    layout = save_layout(model, max_shard_size="100KB")
    assert len(layout.files) > 1
    writer = ShardWriter(ours, layout.files, {"format": "pt"})
    state = model.state_dict()
    for name in sorted(layout.names, reverse=True):
        writer.write(name, state[name])
    writer.close()
    write_config_files(model, ours, layout)
    assert digests(ours) == digests(tmp_path / "theirs")


def test_gguf_cache_streams(tmp_path, tiny_model_dir, shared_data):
    pytest.importorskip("gguf")
    from prunetune.export.run import ExportConfig, run_export

    dense = run_prune(PruneConfig(model=str(tiny_model_dir), out=str(tmp_path / "dense"), method="magnitude",
                                  sparsity=0.0, device="cpu"), console=Console(quiet=True))
    run_export(ExportConfig(model_dir=str(dense), out=str(tmp_path / "gguf"), format="gguf", gguf_type="f16",
                            data_dir=[str(shared_data)]), log=lambda _: None)
    streamed, _ = prune_both(tmp_path / "gguf" / "model-f16.gguf", tmp_path, shared_data, method="wanda",
                             pattern="unstructured", sparsity=0.5)
    assert "prunetune" in streamed["memory"]["weights"]  # the converted cache under $PRUNETUNE_HOME


@pytest.mark.slow
def test_hub_id_streams_from_the_local_hub_cache(tmp_path, tiny_model_dir, shared_data):
    """A hub id resolves to the files of its local cache (offline here), through the command users run."""
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "OMP_NUM_THREADS": "1"}
    outs, stdout = {}, {}
    for model, flag in (("tiny-org/tiny-llama", "--stream"), (str(tiny_model_dir), "--no-stream")):
        out = tmp_path / flag.strip("-")
        proc = subprocess.run([sys.executable, "-m", "prunetune", "prune", "--model", model, "--out", str(out),
                               "--method", "magnitude", "--pattern", "2:4", "--device", "cpu", flag],
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        outs[flag], stdout[flag] = out, proc.stdout
    assert json.loads((outs["--stream"] / PRUNE_JSON).read_text())["memory"]["streamed"]
    assert "Weights: streamed layer by layer" in stdout["--stream"]
    assert "Weights: the whole model in memory (--no-stream)" in stdout["--no-stream"]
    # The tokenizer records where it was loaded from (hub id vs path); everything else is the same bytes.
    theirs = {k: v for k, v in digests(outs["--no-stream"]).items() if k != "tokenizer_config.json"}
    assert {k: v for k, v in digests(outs["--stream"]).items() if k != "tokenizer_config.json"} == theirs


def test_a_checkpoint_without_safetensors_is_loaded_whole_and_says_why(tmp_path, tiny_model_dir):
    model_dir = tmp_path / "bin"
    shutil.copytree(tiny_model_dir, model_dir)
    weights = model_dir / "model.safetensors"
    torch.save(AutoModelForCausalLM.from_pretrained(weights.parent).state_dict(), model_dir / "pytorch_model.bin")
    weights.unlink()  # what older checkpoints hold: pickled weights only
    out = run_prune(PruneConfig(model=str(model_dir), out=str(tmp_path / "out"), method="magnitude",
                                pattern="2:4", device="cpu"), console=Console(quiet=True))
    memory = json.loads((out / PRUNE_JSON).read_text())["memory"]
    assert not memory["streamed"]
    assert "no model.safetensors" in memory["weights"]


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_layerwise_perplexity_is_the_whole_model_forward_s(tiny_model_dir, shared_data, dtype):
    """Layer by layer, each window meets the operations of one whole-model forward: the same number exactly."""
    from prunetune.data import load_text, tokenize
    from prunetune.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    ids = tokenize(load_text("wikitext2", "test", str(shared_data)), tokenizer).input_ids
    precision = Precision(torch.float32, dtype or torch.float32, "test", "cpu")
    with precision.autocast():
        whole = perplexity(model, ids, 32, max_windows=5)
    prefix, layers = "model.layers", list(model.model.layers)
    store = layer_store.ResidentLayers(model, prefix, layers, "test")
    layered = layerwise_perplexity(store, ids, 32, 5, "cpu", precision.autocast)
    assert (layered.perplexity, layered.windows, layered.tokens) == (whole.perplexity, whole.windows, whole.tokens)


def test_a_run_that_fails_mid_walk_leaves_nothing(tmp_path, tiny_model_dir, shared_data, monkeypatch):
    """The output shards are written from the first layer on, inside the staging directory: a run that dies
    after layer 0 was written (here: out of memory at layer 1) leaves no output and no staging directory."""
    from prunetune.pruning import layers

    finish = layers.finish_layer
    done = []

    def fail_at_second_layer(s, mods):
        if done:
            raise MemoryError("simulated")
        done.append(1)
        finish(s, mods)

    monkeypatch.setattr(layers, "finish_layer", fail_at_second_layer)
    cfg = PruneConfig(model=str(tiny_model_dir), out=str(tmp_path / "out"), method="wanda", pattern="2:4",
                      calib_dataset="wikitext2", data_dir=str(shared_data), nsamples=2, seqlen=32, device="cpu")
    with pytest.raises(UserError, match="out of memory.*nothing was published"):  # one line, named
        run_prune(cfg, console=Console(quiet=True))
    assert done and list(tmp_path.iterdir()) == []


def test_permuted_prune_streams_to_the_same_bytes(tmp_path, tokenizer_dir, shared_data):
    """--permute relabels through the store: the streamed outer weights (tied here) are relabelled as loaded and
    as written at the end, each layer as it is read; the whole model in place. Same bytes, same perplexities, and
    the dense and pruned perplexities on either side of the relabelling."""
    model = make_tiny_model(tmp_path / "model", tokenizer_dir, "llama", tie_word_embeddings=True)
    streamed, whole = prune_both(model, tmp_path, shared_data, method="wanda", pattern="block16x16", permute=True,
                                 eval=True, eval_seqlen=32, eval_max_windows=3)
    for rec in (streamed, whole):
        assert rec["permutation"]["function_check"]["ok"]
        assert rec["permutation"]["kept_mass_after"] > rec["permutation"]["kept_mass_before"]
    assert streamed["pruned_perplexity"] == whole["pruned_perplexity"]
    assert streamed["permutation"]["function_check"] == whole["permutation"]["function_check"]
