"""`--format gguf`: one `.gguf` file for llama.cpp, ollama and LM Studio, written with the `gguf` package (the
writer llama.cpp's own converter uses), for Llama-family models (`model_type` llama or mistral without sliding
window, default RoPE).

What goes in: llama.cpp's `llama` architecture keys from config.json; every tensor under its GGUF name (q/k rows
permuted to GGML's interleaved RoPE layout, as llama.cpp's converter does; a tied `lm_head` is left out and
readers use `token_embd`); the tokenizer (byte-level BPE: tokens, types, merges, special ids, the pre-tokenizer
name; SentencePiece tokenizers from their `tokenizer.model`) and the chat template.

Types (`--gguf-type`, llama.cpp's names): matrices in bf16, f16 or q8_0; 1-D tensors (norms) stay float32, as in
llama.cpp's own files. Zeros: bf16 and f16 store a 0 as 0; q8_0 stores per block of 32 weights a scale and int8
values, and a 0 quantises to 0, so every pruned weight reads back 0 exactly in all three (checked on the written
file). The formats that do not keep them: those with a per-block minimum (q4_1, q5_1, the k-quants), whose 0
reads back as the minimum; they are not offered. Rounding can also turn a tiny kept weight into 0 (f16 below
6e-8, q8_0 below half a step): counted and reported, never the other way round.

Before the directory is published, every tensor is read back from the file (gguf's reader and dequantiser) and
compared: bf16/f16 bit-identical to the source cast, q8_0 with every pruned weight 0. With `--eval`, Transformers
then loads the file (its own GGUF reader, independent of this writer) and its perplexity is compared with the
source's on the same tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunetune.errors import UserError
from prunetune.export.base import ExportSource, Log, Written, safetensors_bytes

GGUF_TYPES = ("bf16", "f16", "q8_0")
FAMILIES = ("llama", "mistral")
FILE_NAME = "model-{type}.gguf"
Q8_BLOCK = 32
"""Weights per q8_0 block (one fp16 scale + 32 int8): a row length must be a multiple of it."""


def ggml_type(name: str) -> Any:
    import gguf

    return {"bf16": gguf.GGMLQuantizationType.BF16, "f16": gguf.GGMLQuantizationType.F16,
            "q8_0": gguf.GGMLQuantizationType.Q8_0}[name]


def file_type(name: str) -> int:
    import gguf

    return {"bf16": gguf.LlamaFileType.MOSTLY_BF16, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[name]


# ---- pure tensor math -------------------------------------------------------------------------------------
def rope_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q_proj/k_proj rows from Transformers' RoPE layout (each head's first half of dimensions, then its second
    half) to GGML's (the two halves interleaved in pairs), which llama.cpp computes RoPE on. (out, in) -> same."""
    out = weight.shape[0]
    return weight.reshape(heads, 2, out // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def rope_unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `rope_permute` (GGML's layout back to Transformers')."""
    out = weight.shape[0]
    return weight.reshape(heads, out // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def tensor_type(name: str, shape: tuple[int, ...], requested: str) -> str:
    """The GGUF type a tensor is stored in: 1-D (norms, biases) float32; matrices `requested`, except q8_0 on
    rows that are not whole blocks of 32, which fall back to f16."""
    if len(shape) < 2:
        return "f32"
    if requested == "q8_0" and shape[-1] % Q8_BLOCK:
        return "f16"
    return requested


def encode(values: torch.Tensor, kind: str) -> tuple[np.ndarray, Any]:
    """(array to write, raw GGML type or None) of a float tensor in `kind`: f32/f16 as numpy floats, bf16/q8_0 as
    the bytes gguf's reference quantisers produce (the same bytes as ggml's C code)."""
    import gguf

    data = values.detach().to("cpu", torch.float32).contiguous().numpy()
    if kind == "f32":
        return data, None
    if kind == "f16":
        return data.astype(np.float16), None
    return gguf.quants.quantize(data, ggml_type(kind)), ggml_type(kind)


F16_MAX = 65504.0
"""The largest finite float16: a weight beyond it would be stored as infinity."""


def check_f16_range(state: dict[str, torch.Tensor]) -> None:
    """Refuse f16 for a model with a weight outside float16's range (it would be written as infinity)."""
    for name, tensor in state.items():
        if tensor.dim() >= 2 and float(tensor.detach().abs().max()) > F16_MAX:
            raise UserError(f"--gguf-type f16: {name} holds a weight beyond float16's range (+-{F16_MAX:.0f}); "
                            "use --gguf-type bf16, which keeps float32's range")


def expected(values: torch.Tensor, kind: str) -> torch.Tensor | None:
    """What a lossless-by-definition read back must equal bit for bit (the source cast), None for q8_0."""
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}.get(kind)
    return None if dtype is None else values.detach().cpu().to(dtype).float()


# ---- model description ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LlamaShape:
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int
    rms_eps: float
    rope_theta: float
    vocab: int
    tied: bool


def llama_shape(config: Any) -> LlamaShape:
    """The hyper-parameters llama.cpp's `llama` architecture needs, or a UserError naming what is unsupported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UserError(f"--format gguf writes Llama-family models ({', '.join(FAMILIES)}); this model is "
                        f"{model_type!r}: export --format hf and convert it with llama.cpp's convert_hf_to_gguf.py")
    if getattr(config, "sliding_window", None):
        raise UserError("--format gguf: this model uses sliding-window attention, which llama.cpp's llama "
                        "architecture does not; export --format hf instead")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise UserError(f"--format gguf: RoPE scaling {rope_type!r} is not written yet (default RoPE only); "
                        "export --format hf and convert it with llama.cpp's convert_hf_to_gguf.py")
    theta = (rope.get("rope_theta") if isinstance(rope, dict) else None) or getattr(config, "rope_theta", 10000.0)
    heads = int(config.num_attention_heads)
    return LlamaShape(
        layers=int(config.num_hidden_layers), hidden=int(config.hidden_size), ffn=int(config.intermediate_size),
        heads=heads, kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
        context=int(config.max_position_embeddings), rms_eps=float(config.rms_norm_eps), rope_theta=float(theta),
        vocab=int(config.vocab_size), tied=bool(getattr(config, "tie_word_embeddings", False)),
    )


def gguf_tensors(state: dict[str, torch.Tensor], shape: LlamaShape) -> list[tuple[str, str, torch.Tensor]]:
    """(HF name, GGUF name, tensor in GGML layout) for every tensor llama.cpp reads; a tied lm_head is left out."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, shape.layers)
    out = []
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and shape.tied:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"--format gguf: no GGUF name for {hf_name!r} in llama.cpp's llama architecture; "
                            "export --format hf instead")
        if hf_name.endswith("self_attn.q_proj.weight"):
            tensor = rope_permute(tensor, shape.heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            tensor = rope_permute(tensor, shape.kv_heads)
        out.append((hf_name, name, tensor))
    return out


# ---- tokenizer --------------------------------------------------------------------------------------------
@dataclass
class Vocab:
    model: str
    """tokenizer.ggml.model: gpt2 (byte-level BPE) or llama (SentencePiece)."""
    pre: str | None
    tokens: list[str | bytes]
    types: list[int]
    scores: list[float] | None
    merges: list[str]
    note: str | None = None


def _pre_name(tokenizer_json: dict, base_gguf: Path | None) -> tuple[str, str | None]:
    """llama.cpp's pre-tokenizer name (how text is split before BPE), and a note when it had to be guessed.

    A model that came from a GGUF file (the demo's SmolLM2) keeps that file's name. Otherwise GPT-2's own
    splitting (a lone ByteLevel pre-tokenizer) is `gpt2`; anything else is `default`, with which llama.cpp warns
    and may split some text differently from Transformers."""
    if base_gguf is not None:
        import gguf

        field = gguf.GGUFReader(str(base_gguf)).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return bytes(field.parts[field.data[0]]).decode("utf-8"), None
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2", None
    return "default", ("the tokenizer's pre-tokenizer has no llama.cpp name known here: llama.cpp will use "
                       "'default' and may split some text differently from Transformers")


def read_vocab(tokenizer: Any, source_dir: Path, vocab_size: int, base_gguf: Path | None) -> Vocab:
    """The tokenizer as GGUF stores it; ids past the tokenizer's length (embedding rows padded to a multiple)
    become unused `[PAD{id}]` tokens, as llama.cpp's converter writes them."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("--format gguf needs a fast tokenizer (tokenizer.json) in MODEL_DIR; save one with "
                        "AutoTokenizer.from_pretrained(BASE).save_pretrained(MODEL_DIR)")
    tj = json.loads(backend.to_str())
    model = tj.get("model", {})
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    if model.get("type") == "BPE" and not model.get("byte_fallback", False):
        pre, note = _pre_name(tj, base_gguf)
        vocab = {i: t for t, i in tokenizer.get_vocab().items()}
        tokens: list[str | bytes] = []
        types: list[int] = []
        for i in range(vocab_size):
            if i not in vocab:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
            elif i in added:
                tokens.append(vocab[i])
                types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
            else:
                tokens.append(vocab[i])
                types.append(gguf.TokenType.NORMAL)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        return Vocab("gpt2", pre, tokens, types, None, merges, note)
    if (source_dir / "tokenizer.model").is_file():
        spm = gguf.vocab.SentencePieceVocab(source_dir)
        entries = list(spm.all_tokens())
        entries += [(f"[PAD{i}]".encode(), -1000.0, gguf.TokenType.UNUSED) for i in range(len(entries), vocab_size)]
        return Vocab("llama", "default", [e[0] for e in entries], [int(e[2]) for e in entries],
                     [e[1] for e in entries], [])
    raise UserError("--format gguf: this tokenizer is neither byte-level BPE nor SentencePiece with its "
                    "tokenizer.model; copy tokenizer.model from the base model into MODEL_DIR")


def _base_gguf(source: ExportSource) -> Path | None:
    """The GGUF file the pruned model's base came from (alias or .gguf spec in prune.json), if any."""
    from prunetune.models import resolve_model

    base = source.prune_summary.get("base_model")
    if not base:
        return None
    try:
        ref = resolve_model(str(base))
    except UserError:
        return None
    return Path(ref.location) if ref.kind in ("alias", "gguf") and Path(ref.location).is_file() else None


def _special_ids(tokenizer: Any, config: Any) -> dict[str, int]:
    ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is None:
            tid = getattr(config, f"{kind}_token_id", None)
        if isinstance(tid, int):
            ids[kind] = tid
    return ids


# ---- the file ---------------------------------------------------------------------------------------------
def write_gguf(path: Path, state: dict[str, torch.Tensor], config: Any, tokenizer: Any, vocab: Vocab, kind: str,
               name: str) -> list[tuple[str, str, str, torch.Tensor]]:
    """Write the GGUF file; returns (HF name, GGUF name, stored type, source tensor in GGML layout) per tensor."""
    import gguf

    shape = llama_shape(config)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_rope_dimension_count(shape.head_dim)
    if shape.head_dim != shape.hidden // shape.heads:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_vocab_size(shape.vocab)
    writer.add_file_type(file_type(kind))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for special, tid in _special_ids(tokenizer, config).items():
        getattr(writer, f"add_{special}_token_id")(tid)
    probe = tokenizer("a").input_ids
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id and len(probe) > 1)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)

    written = []
    for hf_name, gguf_name, tensor in gguf_tensors(state, shape):
        stored = tensor_type(gguf_name, tuple(tensor.shape), kind)
        data, raw = encode(tensor, stored)
        writer.add_tensor(gguf_name, data, raw_dtype=raw)
        written.append((hf_name, gguf_name, stored, tensor))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


