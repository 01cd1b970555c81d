"""Turning Hydra's composed config into checked dataclasses: the one conversion every command runs first."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from lmtrain.errors import ConfigError

Schema = TypeVar("Schema")

# The cross-field checks to_config runs for each schema; each schema module registers its own.
CHECKS: dict[type, Callable[[Any], None]] = {}


def to_config(cfg: DictConfig | dict, schema: type[Schema]) -> Schema:
    """Hydra's composed config (or plain values) as the schema's dataclass, rejecting keys it does not know,
    then checked by the schema's cross-field checks (CHECKS), if it has any."""
    try:
        # Re-merging the plain values into a fresh schema catches `+optimizer.lrr=1`, which Hydra
        # accepts and OmegaConf.to_object would silently drop.
        values = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=False)
        out = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} is not set: give {e.full_key}=...") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{key}: {msg}" if key else msg) from None
    if schema in CHECKS:
        CHECKS[schema](out)
    return out  # type: ignore[return-value]


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def as_plain_dict(obj: Any) -> Any:
    """A dataclass config as JSON-ready dicts and lists (enums become their values)."""
    return OmegaConf.to_container(OmegaConf.structured(obj), resolve=True, enum_to_str=True)


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested config dict as {"trainer.batch_size": 32, ...}: the keys as the command line names them."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out



def check_device(key: str, value: str) -> None:
    check(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value) is not None,
          f"{key}={value!r} must be auto, cpu, cuda, cuda:N (N a GPU index) or mps")
