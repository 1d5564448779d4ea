"""Place files in a real huggingface_hub / torch.hub cache exactly where a download would put them."""

import hashlib
import os
import shutil
from pathlib import Path


def hf_cache_dir() -> Path:
    """huggingface_hub's cache folder for this session (HF_HOME/hub)."""
    return Path(os.environ["HF_HOME"]) / "hub"


def place_hub_file(repo_id: str, filename: str, source: Path) -> Path:
    """Stores ``source`` as ``filename`` of the model repo ``repo_id`` at its ``main`` revision, the way
    hf_hub_download does: the content in ``blobs/<sha256>``, a relative symlink in
    ``snapshots/<commit>/<filename>``, and ``refs/main`` naming the commit."""
    repo = hf_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    refs = repo / "refs" / "main"
    if refs.exists():
        commit = refs.read_text().strip()
    else:
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        refs.parent.mkdir(parents=True, exist_ok=True)
        refs.write_text(commit)
    data = Path(source).read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(blob, link.parent))
    return link


def remove_hub_repo(repo_id: str) -> None:
    """Forgets every cached file of ``repo_id``."""
    shutil.rmtree(hf_cache_dir() / f"models--{repo_id.replace('/', '--')}", ignore_errors=True)


def place_torch_hub_file(url: str, source: Path) -> Path:
    """Stores ``source`` where torch.hub's download cache keeps ``url`` (TORCH_HOME/hub/checkpoints)."""
    dest = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / os.path.basename(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    return dest
