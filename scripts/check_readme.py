"""Run every command that README.md and docs/*.md show, with tiny budgets and offline, so the docs stay true.

    python scripts/check_readme.py              # run them all; one line per command: ok, skipped (why) or FAILED
    python scripts/check_readme.py --list       # what each command would run, or why it is skipped; runs nothing
    python scripts/check_readme.py --only eval  # only commands containing this text (and the runs they need)

Before any command runs, every file a doc names must exist: a path under lmtrain/, docs/, scripts/, configs/ or
tests/ anywhere in its text, naming a file (with an extension), a folder (with a trailing /) or a glob (which
must match something), a module named from inside the package (`training/setup.py`), and the target of each
relative Markdown link (its `#anchor` left out). A doc naming a file that was moved or removed fails the check,
one line per name.

Which commands: every line of a fenced code block that starts, at column 0 or after a `$ ` prompt, with
`lmtrain`, `python`, `python3`, `pip`, `torchrun`, `srun` or `sbatch`. Indented lines and other lines are
the output shown beside them. `# comments` are dropped; `a && b` chains run part by part.

How each one runs (the rules, in order):
- A block right after an HTML comment `<!-- check_readme: skip REASON -->` is skipped, with REASON.
- Installs (`pip ...`, `python3 -m venv ...`, `. .venv/bin/activate`), the test suite (`python -m pytest`)
  and this script are skipped: a fresh clone's CI runs them already.
- Commands that need a GPU or a cluster (`cuda`, `torchrun`, `srun`, `sbatch`, `nproc_per_node`, `slurm`)
  and ones that need the Hugging Face hub (`data=hf` with a non-local path and no `data.data_files`,
  `data=tinystories`, `data=fineweb_edu`, `tokenizer=pretrained`, a `hf:<repo id>` model, also when an
  `experiment=` recipe chooses them) are skipped.
- Benchmarks (`scripts/bench*.py`, `scripts/crash_test.py`) take minutes by design: skipped unless `--slow`.
- `python -c` code that imports a package this environment lacks (transformers without the `hf` extra)
  is skipped, naming the package.
- Placeholders become real paths: a run directory (`RUN_DIR`, `outputs/DATE/TIME`, `outputs/...`, any
  `outputs/<date>/<time>`) is the folder of the first training run that succeeded, `step_NNNNNN` its newest
  step checkpoint; input files (`data.*train_files`, `data.*val_files`, `data.*data_files`, `prompt_file`)
  that do not exist are written with a small sample text (`.jsonl` as records and `.csv` as rows, the text
  under `data.text_column`, else `text`), globs as one file.
- `lmtrain train` and `prepare` get tiny budgets appended (a 2-layer model, a few steps, a few documents,
  a 300-token BPE; with `model.init_from`, whose checkpoint gives the model, only its context is cut);
  `generate` a few new tokens; `eval` a few hundred tokens. `--help`, `--cfg` and
  `-sc` run as written. Every command runs in one scratch folder, with HF_HUB_OFFLINE=1, its own token
  cache and stdin of two prompt lines (for `interactive=true`).
- A block whose output shows `ERROR: message` expects its command to fail as a user error (exit status 2 or
  more; 1 is a crash) and print that message (its numbers may differ); it gets budgets only for the keys it
  does not set itself. Every other command must exit 0.
- A command continued with a trailing backslash is joined; a `...` word (an elision) is dropped; a pipe
  (`| source`) runs its first half. `summarize`, `plot` and the like skip folders no command here made
  (`multirun/a`: the reader's own runs); `logger=wandb` (an account) and `logger=tensorboard` without its
  package are skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND_WORDS = ("lmtrain", "python", "python3", "pip", "torchrun", "srun", "sbatch")
SKIP_MARKER = re.compile(r"<!--\s*check_readme:\s*skip\s*(?P<reason>.*?)\s*-->")
EXPECTED_ERROR = re.compile(r"\bERROR: (?P<message>.+)$")

# Tiny budgets, appended after the command's own keys (which they replace).
TINY_MODEL = {"model.n_layers": "2", "model.d_model": "32", "model.n_heads": "2", "model.n_kv_heads": "null",
              "model.d_ff": "64", "model.block_size": "16"}
TINY_DATA = {"data.max_documents": "60", "tokenizer.vocab_size": "300"}
TINY_TRAIN = {**TINY_MODEL, **TINY_DATA, "trainer.max_steps": "4", "trainer.epochs": "0", "trainer.eval_every": "2",
              "trainer.save_every": "2", "trainer.eval_batches": "2", "trainer.batch_size": "4",
              "trainer.log_every": "1", "trainer.sample_every": "4", "trainer.sample_tokens": "8",
              "trainer.compile": "false", "trainer.progress": "false"}
BUDGETS = {"train": TINY_TRAIN, "prepare": TINY_DATA, "generate": {"max_new_tokens": "8"},
           "eval": {"max_tokens": "400"}}
RUN_DIR_PLACEHOLDER = re.compile(r"/?(?:abs/)?outputs/(?:DATE/TIME|\.\.\.|\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d)|\bRUN_DIR\b")
STEP_PLACEHOLDER = re.compile(r"\bstep_\d{6}\b")
INPUT_KEYS = re.compile(r"^(?:\+)?(?:data\.(?:mixture\.\d+\.)?(?:train_files|val_files|data_files)|prompt_file)="
                        r"(?P<value>.+)$")
GPU_OR_CLUSTER = re.compile(r"\bcuda\b|\btorchrun\b|\bsrun\b|\bsbatch\b|nproc_per_node|gpus_per_node|slurm|gpu_check")
HUB = re.compile(r"\bdata=(?:tinystories|fineweb_edu)\b|\btokenizer=pretrained\b|=hf:")
BENCHMARK = re.compile(r"\bscripts/(?:bench\w*|crash_test)\.py\b")
INSTALL = re.compile(r"^(?:pip3?|python3? -m (?:venv|pip)|\. \S*activate|source \S*activate)\b")
# A repository path in a doc's text, and a Markdown link's target (not a URL, not an anchor on the same page).
REPO_PATH = re.compile(r"(?<![\w./~-])(?:lmtrain|docs|scripts|configs|tests)/[\w./*{}-]*[\w*/]")
# A module named from inside the package, as the docs often do: `training/setup.py` is lmtrain/training/setup.py.
PACKAGE_MODULE = re.compile(r"(?<![\w./~-])(?:training|runs|data|model|config|commands|distributed|hf)/[\w/]*\w\.py\b")
LINK = re.compile(r"\]\((?![a-z][\w+.-]*:|#)(?P<target>[^)\s#]+)(?:#[^)]*)?\)")


@dataclass
class DocCommand:
    """One command as the docs show it, with where it is and what its block expects."""

    text: str  # the command line, prompt and comment removed
    where: str  # file:line
    skip: str | None = None  # why a marker skips it
    expect_error: str | None = None  # the ERROR message its block shows; None: it must succeed


@dataclass
class Outcome:
    command: DocCommand
    status: str  # ok, skipped, FAILED
    detail: str = ""
    seconds: float = 0.0
    runs: list[list[str]] = field(default_factory=list)


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def extract_commands(path: Path, root: Path = ROOT) -> list[DocCommand]:
    """The commands of a Markdown file's fenced code blocks, in order."""
    commands: list[DocCommand] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    fence, skip, block, marker = None, None, [], None
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if fence is None:
            if m := SKIP_MARKER.search(line):
                marker = m["reason"] or "marked in the docs"
            elif stripped.startswith(("```", "~~~")):
                fence, skip, block, marker = stripped[:3], marker, [], None
            elif stripped:
                marker = None  # a marker applies to the block right after it only
            continue
        if stripped.startswith(fence):
            error = next((m["message"].strip() for _, text in block if (m := EXPECTED_ERROR.search(text))), None)
            where = path.relative_to(root) if path.is_relative_to(root) else path
            for n, text in block:
                command = text.removeprefix("$ ")
                if command.split(" ", 1)[0] in COMMAND_WORDS:
                    commands.append(DocCommand(_without_comment(command), f"{where}:{n}", skip, error))
            fence = None
            continue
        if block and block[-1][1].rstrip().endswith("\\"):  # a command continued on the next line
            block[-1] = (block[-1][0], block[-1][1].rstrip()[:-1].rstrip() + " " + line.strip())
        else:
            block.append((number, line))
    return commands


