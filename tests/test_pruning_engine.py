"""run_prune end to end on the tiny 2-layer Llama: outputs, invariants on the saved weights, sequential vs
one-shot, reconstruction, and every bad input as a one-line UserError."""

import json
import shutil

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from prunetune.architecture import find_decoder_layers, prunable_linears
from prunetune.errors import UserError
from prunetune.models import load_model
from prunetune.pruning import calibration as cal
from prunetune.pruning.config import PruneConfig
from prunetune.pruning.engine import run_prune
from prunetune.rundir import load_masks
from prunetune.sparsity.patterns import n_pruned, parse_pattern, pattern_violations

QUIET = Console(quiet=True)


def _cfg(tiny_model_dir, out, shared_data, **kw):
    base = dict(model=str(tiny_model_dir), out=str(out), calib_dataset="wikitext2", data_dir=str(shared_data),
                nsamples=4, seqlen=64)
    base.update(kw)
    return PruneConfig(**base)


def _weights(out):
    return load_file(str(out / "model.safetensors"))


@pytest.mark.slow
def test_wanda_unstructured_per_row_saved_and_self_describing(tmp_path, tiny_model_dir, shared_data):
    # A small local eval file keeps the test fast (tokenising all of WikiText-2 test takes seconds).
    evalfile = tmp_path / "eval.txt"
    evalfile.write_text((shared_data / "wikitext-2-raw-v1" / "wiki.valid.raw").read_text()[:40_000])
    out = run_prune(_cfg(tiny_model_dir, tmp_path / "p", shared_data, eval=True, eval_dataset=str(evalfile),
                         eval_split="train", eval_seqlen=64, eval_max_windows=2), console=QUIET)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "prunetune", "prune.json", "tokenizer.json"} <= names
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]  # what weight loaders read
    assert not any(n.startswith(".staging") for n in names) and not any(n.endswith(".bin") for n in names)
    info = json.loads((out / "prune.json").read_text())
    assert info["model"] == str(tiny_model_dir) and info["method"] == "wanda" and info["compare"] == "row"
    assert info["pattern_check"]["ok"] and info["calibration"]["windows_sha256"]
    assert info["dense_perplexity"] > 1 and info["pruned_perplexity"] > 1
    assert info["provenance"]["versions"]["torch"] and "prune_s" in info["timings"]
    assert info["config"]["nsamples"] == 4 and info["seed"] == 0
    weights, masks = _weights(out), load_masks(out)
    assert len(masks) == 14 and len(info["matrices"]) == 14
    for name, keep in masks.items():
        w = weights[f"{name}.weight"]
        assert keep.shape == w.shape
        assert (w[~keep] == 0).all()
        assert ((~keep).sum(1) == n_pruned(w.shape[1], 0.5)).all()  # per output row
        assert info["matrices"][name]["achieved"] == pytest.approx(n_pruned(w.shape[1], 0.5) / w.shape[1])


def test_nm_block_map_skip_on_saved_weights(tmp_path, tiny_model_dir, shared_data):
    out = run_prune(_cfg(tiny_model_dir, tmp_path / "nm", shared_data, pattern="2:4", skip="k_proj"), console=QUIET)
    masks, weights = load_masks(out), _weights(out)
    assert not any("k_proj" in n for n in masks)
    assert (weights["model.layers.0.self_attn.k_proj.weight"] != 0).all()  # skipped: dense
    for name, keep in masks.items():
        zeros = (weights[f"{name}.weight"] == 0).view(keep.shape[0], -1, 4).sum(-1)
        assert (zeros == 2).all()
    out = run_prune(_cfg(tiny_model_dir, tmp_path / "blk", shared_data, method="magnitude", pattern="block16x16",
                         sparsity_map="down_proj=0.25"), console=QUIET)
    info = json.loads((out / "prune.json").read_text())
    assert info["calibration"] is None  # magnitude needs no data
    for name, keep in load_masks(out).items():
        assert pattern_violations(keep, parse_pattern("block16x16")) == []
        target = 0.25 if name.endswith("down_proj") else 0.5
        assert info["matrices"][name]["target"] == target
        assert abs(info["matrices"][name]["achieved"] - target) <= 256 / keep.numel()


