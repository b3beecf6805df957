"""The pip command that adds an extra, for the way this project was installed.

From a checkout (`pip install -e .` or `pip install .` of a folder) the package index has no
nanovlm-edge to resolve: `pip install 'nanovlm-edge[torch]'` answers "No matching distribution".
The hint names the folder the install came from; only an install from an index gets the name.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from urllib.parse import unquote, urlparse

DIST = "nanovlm-edge"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def install_hint(extra: str) -> str:
    """`pip install ...` that adds `extra` to this installation."""
    # an editable install leaves an .egg-info in the checkout too: the record pip wrote says more
    dists = list(metadata.distributions(name=DIST))
    if not dists:  # run from a checkout without installing it
        return f"pip install -e '{_here(REPO)}[{extra}]'"
    origin = next((o for o in (d.read_text("direct_url.json") for d in dists) if o), None)
    if origin:
        info = json.loads(origin)
        url = urlparse(info.get("url", ""))
        if url.scheme == "file":
            folder = _here(unquote(url.path))
            editable = (info.get("dir_info") or {}).get("editable", False)
            return f"pip install {'-e ' if editable else ''}'{folder}[{extra}]'"
    return f"pip install '{DIST}[{extra}]'"


def _here(folder: str) -> str:
    """`.` when the folder is the current directory, else its path."""
    return "." if os.path.abspath(folder) == os.path.abspath(os.getcwd()) else folder
