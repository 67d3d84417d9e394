"""The channel permutation before tile selection (`prune --permute`): the relabelling preserves the function of
tiny Llama-layout models (tied and untied embeddings, GQA, biases, per-head q/k norms), the search never lowers
its objective and its objective is the mass `block_mask` really keeps, and `prune --permute` end to end writes an
ordinary model that Transformers loads, `verify` passes, and that is the relabelled dense model under its masks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from prunetune.architecture import find_decoder_layers
from prunetune.errors import UserError
from prunetune.pruning import channels
from prunetune.pruning.config import PruneConfig
from prunetune.pruning.engine import run_prune
from prunetune.pruning.permutation import (
    AXES,
    Dims,
    Permutation,
    TilePlan,
    is_valid,
    o_columns,
    permute_matrix,
    search,
)
from prunetune.pruning.verify import verify_dir
from prunetune.rundir import load_masks
from prunetune.sparsity.patterns import block_mask, parse_pattern, pattern_violations
from tiny import make_tiny_model, tiny_config

QUIET = Console(quiet=True)


def _random_permutation(d: Dims, seed: int) -> Permutation:
    g = torch.Generator().manual_seed(seed)
    return Permutation(
        torch.randperm(d.hidden, generator=g),
        [torch.randperm(d.intermediate, generator=g) for _ in range(d.layers)],
        [torch.cat([h * d.head_dim + torch.randperm(d.head_dim, generator=g) for h in range(d.kv_heads)])
         for _ in range(d.layers)])


def test_o_columns_follow_each_query_heads_kv_head():
    d = Dims(layers=1, hidden=8, intermediate=8, heads=4, kv_heads=2, head_dim=2)
    vo = torch.tensor([1, 0, 2, 3])  # KV head 0 swaps its two dims, KV head 1 stays
    assert o_columns(vo, d).tolist() == [1, 0, 3, 2, 4, 5, 6, 7]  # query heads 0, 1 read KV head 0
    p = Permutation.identity(d)
    assert is_valid(p, d) and p.is_identity()
    p.vo[0] = torch.tensor([2, 1, 0, 3])  # across heads: would change the function
    assert not is_valid(p, d)


@pytest.mark.parametrize("family,overrides", [
    ("llama", {"tie_word_embeddings": False}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"num_key_value_heads": 1}),  # multi-query: one KV head for all four query heads
    ("mistral", {}),
    ("qwen2", {}),  # q/k/v biases
    ("qwen3", {}),  # per-head q/k RMSNorm, head_dim set apart from hidden / heads
])
def test_relabelling_preserves_the_function(family, overrides):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, 256, **overrides)).float().eval()
    if family == "qwen2":
        assert model.model.layers[0].self_attn.v_proj.bias is not None
    with torch.no_grad():  # non-trivial norms and biases, so a forgotten one shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.5)
    prefix, layers = find_decoder_layers(model)
    d = channels.check_permutable(model, prefix, list(layers))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    before = channels.logits_of(model, ids)
    up = model.model.layers[0].mlp.up_proj.weight.clone()
    channels.apply(model, list(layers), _random_permutation(d, 3), d)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, up)  # the weights did move
    if overrides.get("tie_word_embeddings"):
        assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(channels.logits_of(model, ids), before, atol=2e-5, rtol=1e-5)


def test_a_wrong_relabelling_is_caught_by_the_function_check():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 256)).float().eval()
    prefix, layers = find_decoder_layers(model)
    d = channels.check_permutable(model, prefix, list(layers))
    ids = channels.check_ids(256, 64, 0)
    before = channels.logits_of(model, ids)
    perm = _random_permutation(d, 5)
    channels.apply_to_outer(model, list(layers), perm)  # the layers forgotten
    assert not channels.function_check(before, channels.logits_of(model, ids), torch.float32)["ok"]


def _scores(d: Dims, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    kv = d.kv_heads * d.head_dim
    shapes = {"q": (d.heads * d.head_dim, d.hidden), "k": (kv, d.hidden), "v": (kv, d.hidden),
              "o": (d.hidden, d.heads * d.head_dim), "gate": (d.intermediate, d.hidden),
              "up": (d.intermediate, d.hidden), "down": (d.hidden, d.intermediate)}
    # Heavy-tailed, as Wanda scores are: a few channels carry much of the mass.
    return [{r: torch.rand(*s, generator=g) ** 6 * (1 + 5 * torch.rand(s[1], generator=g)) for r, s in shapes.items()}
            for _ in range(d.layers)]


def _kept_by_block_mask(scores, perm, d, plan) -> float:
    """The objective from first principles: permute, select tiles with the product's block_mask, sum."""
    kept = []
    for i, layer in enumerate(scores):
        idx = perm.layer_indices(i, d)
        for role, target in plan.targets[i].items():
            v = permute_matrix(layer[role] / layer[role].sum(), *idx[role])
            kept.append(float((v * block_mask(v, target, plan.h, plan.w, plan.compare)).sum()))
    return sum(kept) / len(kept)