def test_sequential_differs_from_one_shot(tmp_path, tiny_model_dir, shared_data):
    seq = load_masks(run_prune(_cfg(tiny_model_dir, tmp_path / "s", shared_data), console=QUIET))
    one = load_masks(run_prune(_cfg(tiny_model_dir, tmp_path / "o", shared_data, sequential=False), console=QUIET))
    first = [n for n in seq if ".layers.0." in n]
    second = [n for n in seq if ".layers.1." in n]
    assert all(torch.equal(seq[n], one[n]) for n in first)  # layer 0 sees the same (embedding) inputs
    assert any(not torch.equal(seq[n], one[n]) for n in second)  # layer 1 sees pruned vs dense inputs


@pytest.mark.slow
def test_reconstruction_lowers_layer_output_error(tmp_path, tiny_model_dir, shared_data):
    """Same mask (Wanda on layer 0), with and without --reconstruct: the reconstructed layer's output on the
    calibration inputs is closer to the dense layer's."""
    # permute=False: the layer's weights are loaded into the dense model below, in its own channel order
    plain = run_prune(_cfg(tiny_model_dir, tmp_path / "a", shared_data, pattern="block16x16", nsamples=8,
                           permute=False), console=QUIET)
    rec = run_prune(_cfg(tiny_model_dir, tmp_path / "b", shared_data, pattern="block16x16", nsamples=8,
                         permute=False, reconstruct=True), console=QUIET)
    ma, mb = load_masks(plain), load_masks(rec)
    first = [n for n in ma if ".layers.0." in n]
    assert all(torch.equal(ma[n], mb[n]) for n in first)

    info = json.loads((rec / "prune.json").read_text())["calibration"]
    dense, tok = load_model(str(tiny_model_dir))
    from prunetune.data import load_text, tokenize

    ids = tokenize(load_text("wikitext2", "train", str(shared_data)), tok).input_ids
    windows = cal.calibration_windows(ids, 8, 64, 0)
    assert cal.windows_hash(windows) == info["windows_sha256"]
    prefix, layers = find_decoder_layers(dense)
    inputs = cal.capture_first_layer_inputs(dense, layers[0], windows, "cpu")
    ref = cal.run_layer(layers[0], inputs, torch.empty_like(inputs.hidden)).clone()
    errors = []
    for out_dir in (plain, rec):
        weights = _weights(out_dir)
        with torch.no_grad():
            for name, module in prunable_linears(dense).items():
                if ".layers.0." in name:
                    module.weight.copy_(weights[f"{name}.weight"])
        got = cal.run_layer(layers[0], inputs, torch.empty_like(inputs.hidden))
        errors.append(float(((got - ref) ** 2).mean()))
    assert errors[1] < errors[0]


