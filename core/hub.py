"""Files from the Hugging Face Hub: the local cache first, then the Hub only if it answers at all.

Offline, huggingface_hub retries each file for tens of seconds before it fails with an error that
does not say what to do. Here a Hub id that is not in the cache fails within seconds when the
Hub's endpoint takes no connection, naming the fix: a local folder instead of the id.
"""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlparse

CONNECT_TIMEOUT = 3.0  # seconds to open a connection to the Hub's endpoint


class HubUnreachable(ValueError):
    """A Hub id whose files are not cached, and no Hub to fetch them from."""


def reachable(timeout: float = CONNECT_TIMEOUT) -> bool:
    """Whether the Hub's endpoint takes a TCP connection (and offline mode is off)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection(
            (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout
        ):
            return True
    except OSError:
        return False


def download(repo_id: str, filename: str, revision: str | None, fix: str, **kw: Any) -> str:
    """hf_hub_download from the cache, else from a reachable Hub; HubUnreachable naming `fix`."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename, revision=revision, local_files_only=True, **kw)
    except Exception:  # not cached (huggingface_hub raises several kinds): try the Hub itself
        if not reachable():
            raise HubUnreachable(_message(repo_id, fix)) from None
        return hf_hub_download(repo_id, filename, revision=revision, **kw)


def snapshot(repo_id: str, revision: str | None, fix: str, **kw: Any) -> str:
    """snapshot_download, the same way."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=True, **kw)
    except Exception:
        if not reachable():
            raise HubUnreachable(_message(repo_id, fix)) from None
        return snapshot_download(repo_id, revision=revision, **kw)


def _message(repo_id: str, fix: str) -> str:
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return (
        f"{repo_id!r} is a Hub id, it is not in the local cache and the Hub cannot be reached{offline}: {fix}"
    )
