"""Getting files: released weights and saved models, from the Hugging Face Hub, a URL or a folder.

This module only moves files; it knows nothing of models.

- :func:`fetch_weights` downloads (or finds in the cache) the file of a released source and reads its
  state dict: Hub files through ``huggingface_hub`` (its cache, offline mode, token and endpoint
  apply), the release's GitHub files through torch.hub's cache.
- :func:`resolve_file` finds one file of a saved model in a local folder or a Hub repo.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

import torch

from .weights import CheckpointError, read_checkpoint

__all__ = ["PretrainedError", "fetch_weights", "resolve_file", "download_hub_file", "offline_mode"]


class PretrainedError(CheckpointError):
    """Released weights that cannot be fetched or read; the message names the model, the source and
    what to do."""


def download_hub_file(repo_id: str, filename: str, what: str, **kwargs) -> str:
    """The local path of ``filename`` of a Hub repo, downloaded through huggingface_hub's cache.

    Args:
        repo_id: ``"org/name"``.
        filename: File in the repo.
        what: What the file is for, used in messages (``"poolformer_s12.sail_in1k"``).
        **kwargs: Passed to ``huggingface_hub.hf_hub_download`` (revision, token, cache_dir...).

    Raises:
        PretrainedError: naming the file and what to do (offline, no such repo, file or revision).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"hf-hub:{repo_id}/{filename}"
    offline = offline_mode()
    elsewhere = ("or download the file elsewhere and load it as a checkpoint (Python: checkpoint=PATH; "
                 "command line: --checkpoint PATH)")
    try:
        return hf_hub_download(repo_id, filename, **kwargs)
    except HFValidationError:
        raise PretrainedError(f"{what}: {repo_id!r} is neither an existing folder nor a Hub repo id "
                              f"(expected 'org/name')") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        retry = "unset HF_HUB_OFFLINE and retry" if offline else "connect and retry"
        raise PretrainedError(f"{what}: {where} is not in the local Hugging Face cache and {why}; {retry}, "
                              f"{elsewhere}") from None
    except RepositoryNotFoundError:
        raise PretrainedError(f"{what}: the Hub repo {repo_id!r} does not exist or is private; check the name "
                              f"or log in with `hf auth login`") from None
    except RevisionNotFoundError:
        raise PretrainedError(f"{what}: the revision asked for does not exist in {repo_id!r}") from None
    except EntryNotFoundError:
        raise PretrainedError(f"{what}: the Hub repo {repo_id!r} has no file {filename!r}") from None
    except (HfHubHTTPError, OSError) as e:
        raise PretrainedError(f"{what}: downloading {where} failed: {type(e).__name__}: {e}") from None


def offline_mode() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for no network access."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def _url_download(url: str, what: str) -> str:
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / os.path.basename(url)
    if path.is_file():
        return str(path)
    if offline_mode():
        raise PretrainedError(f"{what}: {url} is not in torch.hub's cache ({path}) and HF_HUB_OFFLINE is set; "
                              f"place the file there, or load it as a checkpoint (Python: checkpoint=PATH; "
                              f"command line: --checkpoint PATH)")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        # download_url_to_file writes a temporary file and renames it: no half-written cache entry.
        torch.hub.download_url_to_file(url, str(path), progress=True)
    except Exception as e:
        raise PretrainedError(f"{what}: downloading {url} failed: {type(e).__name__}: {e}. Check the network, "
                              f"or download it by hand to {path}") from None
    return str(path)


def fetch_weights(model_name: str, source) -> Dict[str, torch.Tensor]:
    """The state dict of a released source, downloaded or read from the cache.

    Args:
        model_name: The model the weights are for (used in messages).
        source: A :class:`~metaformer.pretrained.PretrainedCfg`.

    Raises:
        PretrainedError: naming the model, the source and what to do.
    """
    what = f"{model_name}.{source.tag}"
    if source.hf_hub_id:
        path = download_hub_file(source.hf_hub_id, source.hf_filename, what)
    else:
        path = _url_download(source.url, what)
    try:
        return read_checkpoint(path)
    except CheckpointError as e:
        raise PretrainedError(f"{what} ({source.location}): {e} Delete the cached file {path} to fetch it "
                              f"again.") from None


def resolve_file(model_id: str, filename: str, **hub_kwargs) -> str:
    """The local path of ``filename`` of a saved model: in the folder ``model_id``, or from the Hub repo.

    Raises:
        PretrainedError: if the folder lacks the file, or the Hub file cannot be had.
    """
    if os.path.isdir(model_id):
        path = os.path.join(model_id, filename)
        if not os.path.isfile(path):
            raise PretrainedError(f"{model_id}: no {filename} in this folder; was it written by save_pretrained?")
        return path
    if os.path.exists(model_id):
        raise PretrainedError(f"{model_id} is a file, not a folder written by save_pretrained; load a weights file "
                              f"with metaformer.create(NAME, checkpoint=PATH)")
    return download_hub_file(model_id, filename, f"hf-hub:{model_id}", **hub_kwargs)
