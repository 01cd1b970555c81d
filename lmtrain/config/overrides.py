"""Command-line keys and values checked against the schema before Hydra composes anything.

For `model.foo=1` Hydra answers "use +model.foo=1", which it then accepts and lmtrain refuses: two errors,
and the hint leads away from the key the user meant. Checking each `a.b.c=value` override against the
command's dataclass schema first gives one line naming the unknown key and the nearest existing one.
A plain value that cannot have its field's type (`optimizer.lr=abc`) is one line too, where Hydra would
print a multi-line merge error and exit 1; it is found before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import types
import typing
from pathlib import Path

from omegaconf import DictConfig

from lmtrain.errors import ConfigError

_PACKAGED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # an installed lmtrain.configs


def non_optional(tp: object) -> object:
    """`X | None` -> X; `list[X]` -> list[X] kept; anything else as it is."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def schema_fields(schema: type) -> dict[str, object]:
    hints = typing.get_type_hints(schema)  # evaluates every annotation: once per schema
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def group_choices(config_dirs: list[str]) -> dict[str, list[str]]:
    """Config groups (experiment, model, ...) and each one's choices: the YAML files in its folder, packaged
    configs first, then a user's --config-dir. `group=choice` selects a file, not a schema field."""
    import importlib.util

    spec = importlib.util.find_spec("lmtrain.configs")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else [_PACKAGED_CONFIGS]
    roots += [Path(d) for d in config_dirs]
    choices: dict[str, list[str]] = {}
    for folder in (p for root in roots if root.is_dir() for p in sorted(root.iterdir()) if p.is_dir()):
        names = choices.setdefault(folder.name, [])
        names += [f.stem for f in sorted(folder.glob("*.yaml")) if f.stem not in names]
    return choices


def unknown_key(schema: type, key: str) -> str | None:
    """None when `key` (dotted, list indices as numbers) names a field of `schema`; else a one-line error
    naming the first unknown part and the nearest existing key."""
    parts, node, done = key.split("."), schema, []
    for part in parts:
        node = non_optional(node)
        if typing.get_origin(node) is list and part.isdigit():
            node, done = typing.get_args(node)[0], done + [part]
            continue
        if not dataclasses.is_dataclass(node):
            return None  # a value (dict, any): nothing to check below it
        fields = schema_fields(node)
        if part not in fields:
            prefix = ".".join(done + [""])
            near = difflib.get_close_matches(part, list(fields), n=1, cutoff=0.5)
            hint = f"did you mean {prefix}{near[0]}?" if near else f"its keys are {', '.join(sorted(fields))}"
            return f"{key}: unknown key {part!r} in {prefix.rstrip('.') or 'the config'}; {hint}"
        node, done = fields[part], done + [part]
    return None


def field_type(schema: type, key: str) -> object | None:
    """The declared type of the field `key` names (list indices as numbers); None when it names none."""
    node: object = schema
    for part in key.split("."):
        inner = non_optional(node)
        if typing.get_origin(inner) is list and part.isdigit():
            node = typing.get_args(inner)[0]
        elif dataclasses.is_dataclass(inner) and part in schema_fields(inner):
            node = schema_fields(inner)[part]
        else:
            return None
    return node


# Hydra's override grammar beyond a plain value: sweeps, lists, dicts, interpolations, quotes, functions.
_HYDRA_SYNTAX = re.compile(r"[,()\[\]{}$'\"]")


def value_problem(tp: object, value: str) -> str | None:
    """Why a plain command-line `value` cannot be a `tp`, in words; None when it can (or Hydra's own syntax
    is in it: Hydra and the schema check it after composing)."""
    from omegaconf import BooleanNode, FloatNode, IntegerNode
    from omegaconf.errors import ValidationError

    if _HYDRA_SYNTAX.search(value):
        return None
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
    inner = non_optional(tp)
    if value == "null":
        return None if optional or inner in (str, typing.Any) else "a value is required here, not null"
    if isinstance(inner, type) and issubclass(inner, enum.Enum):
        choices = [m.value for m in inner]
        return None if value in choices or value in inner.__members__ else f"must be one of {', '.join(choices)}"
    node, what = {float: (FloatNode, "a number"), int: (IntegerNode, "a whole number"),
                  bool: (BooleanNode, "true or false")}.get(inner, (None, ""))
    if node is None:
        return None
    try:
        node(value)
    except ValidationError:
        return f"{value!r} is not {what}"
    return None