def missing_paths(path: Path, root: Path = ROOT) -> list[str]:
    """`file:line: NAME` for each repository path or linked file that the doc names and that does not exist."""
    missing = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        # a file (an extension), a folder (a trailing /) or a glob: `lmtrain/bare` may be a ratio's name
        named = [(root, m[0]) for m in REPO_PATH.finditer(line) if m[0].endswith("/") or "*" in m[0]
                 or "." in m[0].rsplit("/", 1)[1]]
        named += [(root / "lmtrain", m[0]) for m in PACKAGE_MODULE.finditer(line)]
        named += [(path.parent, m["target"]) for m in LINK.finditer(line)]
        for base, name in named:
            name = name.rstrip(".")
            found = list(base.glob(name)) if "*" in name else [base / name] if (base / name).exists() else []
            if not found:
                where = path.relative_to(root) if path.is_relative_to(root) else path
                missing.append(f"{where}:{number}: {name}")
    return missing


def _without_comment(line: str) -> str:
    """The line without a trailing `# comment`, as a shell reads it: a `#` inside quotes stays."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip()
    return line.strip()


def skip_reason(text: str, slow: bool = False) -> str | None:
    """Why a command is not run here, by the rules in this module's docstring; None: it runs."""
    if INSTALL.match(text) and "&&" not in text:
        return "an install step: a fresh clone's CI runs it"
    if re.search(r"-m pytest\b", text):
        return "the test suite itself"
    if "scripts/check_readme.py" in text:
        return "this check itself"
    if GPU_OR_CLUSTER.search(text):
        return "needs a GPU or a cluster"
    if HUB.search(text + _recipes(text)) or _hub_dataset(text):
        return "needs the Hugging Face hub"
    if BENCHMARK.search(text) and not slow:
        return "a benchmark: minutes by design (--slow runs it)"
    if missing := _missing_imports(text):
        return f"needs {', '.join(missing)}, not installed here"
    for logger in re.findall(r"\blogger=\[?([\w,]+)", text):
        if "wandb" in logger:
            return "needs a Weights & Biases account"
        if "tensorboard" in logger and importlib.util.find_spec("tensorboard") is None:
            return "needs tensorboard, not installed here"
    return None