@pytest.mark.slow
def test_sparsegpt_runs_and_keeps_pattern(tmp_path, tiny_model_dir, shared_data):
    out = run_prune(_cfg(tiny_model_dir, tmp_path / "g", shared_data, method="sparsegpt", pattern="4:8"), console=QUIET)
    info = json.loads((out / "prune.json").read_text())
    assert info["pattern_check"]["ok"] and info["compare"] == "obs"
    for name, keep in load_masks(out).items():
        assert pattern_violations(keep, parse_pattern("4:8")) == []
        assert (_weights(out)[f"{name}.weight"][~keep] == 0).all()


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        (dict(sparsity=1.0), "outside [0, 1)"),
        (dict(sparsity=-0.1), "outside [0, 1)"),
        (dict(pattern="4:4"), "0 < N < M"),
        (dict(pattern="2:4", sparsity=0.3), "contradicts"),
        (dict(nsamples=0), "--nsamples 0"),
        (dict(method="obs"), "unknown --method"),
        (dict(pattern="block8x8", compare="row"), "does not apply"),
        (dict(sparsity_map="down_proj=2"), "outside [0, 1)"),
        (dict(sparsity_map="down_proj"), "KEY=VALUE"),
    ],
)
def test_config_errors(tmp_path, kw, fragment):
    with pytest.raises(UserError, match=fragment.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")) as err:
        PruneConfig(model="m", out=str(tmp_path), **kw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        (dict(pattern="block128x128"), "does not fit the smallest matrix"),
        (dict(seqlen=4096), "exceeds the model's context"),
        (dict(pattern="3:7"), "do not divide into groups of 7"),
        (dict(skip="attn_proj"), "matches nothing"),
        (dict(calib_dataset="TINYFILE", seqlen=1000), "not more than --seqlen 1000"),
    ],
)
def test_model_dependent_errors(tmp_path, tiny_model_dir, shared_data, kw, fragment):
    if kw.get("calib_dataset") == "TINYFILE":
        small = tmp_path / "small.txt"
        small.write_text("\n\n".join(f"paragraph {i} with a few words of text" for i in range(20)))
        kw["calib_dataset"] = str(small)
    with pytest.raises(UserError, match=fragment):
        run_prune(_cfg(tiny_model_dir, tmp_path / "x", shared_data, **kw), console=QUIET)
    assert not (tmp_path / "x").exists()  # nothing written on bad input


def test_out_dir_safety(tmp_path, tiny_model_dir, shared_data):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        run_prune(_cfg(tiny_model_dir, foreign, shared_data, method="magnitude"), console=QUIET)
    # issue 12: --overwrite replaces only what prunetune wrote; a directory of the user's is never written into
    with pytest.raises(UserError, match="not empty"):
        run_prune(_cfg(tiny_model_dir, foreign, shared_data, method="magnitude", overwrite=True), console=QUIET)
    assert (foreign / "notes.txt").read_text() == "mine"  # --overwrite never deletes the user's files
    (foreign / "notes.txt").unlink()
    run_prune(_cfg(tiny_model_dir, foreign, shared_data, method="magnitude"), console=QUIET)
    (foreign / "notes.txt").write_text("mine")  # a user's file beside our output survives every rerun
    # same config again: allowed (same model); a different one: refused unless --overwrite
    run_prune(_cfg(tiny_model_dir, foreign, shared_data, method="magnitude"), console=QUIET)
    with pytest.raises(UserError, match="different pruned model"):
        run_prune(_cfg(tiny_model_dir, foreign, shared_data, method="magnitude", sparsity=0.3), console=QUIET)
    run_prune(_cfg(tiny_model_dir, foreign, shared_data, method="magnitude", sparsity=0.3, overwrite=True), console=QUIET)
    assert json.loads((foreign / "prune.json").read_text())["config"]["sparsity"] == 0.3
    assert (foreign / "notes.txt").is_file()
    shutil.rmtree(foreign)


@pytest.mark.gpu
def test_cuda_layer_walk_matches_cpu(tmp_path, tiny_model_dir, shared_data):
    """Same code path on the GPU: one layer at a time on cuda, model kept on CPU, same masks up to float noise."""
    kw = dict(pattern="block16x16", reconstruct=True, dtype="float32")
    cpu = run_prune(_cfg(tiny_model_dir, tmp_path / "cpu", shared_data, device="cpu", **kw), console=QUIET)
    gpu = run_prune(_cfg(tiny_model_dir, tmp_path / "gpu", shared_data, device="cuda", **kw), console=QUIET)
    info = json.loads((gpu / "prune.json").read_text())
    assert info["pattern_check"]["ok"] and info["peak_cuda_mib"] > 0
    mc, mg = load_masks(cpu), load_masks(gpu)
    agree = sum(int((mc[n] == mg[n]).sum()) for n in mc) / sum(m.numel() for m in mc.values())
    assert agree > 0.97
    for n in mg:
        wc, wg = _weights(cpu)[f"{n}.weight"], _weights(gpu)[f"{n}.weight"]
        if torch.equal(mc[n], mg[n]):
            torch.testing.assert_close(wg, wc, rtol=1e-2, atol=1e-3)


