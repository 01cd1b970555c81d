"""Shell completion for `lmtrain <command> ...`: commands first, then each Hydra command's groups, choices and keys.

Hydra's own installer registers the program it runs as (`lmtrain train`, two words) and calls back
`lmtrain -sc query=bash`, which names no command. lmtrain prints its own function instead: the first word
completes from the command table; after a Hydra command it asks that command (`lmtrain train -sc query=bash`,
the dispatcher dropping the command word from COMP_LINE); after `summarize` or `plot` it offers folders.
"""

from __future__ import annotations

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