def _recipes(text: str) -> str:
    """The group choices an `experiment=NAME` recipe makes (and the recipes it builds on), as `group=choice`."""
    names, seen, found = re.findall(r"\bexperiment=(\w+)", text), set(), []
    while names:
        name = names.pop()
        file = ROOT / "configs" / "experiment" / f"{name}.yaml"
        if name in seen or not file.is_file():
            continue
        seen.add(name)
        for line in file.read_text(encoding="utf-8").splitlines():
            if m := re.match(r"\s*-\s*(?:override\s+)?/?(\w+):\s*(\w+)", line):
                found.append(f"{m[1]}={m[2]}")
            elif m := re.match(r"\s*init_from:\s*(hf:\S+)", line):  # a model on the hub
                found.append(f"model.init_from={m[1]}")
            elif m := re.match(r"\s*-\s*(\w+)\s*$", line):  # another recipe it builds on
                names.append(m[1])
    return " " + " ".join(found)


def _hub_dataset(text: str) -> bool:
    if not re.search(r"\bdata(?:\.mixture\.\d+)?\.?source=hf\b|\bdata=hf\b", text):
        return False
    if re.search(r"\bdata(?:\.mixture\.\d+)?\.data_files=", text):  # a builder (data.path=csv) on local files
        return False
    path = re.search(r"\bdata(?:\.mixture\.\d+)?\.path=(\S+)", text)
    return path is None or not (path[1].startswith(("/", ".", "~")) or os.sep in path[1] and Path(path[1]).exists())


