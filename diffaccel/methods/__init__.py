"""Built-in methods; importing a module registers its method."""
from . import neighborhood  # noqa: F401
from . import linfusion  # noqa: F401
from . import clear  # noqa: F401
from . import moba  # noqa: F401
