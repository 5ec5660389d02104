"""The hub libraries never reach the network from this project.

Everything here loads local directories or the local hub cache only, but the hub client still
contacts its server for some calls (a registry fetch while building request headers) unless its
offline flag is set. ``hub_offline()`` sets it for the duration: the environment variables the
libraries read at import, and the module constants of those already imported.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1"}
HUB_PACKAGES = ("huggingface_hub", "diffusers", "transformers", "peft")


@contextmanager
def hub_offline() -> Iterator[None]:
    """Run the body with every hub library in offline mode; restore the previous state after."""
    saved_env = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    patched = [m for name, m in list(sys.modules.items()) if name.split(".")[0] in HUB_PACKAGES
               and getattr(m, "HF_HUB_OFFLINE", None) is False]
    for m in patched:
        m.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for m in patched:
            m.HF_HUB_OFFLINE = False
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
