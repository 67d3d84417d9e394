"""`prunetune speed`: measured inference speed and weight memory of a pruned model, with and without sparse
kernels, beside the dense model, and the sparsity at which a BSR matmul breaks even on this machine.

Variants (rows of the table):
- `dense`: the dense model (`--dense`, default the base model named in prune.json);
- `pruned (dense kernels)`: the pruned model as stored: zeros multiplied like any other number;
- `pruned (sparse kernels)`: each pruned decoder linear replaced by a `SparseLinear` holding the weight as
  PyTorch BSR (block patterns, tile = the pruning block), semi-structured 2:4 (`to_sparse_semi_structured`,
  CUDA with fp16/bf16 only), or CSR (unstructured and other N:M; 2:4 on CPU). Nothing is assumed to be faster:
  every number is measured, and a sparse kernel slower than the dense one shows as a speed-up below 1.

The defaults finish in about 2 minutes on a 2-core CPU with SmolLM2-135M (one batch of 128 tokens, 16 generated
tokens, 2 rounds; a shorter break-even sweep), printing a line per variant and round as it goes;
`--batch 1,8 --seqlen 512 --new-tokens 32 --repeats 3 --sweep-rounds 10` are the sizes of bench/RESULTS.md.
Serving runtimes (vLLM, llama.cpp) multiply the pruned zeros like any weight: they run at the speed of the
`pruned (dense kernels)` row (measured for vLLM CPU in bench/RESULTS.md, section runtimes).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunetune.architecture import prunable_linears
from prunetune.devices import DTYPE_NAMES, default_device, dtype_name, free_memory
from prunetune.errors import UserError
from prunetune.models import context_length, load_config, load_model
from prunetune.oserrors import is_out_of_memory
from prunetune.rundir import EXPORT_JSON, PRUNE_JSON, check_readable_dir, check_writable_file, read_pruned
from prunetune.sparsity.patterns import Pattern, parse_pattern

_Log = Callable[[str], None]
SMOLLM2_SHAPES = {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (192, 576), "gate_proj/up_proj": (1536, 576),
                  "down_proj": (576, 1536)}
"""(out, in) of SmolLM2-135M's decoder linears: the shapes of the break-even sweep."""
SWEEP_SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
FORMAT = "prunetune-speed/1"
"""In every results file: the file's statement that prunetune wrote it (what lets a rerun replace it)."""


def int_tuple(value: str | int | tuple[int | str, ...] | list[int | str]) -> tuple[int, ...]:
    """`1,8`, `("1,8",)`, `[1, 8]` -> (1, 8); anything else a UserError."""
    if isinstance(value, int):
        return (value,)
    items = [part for v in ([value] if isinstance(value, str) else value) for part in str(v).split(",")]
    try:
        return tuple(int(v.strip()) for v in items if v.strip())
    except ValueError:
        raise UserError(f"--batch {value!r} must be comma-separated integers, e.g. 1,8") from None


