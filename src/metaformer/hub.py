"""Released weights and the Hugging Face Hub.

- :func:`fetch_weights` downloads (or finds in the cache) the file of a :class:`~metaformer.zoo.PretrainedSource`:
  Hub files through ``huggingface_hub`` (its cache, offline mode, token and endpoint apply), the
  release's GitHub files through torch.hub's cache.
- :func:`save_model` / :func:`load_model` write and read a folder (or Hub repo) holding
  ``config.json`` (the whole architecture, built-in components by name) and ``model.safetensors``;
  :class:`~metaformer.MetaFormer` exposes them as ``save_pretrained``, ``from_pretrained`` and
  ``push_to_hub`` through huggingface_hub's ``ModelHubMixin``.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict

import torch

from .components import UnserializableComponentError, _describe_value, resolve
from .weights import CheckpointError, read_checkpoint

__all__ = ["PretrainedError", "fetch_weights", "save_model", "load_model", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "metaformer/1"
_COMPONENT_KEYS = ("token_mixers", "norm_layers", "act_layer", "stem_norm", "downsample_norm", "head_norm",
                   "feature_norm")


class PretrainedError(CheckpointError):
    """Released weights that cannot be fetched or read; the message names the model, the source and
    what to do."""


def _hub_download(repo_id: str, filename: str, what: str, **kwargs) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"hf-hub:{repo_id}/{filename}"
    try:
        return hf_hub_download(repo_id, filename, **kwargs)
    except LocalEntryNotFoundError as e:
        raise PretrainedError(
            f"{what}: {where} is not in the local Hugging Face cache and cannot be downloaded "
            f"(offline, or the Hub is unreachable). Connect and retry, unset HF_HUB_OFFLINE, or download "
            f"the file elsewhere and pass checkpoint=PATH. ({type(e).__name__})") from None
    except OfflineModeIsEnabled:
        raise PretrainedError(f"{what}: {where} is not cached and HF_HUB_OFFLINE is set; unset it or pass "
                              f"checkpoint=PATH") from None
    except RepositoryNotFoundError:
        raise PretrainedError(f"{what}: the Hub repo {repo_id!r} does not exist or is private; check the name "
                              f"or log in with `hf auth login`") from None
    except RevisionNotFoundError:
        raise PretrainedError(f"{what}: the revision asked for does not exist in {repo_id!r}") from None
    except EntryNotFoundError:
        raise PretrainedError(f"{what}: the Hub repo {repo_id!r} has no file {filename!r}") from None
    except (HfHubHTTPError, OSError) as e:
        raise PretrainedError(f"{what}: downloading {where} failed: {type(e).__name__}: {e}") from None


def _url_download(url: str, what: str) -> str:
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / os.path.basename(url)
    if path.is_file():
        return str(path)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise PretrainedError(f"{what}: {url} is not in torch.hub's cache ({path}) and HF_HUB_OFFLINE is set; "
                              f"place the file there or pass checkpoint=PATH")
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
        source: A :class:`~metaformer.zoo.PretrainedSource`.

    Raises:
        PretrainedError: naming the model, the source and what to do.
    """
    what = f"{model_name}.{source.tag}"
    if source.hf_hub_id:
        path = _hub_download(source.hf_hub_id, source.hf_filename, what)
    else:
        path = _url_download(source.url, what)
    try:
        return read_checkpoint(path)
    except CheckpointError as e:
        raise PretrainedError(f"{what} ({source.location}): {e} Delete the cached file {path} to fetch it "
                              f"again.") from None


# --------------------------------------------------------------------------------- save / load
def describe_architecture(model) -> Dict[str, Any]:
    """The model's constructor arguments as JSON-able data.

    Raises:
        UnserializableComponentError: if a component is not built in.
    """
    return {k: _describe_value(v) for k, v in model.config.items()}


def build_from_architecture(arch: Dict[str, Any]):
    """Builds a :class:`~metaformer.MetaFormer` from :func:`describe_architecture` data."""
    from .model import MetaFormer

    kwargs = {}
    for key, value in arch.items():
        if key in _COMPONENT_KEYS:
            value = [resolve(v, key) for v in value] if isinstance(value, list) else resolve(value, key)
        kwargs[key] = value
    return MetaFormer(**kwargs)


def save_model(model, directory) -> None:
    """Writes ``config.json`` and ``model.safetensors`` to ``directory``, each atomically.

    A model holding a component that is not built in (a user-written mixer) still gets its weights
    saved; its config records why it cannot be rebuilt, and a warning says so.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config: Dict[str, Any] = {"format": FORMAT, "pretrained_cfg": _jsonable(model.pretrained_cfg)}
    try:
        config["architecture"] = describe_architecture(model)
    except UnserializableComponentError as e:
        config["architecture"] = None
        config["unserializable"] = str(e)
        warnings.warn(f"save_pretrained: {e}. The weights are saved, but from_pretrained cannot rebuild this "
                      f"model: build it in code and load {WEIGHTS_NAME} with metaformer.load_checkpoint.",
                      stacklevel=3)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(directory / CONFIG_NAME,
                  lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True)))


def _jsonable(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return json.loads(json.dumps(cfg, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _resolve_file(model_id: str, filename: str, **hub_kwargs) -> str:
    if os.path.isdir(model_id):
        path = os.path.join(model_id, filename)
        if not os.path.isfile(path):
            raise PretrainedError(f"{model_id}: no {filename} in this folder; was it written by save_pretrained?")
        return path
    return _hub_download(model_id, filename, f"hf-hub:{model_id}", **hub_kwargs)


def load_model(model_id: str, *, map_location: str = "cpu", strict: bool = True, **hub_kwargs):
    """Builds and loads a model saved by :func:`save_model` from a folder or a Hub repo id.

    Raises:
        PretrainedError: for a missing or unusable config or weights file.
    """
    from .weights import load_state_dict_into

    hub_kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    config_path = _resolve_file(model_id, CONFIG_NAME, **hub_kwargs)
    try:
        config = json.loads(Path(config_path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PretrainedError(f"{model_id}: {CONFIG_NAME} is unreadable: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise PretrainedError(f"{model_id}: {CONFIG_NAME} was not written by metaformer's save_pretrained "
                              f"(expected format {FORMAT!r})")
    if config.get("architecture") is None:
        raise PretrainedError(f"{model_id}: the saved model cannot be rebuilt from its config: "
                              f"{config.get('unserializable', 'no architecture recorded')}. Build the model in code "
                              f"and load {WEIGHTS_NAME} with metaformer.load_checkpoint(model, path).")
    try:
        model = build_from_architecture(config["architecture"])
    except (TypeError, ValueError) as e:
        raise PretrainedError(f"{model_id}: {CONFIG_NAME} describes an architecture this version cannot "
                              f"build: {e}") from None
    weights = _resolve_file(model_id, WEIGHTS_NAME, **hub_kwargs)
    try:
        state_dict = read_checkpoint(weights)
    except CheckpointError as e:
        raise PretrainedError(f"{model_id}: {e}") from None
    load_state_dict_into(model, state_dict, "metaformer", source=f"{model_id}/{WEIGHTS_NAME}")
    cfg = config.get("pretrained_cfg") or {}
    if "input_size" in cfg:
        cfg["input_size"] = tuple(cfg["input_size"])
    for key in ("mean", "std"):
        if key in cfg:
            cfg[key] = tuple(cfg[key])
    model.pretrained_cfg = cfg
    return model.to(map_location)
