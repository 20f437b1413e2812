"""diffaccel: fast attention patterns for Hugging Face diffusers."""
from . import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