def test_leftover_staging_dir_is_not_user_content(tmp_path, tiny_model_dir, shared_data):
    out = tmp_path / "o"
    (out / ".staging-12345").mkdir(parents=True)  # what an interrupted save leaves
    run_prune(_cfg(tiny_model_dir, out, shared_data, method="magnitude"), console=QUIET)
    assert not list(out.glob(".staging-*")) and (out / "prune.json").is_file()


def test_input_stats_match_direct_sums_and_share_inputs(tiny_model_dir, shared_data):
    from prunetune.architecture import linear_modules
    from prunetune.data import load_text, tokenize

    model, tok = load_model(str(tiny_model_dir))
    windows = cal.calibration_windows(tokenize(load_text("wikitext2", "train", str(shared_data)), tok).input_ids, 3, 32, 1)
    _, layers = find_decoder_layers(model)
    inputs = cal.capture_first_layer_inputs(model, layers[0], windows, "cpu")
    assert inputs.hidden.shape == (3, 32, 64) and "position_embeddings" in inputs.kwargs
    mods = linear_modules(layers[0])
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
               for n, m in mods.items()]
    out = torch.empty_like(inputs.hidden)
    cal.run_layer(layers[0], inputs, out)
    for h in handles:
        h.remove()
    for hessian in (True, False):
        with cal.collecting(mods, hessian) as stats:
            again = cal.run_layer(layers[0], inputs, torch.empty_like(out))
        assert torch.equal(again, out)
        # q/k/v and gate/up read the same tensor: one accumulator each, found by identity
        assert stats.shared_with == {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                                     "mlp.up_proj": "mlp.gate_proj"}
        for n in mods:
            x = torch.cat(seen[n]).float()
            if hessian:
                torch.testing.assert_close(stats.hessians[n], x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-5)
            else:
                torch.testing.assert_close(stats.col_sq_norms(n), (x**2).sum(0), rtol=1e-4, atol=1e-4)


def test_gather_stats_equals_a_full_forward_and_skips_what_follows_the_last_input(tiny_model_dir, shared_data):
    """The sequential walk's statistics pass stops each window at the last hooked input: the same sums as the
    full forward, and the module after it (down_proj) never runs."""
    from prunetune.architecture import linear_modules
    from prunetune.data import load_text, tokenize

    model, tok = load_model(str(tiny_model_dir))
    windows = cal.calibration_windows(tokenize(load_text("wikitext2", "train", str(shared_data)), tok).input_ids, 3, 32, 1)
    _, layers = find_decoder_layers(model)
    inputs = cal.capture_first_layer_inputs(model, layers[0], windows, "cpu")
    mods = linear_modules(layers[0])
    calls: list[str] = []
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: calls.append(n)) for n, m in mods.items()]
    try:
        for hessian in (True, False):
            with cal.collecting(mods, hessian) as full:
                cal.run_layer(layers[0], inputs, torch.empty_like(inputs.hidden))
            calls.clear()
            with cal.collecting(mods, hessian) as cut:
                cal.gather_stats(layers[0], inputs, cut)
            # the first window runs whole (it checks every module is called once); the other two stop early
            assert calls.count("mlp.down_proj") == 1 and calls.count("mlp.gate_proj") == 3
            assert cut.counts == full.counts and cut.shared_with == full.shared_with
            for n in mods:
                assert torch.equal(cut.col_sq_norms(n), full.col_sq_norms(n))
            # a subset of the modules stops after its own last input
            calls.clear()
            attention = {n: m for n, m in mods.items() if n.startswith("self_attn.")}
            with cal.collecting(attention, hessian) as part:
                cal.gather_stats(layers[0], inputs, part)
            assert calls.count("self_attn.o_proj") == 1 and calls.count("mlp.gate_proj") == 1
            assert part.counts["self_attn.o_proj"] == 3 * 32
    finally:
        for h in handles:
            h.remove()