@dataclass
class ReadBack:
    tensors: int
    bit_exact: int
    """Tensors identical to the source cast (f32/f16/bf16)."""
    zeros_source: int
    """Exact zeros in the source matrices (the pruned weights, and any weight that was 0)."""
    zeros_kept: int
    new_zeros: int
    """Non-zero source weights that read back as 0 (rounding)."""
    max_rel_error: float
    """Largest |read - source| / max|source| over the q8_0 matrices (0 without any)."""


def read_back(path: Path, written: list[tuple[str, str, str, torch.Tensor]]) -> ReadBack:
    """Every tensor of the file, de-quantised by gguf's reader, against the source: raises on a difference that
    the type does not explain (a bug: nothing is published)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    stored = {t.name: t for t in reader.tensors}
    exact = zeros = kept = new = 0
    worst = 0.0
    for hf_name, name, kind, source in written:
        t = stored[name]
        values = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        values = values.reshape(source.shape)
        src = source.detach().cpu().float()
        want = expected(src, kind)
        if want is not None:
            if not torch.equal(values, want):
                raise RuntimeError(f"GGUF read back changed {hf_name} ({kind}); a bug, nothing was written")
            exact += 1
        elif src.abs().max() > 0:
            worst = max(worst, float((values - src).abs().max() / src.abs().max()))
        if src.dim() == 2:
            zero = src == 0
            zeros += int(zero.sum())
            kept += int((values[zero] == 0).sum())
            new += int(((values == 0) & ~zero).sum())
    if kept != zeros:
        raise RuntimeError(f"GGUF read back: {zeros - kept} pruned weights are no longer 0 (a bug)")
    return ReadBack(len(written), exact, zeros, kept, new, worst)


def eval_tokens(source: ExportSource, cfg: Any) -> tuple[torch.Tensor, str]:
    """The evaluation text's test split as tokens (read before any writing: a missing dataset fails first)."""
    from prunetune.data import load_text, tokenize

    text = load_text(cfg.eval_dataset, "test", cfg.data_dir)
    return tokenize(text, source.tokenizer).input_ids, f"{text.dataset}/test"


