"""``python -m diffaccel.distill ...`` (and ``accelerate launch -m diffaccel.distill ...``) = ``diffaccel distill ...``."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
