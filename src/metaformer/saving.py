"""Whole saved models: ``save_pretrained``, ``from_pretrained`` and ``push_to_hub`` for :class:`~metaformer.MetaFormer`.

A saved model is a folder (or a Hub repo) holding ``config.json`` (the whole architecture, built-in
components by name, and the preprocessing), ``model.safetensors`` and a model card ``README.md``.
The config records a digest of its weights, which the weights file carries in its header, so a
config is never paired with another save's weights without a word.

A save is all-or-nothing: both files are written completely beside their targets first, then the
config and the weights are renamed into place, in that order, under a lock on the folder (two saves
into one folder take turns). Until the config's rename the previous save is intact; after it, the new
weights are complete in their temporary file, and a reader (or the next save) that finds the config's
id on that file uses it. A kill at any moment therefore leaves a loadable folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from huggingface_hub import ModelCard, ModelHubMixin

from . import files
from .components import UnserializableComponentError
from .hub import PretrainedError, resolve_file
from .pretrained import normalize_pretrained_cfg
from .weights import CheckpointError, load_state_dict_into, read_checkpoint

__all__ = ["SavedModelMixin", "CONFIG_NAME", "WEIGHTS_NAME", "FORMAT", "model_card", "is_saved_model_folder",
           "read_saved_config", "write_saved_model"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
FORMAT = "metaformer/1"
PAPERS = {
    "poolformer": ("MetaFormer Is Actually What You Need for Vision", "Yu et al., CVPR 2022",
                   "https://arxiv.org/abs/2111.11418"),
    "baselines": ("MetaFormer Baselines for Vision", "Yu et al., IEEE TPAMI 2024", "https://arxiv.org/abs/2210.13452"),
}


class SavedModelMixin(ModelHubMixin):
    """huggingface_hub's ``ModelHubMixin`` with all-or-nothing saves whose config and weights are bound.

    The class using it provides ``describe()`` (JSON-able constructor arguments), ``from_config(arch)``
    and ``pretrained_cfg``.
    """

    def save_pretrained(self, save_directory, *, config: Optional[dict] = None, repo_id: Optional[str] = None,
                        push_to_hub: bool = False, model_card_kwargs: Optional[dict] = None,
                        **push_to_hub_kwargs) -> Optional[str]:
        """Saves ``config.json``, ``model.safetensors`` and a model card to a folder, all-or-nothing.

        The previous save in the folder stays loadable until the new one is complete; an existing
        ``README.md`` is kept.

        Args:
            save_directory: The folder (created if needed).
            config: Ignored (the architecture is always saved); accepted for huggingface_hub's API.
            repo_id: With ``push_to_hub``, the Hub repo (default: the folder name).
            push_to_hub: Also upload the folder to the Hub.
            model_card_kwargs: Ignored; accepted for huggingface_hub's API.
            **push_to_hub_kwargs: Passed to ``push_to_hub``.

        Returns:
            The commit URL with ``push_to_hub``, else None.

        Raises:
            TypeError: for an ``optimize_for_inference`` copy or a pruned model (save the original model
                instead).
            metaformer.files.WriteError: if the disk is full or the folder not writable.
        """
        if getattr(self, "_metaformer_inference_only", False):
            raise TypeError("this is an optimize_for_inference copy, whose folded weights no config can rebuild; "
                            "save the original model and call optimize_for_inference after loading it")
        if getattr(self, "_metaformer_pruned", False):
            raise TypeError("this model was pruned by prune_intermediate_layers, and its config describes the "
                            "whole model; save the unpruned model and prune it after loading")
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_saved_model(self, directory)
        if push_to_hub:
            return self.push_to_hub(repo_id=repo_id or directory.name, **push_to_hub_kwargs)
        return None

    def _save_pretrained(self, save_directory) -> None:
        write_saved_model(self, Path(save_directory))

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """The model card written beside a save (papers, architecture, preprocessing, usage)."""
        return ModelCard(model_card(self))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, force_download: bool = False, token=None,
                        cache_dir=None, local_files_only: bool = False, revision=None,
                        map_location: str = "cpu"):
        """Builds a model saved by ``save_pretrained`` from a local folder or a Hub repo id.

        Args:
            pretrained_model_name_or_path: A folder, or a Hub repo id ``"org/name"``.
            force_download: Download again even if cached.
            token: Hub token (default: the logged-in one).
            cache_dir: Hub cache folder (default: huggingface_hub's).
            local_files_only: Never download.
            revision: Branch, tag or commit of the Hub repo.
            map_location: Device of the returned model.

        Raises:
            metaformer.PretrainedError: for a missing, corrupt or foreign folder or repo, or a config
                whose weights belong to another save.
        """
        model_id = os.fspath(pretrained_model_name_or_path)
        hub_kwargs = {k: v for k, v in dict(force_download=force_download or None, token=token,
                                            cache_dir=cache_dir, local_files_only=local_files_only or None,
                                            revision=revision).items() if v is not None}
        config = read_saved_config(model_id, **hub_kwargs)
        try:
            model = cls.from_config(config["architecture"])
        except (TypeError, ValueError, AttributeError, KeyError) as e:
            raise PretrainedError(f"{model_id}: {CONFIG_NAME} describes an architecture this version cannot "
                                  f"build: {type(e).__name__}: {e}") from None
        state_dict = _bound_state_dict(model_id, config, **hub_kwargs)
        load_state_dict_into(model, state_dict, "metaformer", source=f"{model_id}/{WEIGHTS_NAME}")
        model.pretrained_cfg = normalize_pretrained_cfg(config.get("pretrained_cfg"))
        return model.to(map_location)


def is_saved_model_folder(path: str) -> bool:
    """Whether ``path`` is a folder written by ``save_pretrained``."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_NAME))


# ------------------------------------------------------------------------------------ writing
def write_saved_model(model, directory: Path) -> None:
    """Writes ``model``'s config, weights and (if absent) model card to ``directory`` (see the module doc)."""
    config: Dict[str, Any] = {"format": FORMAT, "pretrained_cfg": _jsonable(model.pretrained_cfg)}
    try:
        config["architecture"] = model.describe()
    except UnserializableComponentError as e:
        config["architecture"] = None
        config["unserializable"] = str(e)
        warnings.warn(f"save_pretrained: {e}. The weights are saved, but from_pretrained cannot rebuild this "
                      f"model: build it in code and load {WEIGHTS_NAME} with metaformer.load_checkpoint.",
                      stacklevel=4)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config["weights_digest"] = weights_digest(tensors)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    with files.folder_lock(directory):
        _finish_interrupted_save(directory)
        weights_tmp = files.prepare_write(directory / WEIGHTS_NAME, lambda p: _save_tensors(tensors, p))
        try:
            config_tmp = files.prepare_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(text))
        except BaseException:
            files.discard_write(weights_tmp)
            raise
        try:
            files.commit_write(config_tmp, directory / CONFIG_NAME)
        finally:  # once the config names the new weights, put them in place even on Ctrl-C
            if os.path.exists(config_tmp):
                files.discard_write(config_tmp)
                files.discard_write(weights_tmp)
            else:
                files.commit_write(weights_tmp, directory / WEIGHTS_NAME)
        if not (directory / CARD_NAME).exists():
            files.write_text(directory / CARD_NAME, model_card(model))


