"""diffaccel: fast attention patterns for Hugging Face diffusers."""
from . import ops
from .api import apply, remove
from .layout import track_layout

__version__ = "0.1.0"
__all__ = ["ops", "apply", "remove", "track_layout", "__version__"]