def test_gather_stats_never_cuts_a_layer_that_calls_a_module_twice_or_skips_one():
    """A module reused within the layer (or an expert a mixture-of-experts layer does not route to) would lose
    inputs if the forward stopped at the first sight of every module: such layers always run whole."""
    from torch import nn

    class Reuse(nn.Module):
        def __init__(self, skip: bool):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
            self.skip = skip

        def forward(self, x):
            x = self.b(self.a(x)) if self.skip else self.b(self.a(self.a(x)))
            return self.c(x) if not self.skip else x

    torch.manual_seed(0)
    inputs = cal.LayerInputs(torch.randn(3, 5, 4))
    for skip in (False, True):
        layer = Reuse(skip)
        mods = {"a": layer.a, "b": layer.b, "c": layer.c}
        ran: list[str] = []
        handles = [m.register_forward_hook(lambda mod, a, o, n=n, ran=ran: ran.append(n)) for n, m in mods.items()]
        with cal.collecting(mods, hessian=False) as full:
            cal.run_layer(layer, inputs, torch.empty_like(inputs.hidden))
        ran.clear()
        with cal.collecting(mods, hessian=False) as cut:
            cal.gather_stats(layer, inputs, cut)
        for h in handles:
            h.remove()
        assert cut.counts == full.counts and ran.count("b") == 3  # every window whole
        assert full.counts["a"] == (15 if skip else 30) and full.counts["c"] == (0 if skip else 15)
        for n in mods:
            assert torch.equal(cut.col_sq_norms(n), full.col_sq_norms(n))


def test_dtype_auto_is_recorded_with_its_reason(tmp_path, tiny_model_dir, shared_data):
    out = run_prune(_cfg(tiny_model_dir, tmp_path / "auto", shared_data), console=QUIET)
    info = json.loads((out / "prune.json").read_text())
    assert info["dtype"]["compute"] in ("float32", "bfloat16") and info["dtype"]["reason"]
    assert info["dtype"]["storage"] == "float32"  # CPU: the dense precision is what gets saved


def test_bf16_autocast_calibration_keeps_float32_weights_and_exact_pattern(tmp_path, tiny_model_dir, shared_data,
                                                                           monkeypatch):
    """--dtype bfloat16 on a CPU with native bf16: forward passes under bf16 autocast, weights and statistics stay
    float32 (the weights are never rounded to bf16 on CPU, explicit or not)."""
    import prunetune.pruning.precision as precision

    monkeypatch.setattr(precision, "resolve_dtype", lambda req, dev, purpose: (torch.bfloat16, "bf16: native (test)"))
    out = run_prune(_cfg(tiny_model_dir, tmp_path / "bf16", shared_data, pattern="block16x16", reconstruct=True,
                         dtype="bfloat16"), console=QUIET)
    info = json.loads((out / "prune.json").read_text())
    assert info["dtype"] == {"storage": "float32", "compute": "bfloat16", "reason": "bf16: native (test)"}
    assert info["pattern_check"]["ok"]
    ref = load_masks(run_prune(_cfg(tiny_model_dir, tmp_path / "f32", shared_data, pattern="block16x16",
                                    dtype="float32"), console=QUIET))
    got = load_masks(out)
    assert all(w.dtype == torch.float32 for w in _weights(out).values())
    agree = sum(int((ref[n] == got[n]).sum()) for n in ref) / sum(m.numel() for m in ref.values())
    assert agree > 0.9  # bf16 activations move a few tiles near the threshold, no more


def test_unknown_dtype_is_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown --dtype 'fp8'"):
        PruneConfig(model="m", out=str(tmp_path), dtype="fp8")
