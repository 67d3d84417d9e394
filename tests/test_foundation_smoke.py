from prunetune.architecture import find_decoder_layers, prunable_linears
from prunetune.models import load_model
from tiny import FAMILIES, make_tiny_model


def test_tiny_families_load(tmp_path, tokenizer_dir):
    for family in FAMILIES:
        model, tok = load_model(str(make_tiny_model(tmp_path / family, tokenizer_dir, family)))
        _, layers = find_decoder_layers(model)
        assert len(layers) == 2
        assert {n.rsplit(".", 1)[-1] for n in prunable_linears(model)} == {
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
        }