def config_dirs(argv: list[str]) -> list[str]:
    """The folders of --config-dir / -cd options."""
    dirs = [os.path.expanduser(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a in ("--config-dir", "-cd")]
    return dirs + [os.path.expanduser(a.split("=", 1)[1]) for a in argv if a.startswith("--config-dir=")]


def check_config_dirs(argv: list[str]) -> None:
    """Every YAML file of a user's --config-dir parses: a syntax error is one line naming the file and line,
    not the long traceback Hydra shows when it meets the file."""
    import yaml

    for folder in config_dirs(argv):
        for file in sorted(Path(folder).rglob("*.yaml")):
            try:
                yaml.safe_load(file.read_text(encoding="utf-8"))
            except yaml.MarkedYAMLError as e:
                mark = e.problem_mark or e.context_mark
                where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                raise ConfigError(f"{file}{where}: {e.problem or e.context}; fix the YAML syntax there") from None
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise ConfigError(f"{file}: not readable YAML ({str(e).splitlines()[0]})") from None


def check_overrides(schema: type, argv: list[str]) -> None:
    """Raise ConfigError for the first `key=value` override whose key the schema does not have, or whose plain
    value cannot have the field's type.

    `+key=value` (Hydra's explicit addition), `~key` (deletion), hydra.* and config group choices pass
    through: Hydra and the schema check at conversion handle them.
    """
    dirs = config_dirs(argv)
    given = {arg.split("=", 1)[0].lstrip("+"): arg for arg in argv if "=" in arg and not arg.startswith(("-", "~"))}
    for a, b in getattr(schema, "EXCLUSIVE_KEYS", ()):
        if a in given and b in given:
            raise ConfigError(f"{given[a]} and {given[b]} say the same thing two ways: give one of them")
    groups = None
    for arg in argv:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        key = arg.split("=", 1)[0]
        if key.split(".")[0] == "hydra" or "/" in key:
            continue
        if "." not in key:  # a top-level key may be a group choice (experiment=...) rather than a field
            groups = group_choices(dirs) if groups is None else groups
            if key in groups:
                continue
        problem = unknown_key(schema, key)
        if problem is not None:
            raise ConfigError(problem)
        value = arg.split("=", 1)[1]
        problem = value_problem(field_type(schema, key), value)
        if problem is not None:
            raise ConfigError(f"{arg}: {problem}")


def explicit_model_keys(cfg: DictConfig) -> set[str]:
    """The model.* fields the user of this Hydra app set himself: typed on the command line (`model.d_model=256`),
    set by the `experiment=` recipe chosen (or one it builds on), or given a value other than the chosen model
    preset's (`model=gpt_tiny` by default) in any other way (a primary config of his own, say). Hydra records the
    command line's overrides, the choices it made and where it found configs; the preset's own values come from
    composing it alone."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    keys = [o.lstrip("+~").split("=", 1)[0] for o in hydra_cfg.overrides.task]
    explicit = {k.split(".")[1] for k in keys if k.startswith("model.")}
    recipe = hydra_cfg.runtime.choices.get("experiment")
    if recipe is not None:
        explicit |= _recipe_keys(recipe, "model", [(s.schema, s.path) for s in hydra_cfg.runtime.config_sources])
    choice = hydra_cfg.runtime.choices.get("model")
    if choice is None:  # a primary config of the user's own without a model group: its values are all his
        return explicit | set(cfg.model)
    preset = compose(config_name=hydra_cfg.job.config_name, overrides=[f"model={choice}"]).model
    return explicit | {k for k in cfg.model if k not in preset or cfg.model[k] != preset[k]}


def _recipe_keys(name: str, section: str, sources: list[tuple[str, str]]) -> set[str]:
    """The keys of `section` an experiment recipe sets, with those of the recipes it lists in its defaults;
    `sources`: Hydra's config sources as (schema, path), a package (pkg) or a folder (file)."""
    import importlib.resources

    import yaml

    roots = [importlib.resources.files(path) if schema == "pkg" else Path(path)
             for schema, path in sources if schema in ("pkg", "file") and path]
    keys, todo, seen = set(), [name], set()
    while todo:
        name = todo.pop()
        file = next((f for root in roots if (f := root / "experiment" / f"{name}.yaml").is_file()), None)
        if name in seen or file is None:
            continue
        seen.add(name)
        recipe = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        keys |= set(recipe.get(section) or {})
        todo += [d for d in recipe.get("defaults") or [] if isinstance(d, str) and d != "_self_"]
    return keys
