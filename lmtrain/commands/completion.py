"""Shell completion for `lmtrain <command> ...`: commands first, then each Hydra command's groups, choices and keys.

Hydra's own installer registers the program it runs as (`lmtrain train`, two words) and calls back
`lmtrain -sc query=bash`, which names no command. lmtrain prints its own function instead: the first word
completes from the command table; after a Hydra command it asks that command (`lmtrain train -sc query=bash`,
the dispatcher dropping the command word from COMP_LINE); after `summarize` or `plot` it offers folders.

The dispatcher answers a Hydra command's query itself (`answer`), from the command's schema and the config
folders: Hydra's own completer composes the whole config on every TAB. Only `hydra...`, `+...` and `~...`
words go on to Hydra. Nothing here imports torch: a TAB answers in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import enum

SHELLS = ("bash", "zsh", "fish")

_BASH = """_lmtrain_completion()
{
    local word="${COMP_WORDS[COMP_CWORD]}"
    if (( COMP_CWORD == 1 )); then
        COMPREPLY=($(compgen -W "%(commands)s --help --version" -- "$word"))
        return
    fi
    case "${COMP_WORDS[1]}" in
        %(hydra_pattern)s)
            local choices
            choices=$(COMP_LINE="$COMP_LINE" COMP_POINT="$COMP_POINT" lmtrain "${COMP_WORDS[1]}" -sc query=bash \\
                      2>/dev/null)
            COMPREPLY=($(compgen -W "$choices" -- "$word"));;
        *)
            COMPREPLY=($(compgen -d -- "$word"));;
    esac
}
COMP_WORDBREAKS=${COMP_WORDBREAKS//=}
complete -o nospace -o default -F _lmtrain_completion lmtrain
"""

_FISH = """function __lmtrain_complete
    set -l parts (commandline -cpo)
    if test (count $parts) -le 1
        printf '%%s\\n' %(commands)s
        return
    end
    switch $parts[2]
        case %(hydra_words)s
            set -lx COMP_LINE (commandline -cp)
            lmtrain $parts[2] -sc query=fish 2>/dev/null
        case '*'
            __fish_complete_directories (commandline -ct)
    end
end
complete -c lmtrain -f -a '(__lmtrain_complete)'
"""


def install_request(argv: list[str]) -> str | None:
    """The shell of `-sc install=SHELL` / `--shell-completion install=SHELL` in argv, else None."""
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag in ("-sc", "--shell-completion") and value.startswith("install="):
            return value.removeprefix("install=")
    return None


def script(shell: str, commands: list[str], hydra_commands: list[str]) -> str:
    """The completion function to `eval` (bash, zsh) or `source` (fish)."""
    values = {"commands": " ".join(commands), "hydra_pattern": "|".join(hydra_commands),
              "hydra_words": " ".join(hydra_commands)}
    if shell == "fish":
        return _FISH % values
    prelude = "autoload -U +X bashcompinit && bashcompinit\n" if shell == "zsh" else ""
    return prelude + _BASH % values


def query_request(argv: list[str]) -> str | None:
    """The shell of `-sc query=SHELL` in argv (a completion callback), else None."""
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag in ("-sc", "--shell-completion") and value.startswith("query="):
            return value.removeprefix("query=")
    return None


def answer(command: str, line: str) -> list[str] | None:
    """Completions of the last word of `line` (the command word already dropped) for a Hydra command: config
    groups as `group=`, their choices, schema keys as `key=` (`key.` for a section) and the values of enum and
    bool keys. None for words Hydra itself completes (its own `hydra` keys, `+key` additions, `~key` deletions)."""
    from lmtrain.config import SCHEMAS
    from lmtrain.config.overrides import config_dirs, field_type, group_choices, non_optional, schema_fields

    words = line.split(" ")
    word = words[-1]
    if word.startswith(("hydra", "+", "~")):
        return None
    groups = group_choices(config_dirs(words[1:-1]))
    if "=" in word:
        key, typed = word.split("=", 1)
        values = groups.get(key) or _values(non_optional(field_type(SCHEMAS[command], key)))
        return [f"{key}={v}" for v in values if v.startswith(typed)]
    section, _, _ = word.rpartition(".")
    node = non_optional(field_type(SCHEMAS[command], section) if section else SCHEMAS[command])
    if not dataclasses.is_dataclass(node):
        return []
    prefix = f"{section}." if section else ""
    keys = {prefix + name + ("." if dataclasses.is_dataclass(non_optional(tp)) else "=")
            for name, tp in schema_fields(node).items()}
    if not section:  # the groups, and Hydra's own keys (completed by Hydra once chosen)
        keys |= {f"{g}=" for g in groups if g != "hydra"} | {"hydra."}
    return sorted(k for k in keys if k.startswith(word))


def _values(tp: object) -> list[str]:
    """What an enum or bool key can be set to; nothing to offer for other types."""
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return [m.value for m in tp]
    return ["true", "false"] if tp is bool else []


def formatted(completions: list[str], shell: str) -> str:
    """As Hydra's completers print them: bash and zsh on one line, fish one completion a line."""
    return ("\n" if shell == "fish" else " ").join(completions)
