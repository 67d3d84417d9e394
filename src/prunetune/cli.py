"""`prunetune` console script: dispatches to subcommand modules, imported lazily so `--help` is instant.

Each command module exposes `configure_parser(parser)` and `main(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from prunetune import __version__
from prunetune.errors import UserError
from prunetune.oserrors import user_error

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "evaluate": ("prunetune.commands.evaluate", "perplexity of a model (+ adapter) on a dataset, Wanda/SparseGPT protocol"),
    "prune": ("prunetune.commands.prune", "prune a model: wanda|magnitude|sparsegpt, unstructured|N:M|blockHxW"),
    "verify": ("prunetune.commands.verify", "re-check a pruned model directory against its saved masks"),
    "finetune": ("prunetune.commands.finetune", "LoRA recovery fine-tuning with the live training console"),
    "merge": ("prunetune.commands.merge", "merge a LoRA adapter into its pruned base, keeping the sparsity"),
    "report": ("prunetune.commands.report", "plots and diagnosis of a training run or any Trainer log"),
    "monitor": ("prunetune.commands.monitor", "live view of a run directory from another terminal"),
    "compare": ("prunetune.commands.compare", "overlay the curves of several runs and tabulate them"),
    "export": ("prunetune.commands.export", "write a pruned model in the compressed-tensors format (vLLM, llm-compressor)"),
    "speed": ("prunetune.commands.speed", "tokens/s and weight memory: dense vs pruned, dense vs sparse kernels"),
    "run": ("prunetune.commands.run", "run a prune -> finetune -> merge -> eval -> report pipeline from YAML"),
    "demo": ("prunetune.commands.demo", "the whole pipeline offline on SmolLM2-135M (CPU friendly)"),
}


def _top_parser() -> argparse.ArgumentParser:
    epilog = "commands:\n" + "\n".join(f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="prunetune",
        description="Prune a language model, recover it with LoRA, and watch every signal while it trains.",
        epilog=epilog + "\n\nRun `prunetune COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"prunetune {__version__}")
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of the commands below")
    return parser


def _one_line(err: BaseException) -> str:
    """The message on one line (a path or a library's text may carry newlines)."""
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0].startswith("-"):
        top.parse_args(argv or ["--help"])
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        top.error(f"unknown command {name!r}; choose one of: {', '.join(COMMANDS)}")
    module_name, text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(prog=f"prunetune {name}", description=text)
        module.configure_parser(parser)
        args = parser.parse_args(rest)
        return int(module.main(args) or 0)
    except UserError as err:
        print(f"prunetune {name}: error: {_one_line(err)}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print(f"prunetune {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `prunetune report ... | head` closes stdout early; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:
        # A cause the OS names (a full disk, a symlink loop, a read-only place, memory) that reached us untranslated:
        # still one line with its fix. Anything else is a bug and keeps its traceback.
        translated = user_error(err)
        if translated is None:
            raise
        print(f"prunetune {name}: error: {_one_line(translated)}", file=sys.stderr)
        return UserError.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
