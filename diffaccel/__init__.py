"""diffaccel: fast attention patterns for Hugging Face diffusers."""
from . import ops
from .api import apply, remove, trainable_parameters
from .context import track_layout

__version__ = "0.1.0"
__all__ = ["ops", "apply", "remove", "trainable_parameters", "track_layout", "__version__"]