def _missing_imports(text: str) -> list[str]:
    if not re.match(r"python3? -c ", text):
        return []
    code = text.split("-c", 1)[1]
    names = re.findall(r"\bfrom\s+([A-Za-z_]\w*)\s+import\b", code)
    names += re.findall(r"\bimport\s+([A-Za-z_]\w*)", re.sub(r"\bfrom\s+\w+\s+import\b[^;\n]*", "", code))
    return sorted({n for n in names if importlib.util.find_spec(n) is None})


def sample_text(lines: int = 400) -> str:
    """Plain English-like text with a small alphabet, a few dozen KB: enough for every tiny run."""
    words = ("the quick brown fox jumps over the lazy dog while a small bird sings in the old tree and "
             "rain falls on the quiet town where people read books by the fire").split()
    return "\n".join(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(14)) for i in range(lines)) + "\n"


def write_input(path: Path, column: str = "text") -> None:
    """A stand-in for a user's file: `*` in a glob becomes `sample`; .jsonl gets `{column: ...}` records and .csv
    a header and one row per line, the text under `column` (the command's data.text_column)."""
    path = Path(str(path).replace("*", "sample"))
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    text = sample_text()
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({column: line}) + "\n" for line in text.splitlines()), encoding="utf-8")
    elif path.suffix == ".csv":
        rows = "".join(f'{i},"{line}"\n' for i, line in enumerate(text.splitlines()))
        path.write_text(f"id,{column}\n{rows}", encoding="utf-8")
    else:
        path.write_text(text, encoding="utf-8")