def readback_perplexity(source: ExportSource, gguf_path: Path, tokens: tuple[torch.Tensor, str], cfg: Any,
                        log: Log) -> dict[str, Any]:
    """Perplexity of the source model and of the GGUF file as Transformers loads it (its own reader), on the
    first `cfg.eval_windows` windows of `cfg.eval_seqlen` tokens of the evaluation text, in float32."""
    from transformers import AutoModelForCausalLM

    from prunetune.perplexity import perplexity

    ids, data = tokens
    windows, seqlen = cfg.eval_windows, cfg.eval_seqlen
    before = perplexity(source.model.float(), ids, seqlen, max_windows=windows).perplexity
    log(f"Reading {gguf_path.name} back with Transformers' GGUF loader ...")
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                  dtype=torch.float32)
    after = perplexity(loaded, ids, seqlen, max_windows=windows).perplexity
    return {"source": before, "gguf_read_by_transformers": after, "change": after / before - 1,
            "tokens": f"{windows} x {seqlen}", "data": data, "reader": "transformers"}


class Gguf:
    """A single `.gguf` file (llama.cpp's format): matrices in bf16, f16 or q8_0, tokenizer and chat template in
    its metadata."""

    name = "gguf"
    runtimes = ("Transformers (`from_pretrained(DIR, gguf_file=...)`, de-quantised on load: measured). Written for "
                "llama.cpp, ollama and LM Studio (llama.cpp's format), not yet loaded by llama.cpp in prunetune's "
                "checks. Not vLLM 0.32 (GGUF left vLLM's core for a plugin, vllm-project/vllm issue 39583): serve "
                "the model directory there. As of 2026-12-02, bench/RESULTS.md sections runtimes, exports")

    def check(self, cfg: Any) -> None:
        if cfg.gguf_type not in GGUF_TYPES:
            raise UserError(f"--gguf-type {cfg.gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
        if cfg.dtype is not None:
            raise UserError("--dtype does not apply to --format gguf; choose the stored type with --gguf-type "
                            f"({', '.join(GGUF_TYPES)})")
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise UserError("--format gguf needs the gguf package: pip install gguf==0.19.0 (or `make setup`)") from None

    def write(self, source: ExportSource, cfg: Any, staging: Path, log: Log) -> Written:
        kind = cfg.gguf_type
        config = source.model.config
        llama_shape(config)  # refuse an unsupported model before any tensor is converted
        tokens = eval_tokens(source, cfg) if cfg.eval else None
        vocab = read_vocab(source.tokenizer, source.model_dir, int(config.vocab_size), _base_gguf(source))
        path = staging / FILE_NAME.format(type=kind)
        state = {k: v for k, v in source.model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
        if kind == "f16":
            check_f16_range(state)
        log(f"Writing {path.name}: {len(state)} tensors, matrices as {kind}, tokenizer {vocab.model}"
            f" (pre-tokenizer {vocab.pre})")
        written = write_gguf(path, state, config, source.tokenizer, vocab, kind, source.model_dir.name)
        check = read_back(path, written)
        notes = [f"{check.tensors} tensors read back by gguf's reader: {check.bit_exact} bit-identical to the source "
                 f"cast; {check.zeros_kept:,} of {check.zeros_source:,} zero weights still exactly 0"
                 + (f"; {check.new_zeros:,} tiny weights rounded to 0" if check.new_zeros else "")
                 + (f"; q8_0 error at most {check.max_rel_error:.2%} of a matrix's largest weight"
                    if kind == "q8_0" else "")]
        if vocab.note:
            notes.append(f"note: {vocab.note}")
        fallback = sorted({g for _, g, k, _ in written if k != kind and not g.endswith("norm.weight")
                           and k != "f32"})
        if fallback:
            notes.append(f"{len(fallback)} matrices kept in f16 (rows not a multiple of {Q8_BLOCK}): {fallback[:3]}")
        record: dict[str, Any] = {
            "file": path.name, "gguf_type": kind, "tokenizer": {"model": vocab.model, "pre": vocab.pre,
                                                                "chat_template": bool(source.tokenizer.chat_template)},
            "tensors": check.tensors, "bit_exact": check.bit_exact, "zeros_source": check.zeros_source,
            "zeros_kept": check.zeros_kept, "new_zeros": check.new_zeros, "q8_0_max_rel_error": check.max_rel_error,
            "bytes": {"source_safetensors": safetensors_bytes(source.model_dir), "gguf": path.stat().st_size},
        }
        if tokens is not None:
            ppl = readback_perplexity(source, path, tokens, cfg, log)
            record["perplexity"] = ppl
            notes.append(f"perplexity on {ppl['data']} ({ppl['tokens']} tokens): source {ppl['source']:.4f}, GGUF "
                         f"read by Transformers {ppl['gguf_read_by_transformers']:.4f} ({ppl['change']:+.2%}"
                         + (", the cost of q8_0)" if kind == "q8_0" else ")"))
        return Written(record=record, rows=[("whole model", record["bytes"]["source_safetensors"],
                                             record["bytes"]["gguf"])],
                       verified=check.tensors, notes=notes)


FORMAT = Gguf()