@pytest.mark.parametrize("compare,tile,skip", [("matrix", (16, 16), ()), ("band", (16, 16), ()),
                                               ("matrix", (8, 16), ("k", "down"))])
def test_search_never_lowers_the_kept_mass_and_reports_it_truly(compare, tile, skip):
    d = Dims(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16)
    scores = _scores(d, 0)
    targets = [{r: (0.25 if r == "o" else 0.5) for r in AXES if r not in skip} for _ in range(d.layers)]
    plan = TilePlan(tile[0], tile[1], compare, targets)
    result = search(scores, d, plan, rounds=4, min_gain=0.0)
    h = result.history
    assert all(b >= a - 1e-9 for a, b in zip(h, h[1:], strict=False)) and h[-1] > h[0] + 0.01
    assert is_valid(result.permutation, d)
    assert h[0] == pytest.approx(_kept_by_block_mask(scores, Permutation.identity(d), d, plan), rel=1e-5)
    assert h[-1] == pytest.approx(_kept_by_block_mask(scores, result.permutation, d, plan), rel=1e-5)
    threaded = search(scores, d, plan, rounds=4, min_gain=0.0, workers=2)  # layers in parallel: the same result
    assert threaded.history == h and threaded.permutation.tensors().keys() == result.permutation.tensors().keys()
    assert all(torch.equal(a, b) for a, b in zip(threaded.permutation.tensors().values(),
                                                 result.permutation.tensors().values(), strict=True))


def test_search_leaves_a_model_without_gain_where_it_is():
    d = Dims(layers=1, hidden=32, intermediate=32, heads=2, kv_heads=2, head_dim=16)
    flat = [{r: torch.ones(s) for r, s in {k: v.shape for k, v in _scores(d, 0)[0].items()}.items()}]
    result = search(flat, d, TilePlan(16, 16, "matrix", [dict.fromkeys(AXES, 0.5)]), rounds=3)
    assert result.history[-1] == pytest.approx(result.history[0]) and len(result.history) == 2


def _cfg(model_dir, out, shared_data, **kw) -> PruneConfig:
    base = dict(model=str(model_dir), out=str(out), calib_dataset="wikitext2", data_dir=str(shared_data),
                nsamples=4, seqlen=64, pattern="block16x16", permute=True)
    return PruneConfig(**(base | kw))


@pytest.fixture(scope="module")
def permuted(tmp_path_factory, tiny_model_dir, shared_data) -> Path:
    """The tiny Llama pruned with --permute (Wanda, 16x16 blocks, no reconstruction)."""
    return run_prune(_cfg(tiny_model_dir, tmp_path_factory.mktemp("perm") / "p", shared_data), console=QUIET)


def test_prune_permute_end_to_end(permuted, tiny_model_dir):
    out = permuted
    info = json.loads((out / "prune.json").read_text())
    rec = info["permutation"]
    assert rec["function_check"]["ok"] and rec["function_check"]["relative"] < 1e-5
    assert rec["kept_mass_after"] > rec["kept_mass_before"] and rec["scores"] == "wanda"
    assert info["config"]["permute"] is True and "permute_s" in info["timings"]
    assert rec["file"] == "prunetune/permutation.safetensors" and (out / rec["file"]).is_file()
    assert verify_dir(out).ok
    # An ordinary checkpoint: Transformers loads it as it is, and it is the relabelled dense model under its
    # masks (Wanda without reconstruction only zeroes weights).
    pruned = AutoModelForCausalLM.from_pretrained(out).float()
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir).float()
    prefix, layers = find_decoder_layers(dense)
    d = channels.dims_of(dense, len(layers))
    channels.apply(dense, list(layers), channels.load_permutation(out), d)
    masks = load_masks(out)
    state = dense.state_dict()
    for name, keep in masks.items():
        assert pattern_violations(keep, parse_pattern("block16x16")) == []
        torch.testing.assert_close(pruned.state_dict()[f"{name}.weight"], state[f"{name}.weight"] * keep)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        torch.testing.assert_close(pruned.state_dict()[name], state[name])


