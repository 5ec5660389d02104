"""The domains: toy2d (the exact testbed), the embedded image domains and Stable Diffusion."""

from __future__ import annotations

import importlib

IMAGE_DOMAINS = ("fashion", "digits")   # the first is the default of the demo and the UI


def image_domain(name: str):
    """The ``ImageDomain`` class of an embedded image domain (``digits``, ``fashion``)."""
    from diffusion_blend.errors import UsageError

    if name not in IMAGE_DOMAINS:
        raise UsageError(f"domain {name!r} is not an image domain; use one of {IMAGE_DOMAINS}")
    module = importlib.import_module(f"diffusion_blend.domains.{name}")
    return next(v for k, v in vars(module).items() if k.endswith("Domain") and k != "ImageDomain")
