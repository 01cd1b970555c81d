"""`hf:<repo id>`: a model on the Hugging Face hub, downloaded once into the hub's own cache.

Only what lmtrain reads comes down: config.json, the safetensors weights (and their index), the tokenizer
files. The hub's cache (HF_HOME, HF_HUB_CACHE) keeps them; a second use finds them there, also offline
(HF_HUB_OFFLINE=1). Offline with nothing cached, or with no network, the answer is one line that says
how to bring the folder over from a machine that has a network. `hf:<repo id>@<revision>` pins a branch,
tag or commit.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lmtrain.config.model import HUB_PREFIX
from lmtrain.errors import CheckpointError

log = logging.getLogger(__name__)

CONFIG_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json"]
WEIGHT_FILES = ["*.safetensors", "model.safetensors.index.json"]


def is_hub_id(ref: str | None) -> bool:
    return ref is not None and str(ref).startswith(HUB_PREFIX)


def hub_repo(ref: str) -> str:
    """The repo id (and @revision) of `hf:<repo id>[@revision]`."""
    return ref[len(HUB_PREFIX):]


def hub_folder(ref: str, key: str, weights: bool = True) -> Path:
    """The local folder of `hf:<repo id>[@revision]`, downloading what is missing (without `weights`: the
    config and tokenizer alone, which name the model's shape). `key` (e.g. model.init_from) starts errors."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, _, revision = hub_repo(ref).partition("@")
    what = "config, safetensors weights and tokenizer" if weights else "config and tokenizer"
    if not constants.HF_HUB_OFFLINE:
        log.info("Fetching %s from the Hugging Face hub (%s) into %s", repo, what, constants.HF_HUB_CACHE)
    try:
        folder = snapshot_download(repo, revision=revision or None,
                                   allow_patterns=CONFIG_FILES + (WEIGHT_FILES if weights else []))
    except (GatedRepoError, RepositoryNotFoundError) as e:  # a gated repo is a RepositoryNotFoundError too
        gated = isinstance(e, GatedRepoError)
        raise CheckpointError(f"{key}={ref}: " + (
            f"{repo} is gated: accept its terms on huggingface.co/{repo}, then log in (hf auth login)" if gated
            else f"no model {repo} on the Hugging Face hub (or it is private: log in with hf auth login)")) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{key}={ref}: {repo} has no revision {revision!r}") from None
    except HFValidationError as e:
        raise CheckpointError(f"{key}={ref}: not a hub repo id ({str(e).splitlines()[0]})") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError):  # offline, no network, the hub failing
        why = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        name = repo.split("/")[-1]
        raise CheckpointError(
            f"{key}={ref}: {repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; download "
            f"it on a machine with a network (hf download {repo} --include '*.json' '*.safetensors' --local-dir "
            f"{name}), copy that folder here and give it: {key}=/path/to/{name}") from None
    return Path(folder)