class Checker:
    """Runs doc commands one after another in a scratch folder, remembering the first finished run."""

    def __init__(self, workdir: Path, timeout: float = 300):
        self.workdir, self.timeout = Path(workdir), timeout
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.run_dir: Path | None = None
        self.count = 0
        cache = self.workdir / "lmtrain-cache"
        # One thread: the tiny models gain nothing from more, and a busy machine's cores are not oversubscribed.
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                    "LMTRAIN_CACHE": os.environ.get("LMTRAIN_CACHE", str(cache)),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def substitute(self, text: str) -> str | None:
        """The command with placeholders filled in; None when it needs a run that no command has made yet."""
        if RUN_DIR_PLACEHOLDER.search(text):
            if self.run_dir is None:
                return None
            text = RUN_DIR_PLACEHOLDER.sub(str(self.run_dir), text)
            steps = sorted((self.run_dir / "checkpoints").glob("step_*"))
            if steps:
                text = STEP_PLACEHOLDER.sub(steps[-1].name, text)
        return text

    def missing_folders(self, part: str) -> list[str]:
        """Run folders a command reads (`lmtrain summarize multirun/a`) that no command of the check made."""
        words = shlex.split(part)
        if words[0] != "lmtrain" or len(words) < 2 or words[1] in ("train", "prepare"):
            return []
        return [w for w in words[2:] if "=" not in w and not w.startswith("-") and "/" in w
                and not (self.workdir / w).exists()]

    def argv(self, words: list[str], keep_own: bool = False) -> list[str]:
        """One command of a chain as it runs here: budgets added, input files written, run dirs chosen.
        keep_own (a command the docs show failing): budgets only for keys the command does not set itself."""
        words = [w for w in words if w not in ("...", "…")]  # an elision: "your other overrides"
        column = next((w.split("=", 1)[1] for w in words if re.match(r"data\.(?:mixture\.\d+\.)?text_column=", w)),
                      "text")
        for word in words:
            if m := INPUT_KEYS.match(word):
                for item in m["value"].strip("[]").split(","):
                    item = item.strip().strip("'\"")
                    if item and not os.path.isabs(item):
                        write_input(self.workdir / item, column)
        if words[0] in ("python", "python3"):
            return [sys.executable, *words[1:]]
        if words[0] != "lmtrain":
            return words
        command = words[1] if len(words) > 1 else ""
        if any(w in ("--help", "-h", "--cfg", "-c", "--info", "-sc") for w in words):
            return [sys.executable, "-m", "lmtrain", *words[1:]]
        budget = dict(BUDGETS.get(command, {}))
        if command in ("train", "prepare"):
            budget.update(self._mixture_budget(words))
        if command == "train" and any(w.startswith("model.init_from=") for w in words):  # it gives the shape
            budget = {k: v for k, v in budget.items() if not k.startswith("model.") or k == "model.block_size"}
        if keep_own:
            budget = {k: v for k, v in budget.items() if not any(w.split("=", 1)[0] == k for w in words)}
        own = [w for w in words[2:] if w.split("=", 1)[0].lstrip("+") not in budget]
        extra = [f"{k}={v}" for k, v in budget.items()]
        self.count += 1
        if command == "train":
            multirun = "-m" in own or "--multirun" in own
            if not any(w.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for w in own):
                extra.append(f"hydra.{'sweep' if multirun else 'run'}.dir=runs/{self.count:02d}")
        return [sys.executable, "-m", "lmtrain", command, *own, *extra]

    @staticmethod
    def _mixture_budget(words: list[str]) -> dict[str, str]:
        """A mixture's sources each get the document cap (data.max_documents does not reach them)."""
        choice = next((w.split("=", 1)[1] for w in words if w.startswith("data=")), None)
        sources = set()
        if choice is not None and (file := ROOT / "configs" / "data" / f"{choice}.yaml").is_file():
            sources.update(range(file.read_text().count("- name:")))
        sources.update(int(m[1]) for w in words if (m := re.match(r"data\.mixture\.(\d+)\.", w)))
        return {f"data.mixture.{i}.max_documents": TINY_DATA["data.max_documents"] for i in sorted(sources)}

    def run(self, doc: DocCommand, slow: bool = False) -> Outcome:
        reason = doc.skip or skip_reason(doc.text, slow)
        if reason is not None:
            return Outcome(doc, "skipped", reason)
        text = self.substitute(doc.text)
        if text is None:
            return Outcome(doc, "FAILED", "needs a run directory, but no training command before it succeeded")
        start, outcome = time.perf_counter(), Outcome(doc, "ok")
        for part in re.split(r"\s+&&\s+", text):
            if skip_reason(part, slow) is not None:
                continue  # the install steps of a chain: the rest of it still runs
            part = part.split(" | ", 1)[0]  # a pipe into the shell (`-sc install=bash | source`): its first half
            if missing := self.missing_folders(part):
                return Outcome(doc, "skipped", f"names folders of your own runs: {', '.join(missing)}")
            argv = self.argv(shlex.split(part), keep_own=doc.expect_error is not None)
            outcome.runs.append(argv)
            try:
                result = subprocess.run(argv, cwd=self.workdir, env=self.env, capture_output=True, text=True,
                                        timeout=self.timeout, input="def main(\nThe \n")
            except subprocess.TimeoutExpired:
                return Outcome(doc, "FAILED", f"no end after {self.timeout:.0f} s: {shlex.join(argv)}",
                               time.perf_counter() - start, outcome.runs)
            output = result.stdout + result.stderr
            if doc.expect_error is not None:
                if result.returncode in (0, 1) or not re.search(error_pattern(doc.expect_error), output):
                    outcome = Outcome(doc, "FAILED", f"expected a user error with {doc.expect_error!r}, got exit "
                                      f"{result.returncode}:\n{output[-3000:]}", runs=outcome.runs)
                    break
            elif result.returncode != 0:
                outcome = Outcome(doc, "FAILED", f"exit {result.returncode}: {shlex.join(argv)}\n{output[-3000:]}",
                                  runs=outcome.runs)
                break
            self._remember_run(argv)
        outcome.seconds = time.perf_counter() - start
        return outcome

    def _remember_run(self, argv: list[str]) -> None:
        """The first finished training run is what RUN_DIR and outputs/DATE/TIME stand for in later commands."""
        if self.run_dir is not None or argv[3:4] != ["train"] or "-m" in argv[4:] or "--multirun" in argv[4:]:
            return
        given = next((w.split("=", 1)[1] for w in argv if w.startswith("hydra.run.dir=")), None)
        if given is not None and (self.workdir / given / "checkpoints" / "final").is_dir():
            self.run_dir = (self.workdir / given).resolve()