@dataclass
class SpeedConfig:
    """One speed measurement of a pruned model."""

    model_dir: str
    """The pruned model: a `prunetune prune` output (or a `prunetune export` directory)."""
    dense: str | None = None
    """The dense model to compare with (alias, hub id, directory, .gguf); default: the base model in prune.json."""
    batch: tuple[int, ...] = (1,)
    """Batch sizes to measure, comma separated (e.g. 1,8; each batch adds a round of every measurement)."""
    seqlen: int = 128
    """Tokens per sequence of the forward-pass measurement (512 for the README's table; a 2-core CPU takes
    seconds per pass of a 135M model at 512, minutes with CSR kernels)."""
    prompt: int = 16
    """Prompt tokens of the generation measurement."""
    new_tokens: int = 16
    """Tokens generated (greedy, KV cache) per sequence in the generation measurement."""
    device: str | None = None
    """cpu | cuda (default: cuda when available)."""
    dtype: str | None = None
    """float32 | bfloat16 | float16; default float32 on CPU, bfloat16 on CUDA (2:4 kernels need fp16/bf16)."""
    repeats: int = 2
    """Timed rounds per measurement after one warm-up; the variants take turns in each round and the fastest
    round of each is reported (on a shared machine the least disturbed one)."""
    breakeven: bool = True
    """Also sweep the sparsity of one 16x16-BSR matmul per SmolLM2 shape, on seqlen tokens and on 1 (decoding), to
    find where it beats dense."""
    sweep_rounds: int = 5
    """Timed rounds of each matmul of the break-even sweep (10 for bench/RESULTS.md)."""
    out: str | None = None
    """Write the results JSON here."""

    def __post_init__(self) -> None:
        self.batch = int_tuple(self.batch)
        if not self.batch or min(self.batch) < 1:
            raise UserError(f"--batch {self.batch} must be positive integers, e.g. 1,8")
        for name in ("seqlen", "prompt", "new_tokens", "repeats", "sweep_rounds"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least 1")
        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise UserError(f"--device {self.device!r}: use cpu or cuda")
        if self.device and self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {self.device} but no CUDA device is visible; use --device cpu")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise UserError(f"--dtype {self.dtype!r}: choose float32, bfloat16 or float16")


# ---- sparse-kernel linears -----------------------------------------------------------------------------------
class SparseLinear(nn.Module):
    """`y = x W^T + b` with W held in a sparse layout: `bsr` (tiles), `csr`, or `semi` (CUDA 2:4)."""

    def __init__(self, linear: nn.Linear, layout: str, block: tuple[int, int] = (16, 16)) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.layout = layout
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if layout == "bsr":
            with warnings.catch_warnings():  # "BSR support is in beta": the table says what it measured
                warnings.simplefilter("ignore", UserWarning)
                sparse = weight.to_sparse_bsr(block)
        elif layout == "csr":
            sparse = weight.to_sparse_csr()
        elif layout == "semi":
            from torch.sparse import to_sparse_semi_structured

            sparse = to_sparse_semi_structured(weight)
        else:
            raise ValueError(f"unknown layout {layout!r}")
        self.weight = nn.Parameter(sparse, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (N, in)
        # Semi-structured tensors dispatch F.linear to the 2:4 kernels; BSR/CSR: (out, in) @ (in, N) -> (out, N).
        y = nn.functional.linear(flat, self.weight) if self.layout == "semi" else (self.weight @ flat.T).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage of a dense or sparse tensor: values plus index arrays."""
    if t.layout in (torch.sparse_bsr, torch.sparse_csr):
        return sum(a.numel() * a.element_size() for a in (t.values(), t.crow_indices(), t.col_indices()))
    if type(t).__name__.startswith("SparseSemiStructured"):
        return sum(a.numel() * a.element_size() for a in (t.packed, t.meta) if a is not None)
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters (tied ones once), sparse layouts counted with their indices."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        key = id(p)
        if key in seen:
            continue
        seen.add(key)
        total += tensor_bytes(p.data)
    return total


def layout_for(pattern: Pattern, device: str, dtype: torch.dtype) -> tuple[str, str]:
    """(layout, why) of the sparse kernel for `pattern` on `device`."""
    if pattern.kind == "block":
        return "bsr", f"BSR with {pattern.h}x{pattern.w} blocks (torch.sparse)"
    if pattern.name == "2:4":
        if torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16):
            return "semi", "semi-structured 2:4 (to_sparse_semi_structured, CUDA sparse tensor cores)"
        return "csr", "CSR: PyTorch's 2:4 kernels are CUDA-only with fp16/bf16"
    return "csr", "CSR (torch.sparse)"


def _is_2_4(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every 4 consecutive input weights (what the semi-structured kernels hold)."""
    return weight.shape[-1] % 4 == 0 and bool(((weight != 0).view(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def sparsify(model: nn.Module, pattern: Pattern, device: str, dtype: torch.dtype) -> tuple[str, int]:
    """Replace each pruned decoder linear of `model` (in place) by a SparseLinear; (description, count)."""
    layout, why = layout_for(pattern, device, dtype)
    block = (pattern.h, pattern.w) if pattern.kind == "block" else (16, 16)
    replaced = 0
    for name, linear in prunable_linears(model).items():
        if not bool((linear.weight == 0).any()):
            continue  # a skipped (dense) module keeps its dense kernel
        use = layout
        if use == "bsr" and (linear.out_features % block[0] or linear.in_features % block[1]):
            use = "csr"  # BSR needs whole blocks
        if use == "semi" and not _is_2_4(linear.weight):
            use = "csr"  # e.g. an OWL layer given 1:4 or 3:4 inside a 2:4 run
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, SparseLinear(linear, use, block))
        replaced += 1
    return why, replaced


# ---- timing --------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _forward(model: nn.Module, ids: torch.Tensor) -> Callable[[], Any]:
    @torch.inference_mode()
    def run() -> None:
        model(input_ids=ids, use_cache=False)

    return run


def _generate(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> Callable[[], Any]:
    @torch.inference_mode()
    def run() -> None:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    return run


# ---- break-even sweep ----------------------------------------------------------------------------------------
def block_sparse_weight(out_f: int, in_f: int, sparsity: float, block: tuple[int, int], dtype: torch.dtype,
                        seed: int = 0) -> torch.Tensor:
    """A random (out, in) weight with round(sparsity * tiles) whole zero tiles."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = out_f // block[0], in_f // block[1]
    tiles = torch.ones(rows * cols, dtype=torch.bool)
    tiles[torch.randperm(rows * cols, generator=gen)[: round(sparsity * rows * cols)]] = False
    mask = tiles.view(rows, cols).repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return (torch.randn(out_f, in_f, generator=gen) * mask).to(dtype)


def _best_interleaved(fns: list[Callable[[], Any]], rounds: int, device: str,
                      on_round: Callable[[int, list[float]], None] | None = None) -> list[float]:
    """Fastest of `rounds` runs of each fn, the fns taking turns: on a shared machine the minimum is the run least
    disturbed by other processes, and taking turns exposes every fn to the same background load.
    `on_round(r, seconds)` gets each round's times (round 0: the warm-up), for a progress line."""
    warm = []
    for fn in fns:
        start = time.perf_counter()
        fn()  # warm-up
        warm.append(time.perf_counter() - start)
    if on_round is not None:
        on_round(0, warm)
    best = [float("inf")] * len(fns)
    for r in range(rounds):
        times = []
        for i, fn in enumerate(fns):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
            best[i] = min(best[i], times[-1])
        if on_round is not None:
            on_round(r + 1, times)
    return best


@torch.inference_mode()
def breakeven_sweep(shape: tuple[int, int], tokens: int, sparsities: tuple[float, ...], block: tuple[int, int],
                    device: str, dtype: torch.dtype, rounds: int = 10) -> dict[str, Any]:
    """Dense vs BSR matmul time of one (out, in) weight on `tokens` inputs across sparsities (best of `rounds`,
    interleaved), and the break-even: the lowest swept sparsity from which BSR stays at least as fast (None: not
    within the sweep)."""
    out_f, in_f = shape
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    rows = []
    for s in sparsities:
        w = block_sparse_weight(out_f, in_f, s, block, dtype).to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            bsr = w.to_sparse_bsr(block)
        dense_s, bsr_s = _best_interleaved(
            [lambda w=w: nn.functional.linear(x, w), lambda bsr=bsr: (bsr @ x.T).T], rounds, device)
        rows.append({"sparsity": s, "dense_ms": dense_s * 1e3, "bsr_ms": bsr_s * 1e3, "speedup": dense_s / bsr_s})
    even = None
    for i, row in enumerate(rows):
        if all(r["speedup"] >= 1.0 for r in rows[i:]):
            even = row["sparsity"]
            break
    return {"shape": list(shape), "tokens": tokens, "block": list(block), "rows": rows, "breakeven_sparsity": even}


# ---- the command ---------------------------------------------------------------------------------------------
@dataclass
class SpeedRow:
    variant: str
    batch: int
    forward_tokens_per_s: float | None
    generate_tokens_per_s: float | None
    weight_mib: float
    note: str = ""


@dataclass
class SpeedResult:
    rows: list[SpeedRow]
    pattern: str
    kernel: str
    device: str
    dtype: str
    breakeven: list[dict[str, Any]] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "rows": [asdict(r) for r in self.rows]}


def _pruned_pattern(model_dir: Path) -> Pattern:
    for record_name, key in ((PRUNE_JSON, "config"), (EXPORT_JSON, None)):
        path = model_dir / record_name
        if path.is_file():
            record = json.loads(path.read_text())
            cfg = record.get(key, record) if key else record
            name = (cfg if isinstance(cfg, dict) else {}).get("pattern") or record.get("pattern")
            if name:
                return parse_pattern(str(name))
    return parse_pattern("unstructured")


def check_sizes(cfg: SpeedConfig, config: Any, device: str, dtype: torch.dtype) -> None:
    """Refuse, before any weight is loaded, a measurement beyond the model's context (it would time positions the
    model was never trained for) or one whose inputs and logits alone cannot be allocated on `device`."""
    context = context_length(config)
    longest = max(cfg.seqlen, cfg.prompt + cfg.new_tokens)
    if context is not None and longest > context:
        which = f"--seqlen {cfg.seqlen}" if cfg.seqlen >= cfg.prompt + cfg.new_tokens else \
            f"--prompt {cfg.prompt} + --new-tokens {cfg.new_tokens}"
        raise UserError(f"{which} exceeds the model's context of {context} tokens: speed would be measured on "
                        f"positions the model never handles; use at most {context} tokens")
    batch = max(cfg.batch)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    width = torch.finfo(dtype).bits // 8
    # A lower bound of one forward pass: the token ids, the logits and two hidden states of the largest batch.
    need = batch * cfg.seqlen * (8 + vocab * width + 2 * hidden * width)
    free = free_memory(device)
    if free is not None and need > free:
        raise UserError(f"--batch {batch} x --seqlen {cfg.seqlen} needs at least {need / 2**30:,.1f} GiB on {device} "
                        f"for one forward pass (ids, logits of {vocab} tokens, hidden states) but "
                        f"{free / 2**30:,.1f} GiB are free; lower --batch or --seqlen")


def _load(spec: str, dtype: torch.dtype, device: str, log: _Log) -> nn.Module:
    model, _ = load_model(spec, dtype=dtype, device=device, log=log)  # also decompresses a compressed export
    return model


def _timed_load(what: str, spec: str, dtype: torch.dtype, device: str, log: _Log) -> nn.Module:
    start = time.perf_counter()
    model = _load(spec, dtype, device, log)
    log(f"Loaded {what} in {time.perf_counter() - start:.1f} s")
    return model


def run_speed(cfg: SpeedConfig, log: _Log = print) -> SpeedResult:
    from prunetune.runinfo import machine, write_json

    if cfg.out:
        # a link loop, a read-only place, a file of the user's: refused before any measurement
        check_writable_file(cfg.out, "--out", form=FORMAT)
    device = default_device(cfg.device)
    dtype = DTYPE_NAMES[cfg.dtype] if cfg.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model_dir = check_readable_dir(cfg.model_dir, "MODEL_DIR")
    pattern = _pruned_pattern(model_dir)
    dense_spec = cfg.dense or read_pruned(model_dir).base_model
    check_sizes(cfg, load_config(str(model_dir), log=log), device, dtype)  # before any weight is loaded
    variants: list[tuple[str, nn.Module, str]] = []
    if dense_spec:
        variants.append(("dense", _timed_load(f"dense model {dense_spec}", dense_spec, dtype, device, log), ""))
    else:
        log("No dense model (give --dense; prune.json names none): the dense row is left out")
    variants.append(("pruned (dense kernels)", _timed_load("pruned model", str(model_dir), dtype, device, log), ""))
    sparse = _timed_load("pruned model for sparse kernels", str(model_dir), dtype, device, log)
    kernel, replaced = sparsify(sparse, pattern, device, dtype)
    log(f"  {replaced} linears now {kernel}")
    variants.append(("pruned (sparse kernels)", sparse, f"{replaced} linears: {kernel}"))
    try:
        rows = [row for b in cfg.batch for row in _measure_batch(variants, b, cfg, device, log)]
    except (RuntimeError, MemoryError) as err:
        if not is_out_of_memory(err):
            raise
        raise UserError(f"out of memory measuring --batch {','.join(map(str, cfg.batch))} x --seqlen {cfg.seqlen} on "
                        f"{device}; lower --batch or --seqlen") from None

    sweeps = []
    if cfg.breakeven:
        shapes = list(SMOLLM2_SHAPES.values())
        token_counts = list(dict.fromkeys((cfg.seqlen, 1)))  # a prompt's worth (prefill) and one token (decoding)
        log(f"Break-even sweep: 16x16 BSR vs dense matmul, {len(shapes)} SmolLM2 shapes x {token_counts} tokens, "
            f"sparsity {SWEEP_SPARSITIES[0]:.0%}-{SWEEP_SPARSITIES[-1]:.0%}, {cfg.sweep_rounds} rounds")
        for tokens in token_counts:
            for shape in shapes:
                sweeps.append(breakeven_sweep(shape, tokens, SWEEP_SPARSITIES, (16, 16), device, dtype,
                                              rounds=cfg.sweep_rounds))
                even = sweeps[-1]["breakeven_sparsity"]
                log(f"  {shape[0]}x{shape[1]} x {tokens} tokens: "
                    + (f"break-even at {even:.0%}" if even is not None else "BSR slower at every swept sparsity"))
    result = SpeedResult(rows, pattern.name, kernel, device, dtype_name(dtype), sweeps, machine())
    if cfg.out:
        write_json(cfg.out, {"format": FORMAT, **result.to_json(), "config": asdict(cfg)})
    return result


def _measure_batch(variants: list[tuple[str, nn.Module, str]], batch: int, cfg: SpeedConfig, device: str,
                   log: _Log) -> list[SpeedRow]:
    """Forward and generation tokens/s of every variant on the same inputs, the variants taking turns."""
    vocab = variants[0][1].config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, cfg.seqlen), generator=gen).to(device)  # (B, T)
    prompt = torch.randint(0, vocab, (batch, cfg.prompt), generator=gen).to(device)  # (B, P)
    notes = {name: note for name, _, note in variants}
    working = []
    for name, model, _ in variants:
        try:
            _forward(model, ids[:, :8])()
            working.append((name, model))
        except (RuntimeError, NotImplementedError) as err:  # a sparse layout without a kernel for this op
            notes[name] = f"no kernel: {str(err).splitlines()[0][:120]}"
    names = [name for name, _ in working]

    def progress(what: str) -> Callable[[int, list[float]], None]:
        def line(r: int, seconds: list[float]) -> None:
            label = "warm-up" if r == 0 else f"round {r}/{cfg.repeats}"
            log(f"  batch {batch}, {what}, {label}: " + ", ".join(f"{n} {s:.2f} s" for n, s in zip(names, seconds, strict=True)))
        return line

    fwd = _best_interleaved([_forward(m, ids) for _, m in working], cfg.repeats, device,
                            progress(f"forward of {cfg.seqlen} tokens"))
    gen_s = _best_interleaved([_generate(m, prompt, cfg.new_tokens) for _, m in working], cfg.repeats, device,
                              progress(f"generating {cfg.new_tokens} tokens"))
    measured = {name: (f, g) for (name, _), f, g in zip(working, fwd, gen_s, strict=True)}
    rows = []
    for name, model, _ in variants:
        f, g = measured.get(name, (None, None))
        rows.append(SpeedRow(name, batch, batch * cfg.seqlen / f if f else None,
                             batch * cfg.new_tokens / g if g else None, weight_bytes(model) / 2**20, notes[name]))
    return rows


def speedup_table(result: SpeedResult) -> list[dict[str, Any]]:
    """Rows with each variant's speed relative to the first row of the same batch (dense when measured)."""
    base: dict[int, SpeedRow] = {}
    table = []
    for row in result.rows:
        ref = base.setdefault(row.batch, row)

        def ratio(a: float | None, b: float | None) -> float | None:
            return a / b if a is not None and b else None

        table.append({**asdict(row), "forward_x": ratio(row.forward_tokens_per_s, ref.forward_tokens_per_s),
                      "generate_x": ratio(row.generate_tokens_per_s, ref.generate_tokens_per_s)})
    return table
