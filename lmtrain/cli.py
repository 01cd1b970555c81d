"""`lmtrain <command> [overrides]`: a table of commands, each a Hydra app with its own config and run dir.

Hydra has no subcommands and reads sys.argv itself, so the dispatcher removes the command word and
hands over to that command's `@hydra.main` function; overrides, -m, --cfg, --help and shell completion
then work after the command.
"""

from __future__ import annotations

import importlib
import os
import sys

from lmtrain.commands import completion

# command -> (module with a `main` Hydra app, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("lmtrain.commands.train", "train a language model (Hydra overrides after the command)"),
    "generate": ("lmtrain.commands.generate", "continue prompts with a trained model, streaming the text"),
    "eval": ("lmtrain.commands.eval", "loss, perplexity and bits per byte of a trained model on a data split"),
    "export": ("lmtrain.commands.export", "write a checkpoint as a Hugging Face transformers model folder"),
    "prepare": ("lmtrain.commands.prepare", "tokenize data into the cache that `train` uses (data=... tokenizer=...)"),
    "summarize": ("lmtrain.commands.summarize", "the summary table of runs or sweeps, as csv and md (DIR ...)"),
    "plot": ("lmtrain.commands.plot", "PNG plots of runs: loss curves, a sweep's curves and objective (DIR ...)"),
}
# Commands that are Hydra apps (overrides, -m, --cfg, completion); the others take folders.
HYDRA_COMMANDS = ["train", "generate", "eval", "export", "prepare"]

USAGE = "usage: lmtrain <command> [hydra overrides | --help | --cfg job | -m ...]"


def _help() -> str:
    lines = [USAGE, "", "commands:"]
    lines += [f"  {name:<10} {description}" for name, (_, description) in COMMANDS.items()]
    lines += ["", "`lmtrain <command> --help` lists that command's config groups and options.",
              'Shell completion: eval "$(lmtrain train -sc install=bash)" (zsh alike; fish: ... | source).']
    return "\n".join(lines)


def _absolute_config_dirs(argv: list[str]) -> list[str]:
    """Hydra resolves a relative --config-dir/-cd against the installed package; make it absolute first."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("--config-dir", "-cd") and i + 1 < len(out):
            out[i + 1] = os.path.abspath(out[i + 1])
        elif arg.startswith("--config-dir="):
            out[i] = "--config-dir=" + os.path.abspath(arg.split("=", 1)[1])
    return out


def _check_command_line(command: str, argv: list[str]) -> None:
    """Mistakes Hydra would report at length, as one line each: an unknown key (naming the nearest existing
    one, where Hydra suggests `+key=...`), a YAML syntax error in a --config-dir file, a run folder that cannot
    be created. An existing run folder is noted: a failed start never removes one the user had."""
    if "COMP_LINE" in os.environ or any(a in ("-sc", "--shell-completion") for a in argv):
        return
    from lmtrain.config import SCHEMAS
    from lmtrain.config.overrides import check_config_dirs, check_overrides
    from lmtrain.errors import USER_ERROR_EXIT, ConfigError
    from lmtrain.runs.run_dir import note_existing

    try:
        check_config_dirs(argv)
        check_overrides(SCHEMAS[command], argv)
        note_existing(argv)
    except ConfigError as e:
        print(f"lmtrain {command}: {e}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)


def main() -> None:
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_help())
        sys.exit(0 if argv else 2)
    if argv[0] == "--version":
        from lmtrain import __version__

        print(f"lmtrain {__version__}")
        return
    shell = completion.install_request(argv)
    if shell is not None:  # Hydra's own installer would register `lmtrain train` as the program
        if shell not in completion.SHELLS:
            print(f"lmtrain: no completion for {shell!r}; use one of {', '.join(completion.SHELLS)}", file=sys.stderr)
            sys.exit(2)
        print(completion.script(shell, list(COMMANDS), HYDRA_COMMANDS))
        return
    command = argv[0]
    if command not in COMMANDS:
        print(f"lmtrain: unknown command {command!r}\n\n{_help()}", file=sys.stderr)
        sys.exit(2)
    if "COMP_LINE" in os.environ:  # shell completion calls back with the whole line: drop the command word
        words = os.environ["COMP_LINE"].split(" ")
        if len(words) > 1 and words[1] == command:
            os.environ["COMP_LINE"] = " ".join(words[:1] + words[2:])
        shell = completion.query_request(argv[1:])
        if command in HYDRA_COMMANDS and shell is not None:  # answered here, without Hydra composing a config
            answer = completion.answer(command, os.environ["COMP_LINE"])
            if answer is not None:
                print(completion.formatted(answer, shell))
                return
    module = importlib.import_module(COMMANDS[command][0])
    if command in HYDRA_COMMANDS:
        _check_command_line(command, argv[1:])
    args = _absolute_config_dirs(argv[1:])
    extra = getattr(module, "extra_overrides", None)  # a command's own additions (train: distributed run dirs)
    sys.argv = [f"{os.path.basename(sys.argv[0])} {command}"] + args + (extra(args) if extra else [])
    module.main()
