"""``diffaccel distill``: train the student of a diffusers pipeline for a diffaccel method, on one CPU or many
GPUs through accelerate.

* :mod:`.cli` -- the command line (``diffaccel distill`` and ``python -m diffaccel.distill``);
* :mod:`.models` -- ``--model`` names (plug-ins of the ``diffaccel.models`` entry-point group, then diffusers);
* :mod:`.adapters` -- per pipeline type: prompt encoding, teacher generation, image encoding, denoiser call and
  training target;
* :mod:`.data` -- the two data recipes and their on-disk cache;
* :mod:`.student` -- the student and its frozen teacher in one model, and what each method trains;
* :mod:`.losses` -- target, output and per-layer feature losses and the releases' presets;
* :mod:`.trainer` -- the accelerate loop, checkpoints, validation and export.
"""
from .cli import main

__all__ = ["main"]
