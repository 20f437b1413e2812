"""Built-in methods; importing a module registers its method."""
from . import linfusion  # noqa: F401
