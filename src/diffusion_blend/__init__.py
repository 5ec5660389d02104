"""diffusion-blend: inference-time multi-preference alignment by blending diffusion processes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("diffusion-blend")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