def error_pattern(message: str) -> str:
    """The docs' error message as a pattern: its numbers may differ in a tiny run (a step, a loss)."""
    return r"\S+".join(re.escape(part) for part in re.split(r"\d[\d.,]*(?:e[+-]?\d+)?", message))


def all_commands(root: Path = ROOT) -> list[DocCommand]:
    return [c for path in doc_files(root) for c in extract_commands(path, root)]


def family(c: DocCommand) -> tuple[str, ...]:
    """What kind of command it is: its program, its verb, the key of its first override, whether it must fail.
    Commands that only read runs (summarize, plot) are one family each, whatever their arguments."""
    words = shlex.split(re.split(r"\s+&&\s+", c.text)[-1])
    verb = words[1] if words[0] == "lmtrain" and len(words) > 1 else ""
    if verb in ("summarize", "plot"):
        return words[0], verb
    first = next((w.split("=", 1)[0] for w in words[1 + bool(verb):] if "=" in w or w.startswith("-")), "")
    return words[0], verb, first, str(c.expect_error is not None)


def sample(commands: list[DocCommand]) -> list[DocCommand]:
    """The first command of each family that runs here (not skipped), README's first, and the first command that
    names each run or sweep folder (later commands may read it): what the test runs to stay within its time
    budget (the script runs them all)."""
    seen, folders, chosen = set(), set(), []
    for c in commands:
        folder = re.search(r"\bhydra\.(?:run|sweep)\.dir=(\S+)", c.text)
        new_folder = folder is not None and folder[1] not in folders
        if (family(c) not in seen and skip_reason(c.text) is None) or new_folder:
            chosen.append(c)
            seen.add(family(c))
            folders.update([folder[1]] if folder else [])
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="show each command and what would happen; run nothing")
    parser.add_argument("--only", default=None, help="only commands containing this text (and training runs before)")
    parser.add_argument("--slow", action="store_true", help="also run the benchmarks, as written")
    parser.add_argument("--sample", action="store_true", help="what the test runs: README's commands and one of "
                        "each other family (see `sample`)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder to keep (default: a temp dir)")
    args = parser.parse_args()
    commands = sample(all_commands()) if args.sample else all_commands()
    if args.list:
        for c in commands:
            reason = c.skip or skip_reason(c.text, args.slow)
            print(f"{c.where}: {c.text}\n    {'skip: ' + reason if reason else 'runs'}"
                  f"{'; expects ERROR: ' + c.expect_error if c.expect_error else ''}")
        return
    missing = [m for path in doc_files() for m in missing_paths(path)]
    for m in missing:
        print(f" FAILED  {m}: no such file (moved or removed? fix the doc)", flush=True)
    with tempfile.TemporaryDirectory(prefix="check-readme-") as tmp:
        checker = Checker(args.workdir or Path(tmp))
        failed = len(missing)
        for c in commands:
            wanted = args.only is None or args.only in c.text
            if not wanted and not (checker.run_dir is None and c.text.startswith("lmtrain train")
                                   and "&&" not in c.text):
                continue
            outcome = checker.run(c, args.slow)
            failed += outcome.status == "FAILED"
            extra = f" ({outcome.detail})" if outcome.detail and outcome.status == "skipped" else ""
            print(f"{outcome.status:>7}  {outcome.seconds:5.1f} s  {c.where}: {c.text}{extra}", flush=True)
            if outcome.status == "FAILED":
                print("         " + outcome.detail.replace("\n", "\n         "), flush=True)
    print(f"{failed} failed" if failed else "every command ran as written (or was skipped by a rule above)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
