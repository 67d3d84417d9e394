import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from prunetune.architecture import SUPPORTED_ARCHITECTURES, find_decoder_layers, module_type, prunable_linears
from prunetune.errors import UserError
from prunetune.models import load_model, materialize, resolve_model
from tiny import FAMILIES, WIKITEXT_DIR, make_tiny_model, tiny_config

LINEAR_TYPES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("family", FAMILIES)
def test_families_load_and_expose_decoder_linears(tmp_path, tokenizer_dir, family):
    model, tokenizer = load_model(str(make_tiny_model(tmp_path / family, tokenizer_dir, family)))
    prefix, layers = find_decoder_layers(model)
    assert prefix == "model.layers" and len(layers) == 2
    names = prunable_linears(model)
    assert len(names) == 14 and {module_type(n) for n in names} == LINEAR_TYPES
    assert not any("lm_head" in n or "embed" in n for n in names)
    assert tokenizer.pad_token is not None


def test_peft_wrapped_model_keeps_base_names(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(str(tiny_model_dir))
    plain = set(prunable_linears(model))
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    names = set(prunable_linears(wrapped))
    assert {n.removeprefix("base_model.model.") for n in names} == plain


def test_unsupported_architecture_lists_the_supported_ones():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'") as err:
        find_decoder_layers(gpt2)
    assert all(name in str(err.value) for name in SUPPORTED_ARCHITECTURES)


def test_bad_model_specs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        resolve_model(str(tmp_path / "missing-model"))
    with pytest.raises(UserError, match="not an alias"):
        resolve_model("smollm3-9000")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="without config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="does not exist"):
        resolve_model(str(tmp_path / "x.gguf"))
    assert resolve_model("meta-llama/Llama-2-7b-hf").kind == "hub"


def test_corrupt_files_are_user_errors(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"model weights file .*model.safetensors' is truncated or corrupt"):
        load_model(str(broken))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(UserError, match="cannot read GGUF"):
        load_model(str(fake))


def test_hub_unreachable_is_a_user_error():
    with pytest.raises(UserError, match="hub may be unreachable"):
        load_model("prunetune-tests/does-not-exist")


def test_dtype_and_device(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(UserError, match="float32, bfloat16, float16"):
        load_model(str(tiny_model_dir), dtype="int3")
    assert tiny_config("llama", 10).num_hidden_layers == 2


@pytest.mark.slow
@pytest.mark.realmodel
def test_smollm2_alias_converts_once_then_loads_from_cache(shared_data):
    from prunetune.data import load_text, tokenize
    from prunetune.perplexity import perplexity

    messages: list[str] = []
    first = materialize(resolve_model("smollm2-135m"), log=messages.append)
    assert any("Converting" in m for m in messages)
    messages.clear()
    model, tokenizer = load_model("smollm2-135m", log=messages.append)
    assert not any("Converting" in m for m in messages)  # second load: straight from the cache
    assert str(model.name_or_path) == first
    assert model.config.model_type == "llama" and len(find_decoder_layers(model)[1]) == 30
    ids = tokenize(load_text("wikitext2", "test", WIKITEXT_DIR), tokenizer).input_ids
    # A working 135M model: WikiText-2 perplexity in the tens, not thousands (dense SmolLM2 ~ 20-40).
    assert perplexity(model, ids, seqlen=256, max_windows=2).perplexity < 100