def test_permuted_prune_keeps_more_of_the_scores_than_the_plain_one(tmp_path, tiny_model_dir, shared_data):
    """Magnitude scores need no calibration; the objective before the search is what the plain prune keeps."""
    out = run_prune(_cfg(tiny_model_dir, tmp_path / "mag", shared_data, method="magnitude", permute_rounds=3),
                    console=QUIET)
    rec = json.loads((out / "prune.json").read_text())["permutation"]
    assert rec["scores"] == "magnitude" and rec["function_check"]["ok"]
    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    plain = []
    for name in load_masks(out):
        w = weights[f"{name}.weight"].abs()
        plain.append(float((w / w.sum() * block_mask(w, 0.5, 16, 16)).sum()))
    assert rec["kept_mass_before"] == pytest.approx(sum(plain) / len(plain), rel=1e-5)
    assert rec["kept_mass_after"] > rec["kept_mass_before"]


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_permute_refused_where_it_cannot_help(tmp_path, pattern):
    with pytest.raises(UserError, match="--permute"):
        PruneConfig(model="m", out=str(tmp_path / "o"), pattern=pattern, permute=True)
    assert PruneConfig(model="m", out=str(tmp_path / "o"), pattern=pattern).permutes is False
    assert PruneConfig(model="m", out=str(tmp_path / "o"), pattern="block16x16").permutes is True  # the default
    assert PruneConfig(model="m", out=str(tmp_path / "o"), pattern="block16x16", permute=False).permutes is False


def test_teacher_and_trained_models_keep_the_channel_order(permuted, tiny_model_dir, tmp_path):
    """Layer-wise distillation compares hidden states channel by channel: the dense teacher is relabelled like
    the pruned student, and a model trained from the pruned one carries the permutation on (sparse-ft's model/)."""
    from prunetune.rundir import copy_masks

    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir).float().eval()
    with torch.no_grad():
        plain = teacher(input_ids=ids, output_hidden_states=True).hidden_states
        assert channels.relabel_teacher(teacher, permuted)
        relabelled = teacher(input_ids=ids, output_hidden_states=True).hidden_states
    residual = channels.load_permutation(permuted).residual
    for a, b in zip(plain, relabelled, strict=True):
        torch.testing.assert_close(b, a[..., residual], atol=1e-5, rtol=1e-5)
    copy_masks(permuted, tmp_path / "model")
    assert torch.equal(channels.load_permutation(tmp_path / "model").residual, residual)
    assert not channels.relabel_teacher(teacher, tiny_model_dir)  # a model pruned without --permute


def test_default_skips_a_layout_it_cannot_relabel_and_an_explicit_permute_refuses(tmp_path, tokenizer_dir,
                                                                                   shared_data):
    """Phi-3 fuses q/k/v and gate/up into one matrix each: no known relabelling. The default for blocks prunes it
    without the permutation and says why; --permute asked for is a one-line error."""
    model_dir = make_tiny_model(tmp_path / "phi3", tokenizer_dir, "phi3", pad_token_id=0, eos_token_id=0,
                                bos_token_id=0)
    default_skips_and_asked_refuses(model_dir, tmp_path, shared_data, "Llama-layout", "Llama-layout")


def default_skips_and_asked_refuses(model_dir, tmp_path, shared_data, skipped: str, refused: str) -> None:
    """The default prunes without the permutation and records why (`skipped` in it); --permute asked for is a
    one-line error (`refused` in it) that leaves no output."""
    out = run_prune(_cfg(model_dir, tmp_path / "p", shared_data, permute=None), console=QUIET)
    info = json.loads((out / "prune.json").read_text())
    assert skipped in info["permutation"]["skipped"] and info["pattern_check"]["ok"]
    assert not (out / "prunetune" / "permutation.safetensors").exists()
    with pytest.raises(UserError, match=refused):
        run_prune(_cfg(model_dir, tmp_path / "q", shared_data), console=QUIET)
    assert not (tmp_path / "q").exists()


def test_the_search_runs_only_where_its_scores_fit(tmp_path, tiny_model_dir, shared_data, monkeypatch):
    """The search holds every matrix's scores (not layer by layer): on a machine without the memory for them the
    default prunes streamed without it and says why; --permute asked for is a one-line error naming the fix."""
    monkeypatch.setattr(channels, "free_memory", lambda device: 1024)
    default_skips_and_asked_refuses(tiny_model_dir, tmp_path, shared_data, "GiB of memory is available", "--no-permute")
