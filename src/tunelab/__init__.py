"""tunelab: full fine-tuning of SDXL-class diffusion models, and measuring what a finetune
learned and what it forgot. See README.md and docs/ for the tour."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tunelab")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
