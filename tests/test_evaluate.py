import math

import pytest
import torch
from torch import nn

from prunetune.errors import UserError
from prunetune.perplexity import perplexity, windows_of


class _Out:
    def __init__(self, logits):
        self.logits = logits


class Bigram(nn.Module):
    """A model whose next-token distribution depends only on the current token: easy to compute by hand."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab))

    def forward(self, input_ids, use_cache=False):
        return _Out(self.table[input_ids])


def reference_ppl(table: torch.Tensor, ids: torch.Tensor, seqlen: int, max_windows=None) -> float:
    n = ids.numel() // seqlen if max_windows is None else min(ids.numel() // seqlen, max_windows)
    total = 0.0
    logp = torch.log_softmax(table, dim=-1)
    for w in range(n):
        win = ids[w * seqlen : (w + 1) * seqlen].tolist()
        nll = -sum(logp[a, b].item() for a, b in zip(win[:-1], win[1:], strict=True)) / (seqlen - 1)
        total += nll * seqlen  # Wanda weighs each window's mean loss by seqlen
    return math.exp(total / (n * seqlen))


def test_perplexity_matches_hand_computation_and_batching():
    torch.manual_seed(0)
    model = Bigram(11)
    ids = torch.randint(0, 11, (1003,))
    expected = reference_ppl(model.table.detach(), ids, 50)
    for batch_size in (1, 3, 64):
        result = perplexity(model, ids, seqlen=50, batch_size=batch_size)
        assert result.perplexity == pytest.approx(expected, rel=1e-5)
        assert result.windows == 20 and result.tokens == 1000
    limited = perplexity(model, ids, seqlen=50, max_windows=4)
    assert limited.windows == 4
    assert limited.perplexity == pytest.approx(reference_ppl(model.table.detach(), ids, 50, 4), rel=1e-5)


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    model = Bigram(37)
    with torch.no_grad():
        model.table.zero_()
    assert perplexity(model, torch.randint(0, 37, (500,)), seqlen=100).perplexity == pytest.approx(37, rel=1e-5)


def test_windows_drop_the_remainder_and_short_text_fails():
    assert windows_of(torch.arange(10), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(Bigram(5), torch.zeros(3, dtype=torch.long), seqlen=4)


def test_auto_batch_fits_memory_and_caps(monkeypatch):
    import psutil

    from prunetune.perplexity import auto_batch_size

    class Mem:
        available = 64 * 2**30

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Mem)
    batch, reason = auto_batch_size(2048, 49152, 100, "cpu")
    assert batch == 4 and "capped at 4" in reason
    assert auto_batch_size(2048, 49152, 2, "cpu")[0] == 2  # never more than the windows there are
    Mem.available = 2 * 2**30  # a quarter is 0.5 GiB: not even one window's 1.1 GiB of logits
    assert auto_batch_size(2048, 49152, 100, "cpu")[0] == 1


def _pruned_with_adapter(tmp_path, tiny_model_dir, method):
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from prunetune.architecture import prunable_linears
    from prunetune.rundir import base_digest, save_masks, write_adapter_meta

    pruned = tmp_path / "pruned"
    shutil.copytree(tiny_model_dir, pruned)
    model = AutoModelForCausalLM.from_pretrained(pruned)
    torch.manual_seed(0)
    masks = {}
    for name, module in prunable_linears(model).items():
        keep = torch.rand(module.weight.shape) > 0.5
        module.weight.data[~keep] = 0
        masks[name] = keep
    model.save_pretrained(pruned)
    save_masks(masks, pruned, {"pattern": "unstructured"})
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    adapter = tmp_path / "adapter"
    peft.save_pretrained(adapter)
    write_adapter_meta(adapter, pruned_model=pruned, base_model=None, digest=base_digest(model), method=method)
    return pruned, adapter, masks


@pytest.mark.parametrize("method", ["lora", "masked-lora"])
def test_adapter_on_a_pruned_model_is_evaluated_as_the_deployable_model(tmp_path, tiny_model_dir, shared_data, method):
    from prunetune.data import load_text, tokenize
    from prunetune.evaluate import EvalConfig, run_evaluate
    from prunetune.models import apply_adapter, load_model
    from prunetune.recovery.merge import merge_adapter

    pruned, adapter, masks = _pruned_with_adapter(tmp_path, tiny_model_dir, method)
    # float32 as the reference below: on a native-bf16 CPU `auto` would evaluate in bf16 (another 1e-4).
    r = run_evaluate(EvalConfig(adapter=str(adapter), seqlen=64, max_windows=3, data_dir=[str(shared_data)],
                                dtype="float32", quiet=True))
    assert "deployable" in r["describes"]
    assert ("adapter_perplexity" in r) == (method == "lora")
    base, tokenizer = load_model(str(pruned))
    merged, _ = merge_adapter(apply_adapter(base, adapter), masks)
    ids = tokenize(load_text("wikitext2", "test", [str(shared_data)]), tokenizer).input_ids
    expected = perplexity(merged, ids, 64, 1, 3).perplexity
    assert abs(r["perplexity"] - expected) / expected < 1e-4
    if method == "lora":
        assert abs(r["adapter_perplexity"] - r["perplexity"]) > 1e-3  # the dense update is another model


@pytest.mark.slow
def test_zero_shot_tasks_through_evaluate(tmp_path, tiny_model_dir):
    import json

    from prunetune.evaluate import EvalConfig, run_evaluate
    from test_zeroshot import write_task

    task = write_task(tmp_path)
    out = tmp_path / "eval.json"
    r = run_evaluate(EvalConfig(model=str(tiny_model_dir), dataset="none", tasks=str(task), out=str(out), quiet=True))
    assert "perplexity" not in r and set(r["zeroshot"]["tasks"]) == {"prunetune_mc"}
    assert 0 <= r["zeroshot"]["tasks"]["prunetune_mc"]["acc"] <= 1
    assert json.loads(out.read_text())["zeroshot"]["tasks"]["prunetune_mc"]["samples"]
    with pytest.raises(UserError, match="nothing to evaluate"):
        EvalConfig(model=str(tiny_model_dir), dataset="none")


def test_tuned_batch_times_each_candidate_once_and_keeps_the_fastest():
    from prunetune.perplexity import BatchTuner

    tuner = BatchTuner(4)
    seen = []
    remaining = 20
    seconds_per_window = {1: 1.0, 2: 0.4, 4: 0.7}  # batch 2 is the fastest on this imaginary machine
    while remaining:
        size = min(tuner.next_size(remaining), remaining)
        seen.append(size)
        tuner.record(size, size * 100, size * seconds_per_window[size])
        remaining -= size
    assert seen[:4] == [1, 1, 2, 4]  # warm-up, then each candidate timed once
    assert tuner.best == 2 and set(seen[4:]) == {2}
    assert [b for b, _ in tuner.rates] == [1, 2, 4]
    assert dict(tuner.rates)[2] == pytest.approx(250)


def test_tuned_batch_never_tries_a_batch_the_remaining_windows_cannot_repay():
    from prunetune.perplexity import BatchTuner

    tuner = BatchTuner(16)
    tuner.record(tuner.next_size(5), 100, 1.0)  # warm-up
    assert tuner.next_size(4) == 1
    tuner.record(1, 100, 1.0)
    assert tuner.next_size(3) == 1  # 2 x 2 > 3: no time left to use what a batch-2 trial would teach


def test_tuned_perplexity_equals_fixed_batch_and_reports_what_it_measured():
    torch.manual_seed(0)
    model = Bigram(11)
    ids = torch.randint(0, 11, (2000,))
    fixed = perplexity(model, ids, seqlen=50, batch_size=1)
    tuned = perplexity(model, ids, seqlen=50, batch_size=4, tune=True)
    assert tuned.perplexity == pytest.approx(fixed.perplexity, rel=1e-6)
    assert tuned.windows == fixed.windows == 40
    assert [b for b, _ in tuned.batch_rates] == [1, 2, 4]
    assert tuned.batch_size in (1, 2, 4)
    few = perplexity(model, ids, seqlen=50, batch_size=4, max_windows=3, tune=True)  # too few to time
    assert few.batch_rates == () and few.batch_size == 4
