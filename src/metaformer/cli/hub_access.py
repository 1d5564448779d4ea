"""Released weights from the command line: fail fast when their site cannot be reached, and word the
download errors for the command line (``--checkpoint PATH``, not the Python ``checkpoint=PATH``).

huggingface_hub retries an unreachable Hub for about half a minute before it falls back to its cache.
Before ``--pretrained`` loads anything, :func:`go_offline_if_unreachable` tries one TCP connection to the
weights' host (3 s at most); when it fails, this process continues in offline mode (``HF_HUB_OFFLINE``),
so cached weights load at once and missing ones fail at once, with a message that says why.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Optional, Tuple
from urllib.parse import urlparse

PROBE_TIMEOUT = 3.0
_TRUE = ("1", "ON", "YES", "TRUE")  # as huggingface_hub reads HF_HUB_OFFLINE

_offline_reason: Optional[str] = None  # set when this process went offline because the host was unreachable


def _offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def _host_of(name: str) -> Tuple[str, int, str]:
    """``(host, port, location)`` of the released weights of ``name`` (``model`` or ``model.tag``)."""
    from .. import get_variant

    base, _, tag = name.partition(".")
    source = get_variant(base).source(tag or None)
    if getattr(source, "hf_hub_id", None):
        from huggingface_hub import constants

        url = urlparse(constants.ENDPOINT)
    else:
        url = urlparse(source.url)
    port = url.port or (443 if url.scheme == "https" else 80)
    return url.hostname or "", port, source.location


def go_offline_if_unreachable(name: str) -> None:
    """Switches this process to offline mode when the host of ``name``'s weights cannot be reached.

    Does nothing when ``HF_HUB_OFFLINE`` is already set, or for a model without released weights (the
    build says so itself).
    """
    global _offline_reason
    if _offline_requested():
        return
    try:
        host, port, location = _host_of(name)
    except (ValueError, TypeError):
        return
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT).close()
        return
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
    _offline_reason = (f"{host} cannot be reached ({reason}), so the released weights ({location}) can only come "
                       f"from the local cache, and they are not there")
    os.environ["HF_HUB_OFFLINE"] = "1"  # torch.hub files: read at each download
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True  # the Hub: read once at import, so set where it is looked up


def reword(message: str) -> str:
    """A download error of the library worded for the command line."""
    not_cached = any(s in message for s in ("not in the local", "cannot be downloaded", "HF_HUB_OFFLINE",
                                            "not in torch.hub's cache"))
    if _offline_reason and not_cached:
        head = message.split(":", 1)[0]  # the model.tag the library names
        return (f"--pretrained {head}: {_offline_reason}. Connect to the network and retry, or download the file "
                f"elsewhere and pass --checkpoint PATH")
    message = message.replace("checkpoint=PATH", "--checkpoint PATH")
    if _offline_reason or not _offline_requested():  # do not advise unsetting what the user did not set
        message = re.sub(r",? ?unset HF_HUB_OFFLINE,?( or)?", "", message).replace("and HF_HUB_OFFLINE is set; ", "")
    return message