def weights_digest(tensors: Dict[str, torch.Tensor]) -> str:
    """A digest of a state dict (names, dtypes, shapes and bytes): the id that binds a config to its weights."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _save_tensors(tensors: Dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})


def _finish_interrupted_save(directory: Path) -> None:
    """Completes a save killed between its two renames, then removes dead writers' temporaries."""
    pending = [tmp for tmp, pid in files.pending_temporaries(directory, WEIGHTS_NAME) if not files.pid_alive(pid)]
    wanted = _recorded_digest(directory / CONFIG_NAME) if pending else None
    if wanted and _file_digest(directory / WEIGHTS_NAME) != wanted:
        for tmp in pending:
            if _file_digest(tmp) == wanted:
                files.commit_write(tmp, directory / WEIGHTS_NAME)
                break
    files.remove_stale_temporaries(directory, [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])


def _recorded_digest(config_path: Path) -> Optional[str]:
    try:
        return json.loads(config_path.read_text()).get("weights_digest")
    except (OSError, ValueError, AttributeError):
        return None


def _file_digest(path) -> Optional[str]:
    try:
        return weights_digest(read_checkpoint(os.fspath(path)))
    except (OSError, CheckpointError):
        return None


def _jsonable(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return json.loads(json.dumps(cfg, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


# ------------------------------------------------------------------------------------ reading
def read_saved_config(model_id: str, **hub_kwargs) -> Dict[str, Any]:
    """The checked ``config.json`` of a saved model (folder or Hub repo).

    Raises:
        PretrainedError: for a missing, unreadable or foreign config, or one that records no architecture.
    """
    path = resolve_file(model_id, CONFIG_NAME, **hub_kwargs)
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PretrainedError(f"{model_id}: {CONFIG_NAME} is unreadable: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise PretrainedError(f"{model_id}: {CONFIG_NAME} was not written by metaformer's save_pretrained "
                              f"(expected format {FORMAT!r})")
    if config.get("architecture") is None:
        raise PretrainedError(f"{model_id}: the saved model cannot be rebuilt from its config: "
                              f"{config.get('unserializable', 'no architecture recorded')}. Build the model in code "
                              f"and load {WEIGHTS_NAME} with metaformer.load_checkpoint(model, path).")
    for field, what in (("architecture", "MetaFormer arguments"), ("pretrained_cfg", "preprocessing settings")):
        if not isinstance(config.get(field, {}), dict):
            raise PretrainedError(f"{model_id}: {CONFIG_NAME} field {field!r} must be an object of {what}, got "
                                  f"{type(config[field]).__name__}")
    return config


def _bound_state_dict(model_id: str, config: Dict[str, Any], **hub_kwargs) -> Dict[str, torch.Tensor]:
    """The weights that belong to ``config`` (their digest is the config's), or a clear error."""
    path = resolve_file(model_id, WEIGHTS_NAME, **hub_kwargs)
    try:
        state_dict = read_checkpoint(path)
    except CheckpointError as e:
        raise PretrainedError(f"{model_id}: {e}") from None
    wanted = config.get("weights_digest")
    if wanted is None or weights_digest(state_dict) == wanted:  # None: saved by metaformer 0.1
        return state_dict
    if os.path.isdir(model_id):  # a save killed between its two renames: its weights are complete here
        for tmp, _ in files.pending_temporaries(model_id, WEIGHTS_NAME):
            try:
                candidate = read_checkpoint(tmp)
            except (OSError, CheckpointError):
                continue
            if weights_digest(candidate) == wanted:
                return candidate
    raise PretrainedError(f"{model_id}: {WEIGHTS_NAME} is not the file {CONFIG_NAME} was saved with (its digest "
                          f"differs: two saves into one folder at once, files copied from elsewhere, or a damaged "
                          f"file); save the model again")


# ------------------------------------------------------------------------------------ model card
def _project_urls() -> Dict[str, str]:
    from importlib import metadata

    try:
        entries = metadata.metadata("metaformer").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        return {}
    return {label.strip(): url.strip() for label, _, url in (e.partition(",") for e in entries)}


def model_card(model) -> str:
    """The text of a model card for ``model``: papers, architecture, preprocessing and how to load it."""
    from . import __version__
    from .zoo import VARIANTS

    cfg = model.pretrained_cfg or {}
    arch = cfg.get("architecture")
    variant = VARIANTS.get(arch)
    papers = [PAPERS[variant.paper]] if variant is not None else list(PAPERS.values())
    params = sum(p.numel() for p in model.parameters())
    lines = ["---", "library_name: metaformer", "license: apache-2.0", "pipeline_tag: image-classification",
             "tags:", "- image-classification", "- metaformer"] + ([f"- {arch}"] if arch else []) + ["---", "",
             f"# {arch or 'MetaFormer'}", "",
             f"A MetaFormer image classifier saved with metaformer {__version__}: {params:,} parameters, "
             f"{getattr(model, 'num_classes', '?')} classes"
             + (f", built as `{arch}`" if arch else "") + ".", "", "## Papers", ""]
    lines += [f"- {title} ({who}): {url}" for title, who, url in papers]
    if cfg.get("input_size"):
        lines += ["", "## Preprocessing", "",
                  f"Input {cfg['input_size'][-2]}x{cfg['input_size'][-1]}, crop_pct {cfg.get('crop_pct')}, "
                  f"{cfg.get('interpolation')} interpolation, mean {tuple(cfg.get('mean', ()))}, "
                  f"std {tuple(cfg.get('std', ()))}."]
    lines += ["", "## Use", "", "```python", "import metaformer", "",
              'model = metaformer.create("hf-hub:ORG/REPO")  # or create("path/to/this/folder")', "```"]
    urls = _project_urls()
    if urls:
        lines += ["", "## Links", ""] + [f"- {label}: {url}" for label, url in urls.items()]
    return "\n".join(lines) + "\n"

