"""The distillation losses and the released recipes' weights.

Three terms, each weighted by an option (``--loss-target``, ``--loss-output``, ``--loss-feature``):

* ``target``: the model's own objective on the student's prediction: flow matching ``noise - x0`` (FLUX, SD3,
  Wan, the small models) or the scheduler's ``prediction_type`` (SD / SDXL: epsilon, v or sample);
* ``output``: output distillation, the mean squared error between the student's and the frozen teacher's
  predictions on the same noisy input;
* ``feature``: per-layer attention-output matching, the mean over the patched layers of the mean squared error
  between the student's and the teacher's attention outputs (captured by forward hooks).

Presets (``--preset``), the weights of each release:

==============  ======  ======  =======  ===============================================================
preset          target  output  feature  from
==============  ======  ======  =======  ===============================================================
``linfusion``   1       0.5     0.5      LinFusion: noise loss + 0.5 output KD + 0.5 per-layer features
``clear``       1       0.5     0.5      CLEAR: flow matching + 0.5 output KD + 0.5 attention-output KD
``output``      0       1       0        pure output distillation (the teacher's prediction as target)
==============  ======  ======  =======  ===============================================================

Default: the method's own release (``linfusion``, ``clear``); neighborhood and MoBA use ``clear``'s weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["PRESETS", "DEFAULT_PRESET", "LossWeights", "resolve_weights", "feature_loss"]

PRESETS = {
    "linfusion": {"target": 1.0, "output": 0.5, "feature": 0.5},
    "clear": {"target": 1.0, "output": 0.5, "feature": 0.5},
    "output": {"target": 0.0, "output": 1.0, "feature": 0.0},
}
DEFAULT_PRESET = {"linfusion": "linfusion", "clear": "clear", "neighborhood": "clear", "moba": "clear"}


class LossWeights(dict):
    @property
    def needs_teacher(self):
        return self["output"] > 0 or self["feature"] > 0


def resolve_weights(method, preset=None, target=None, output=None, feature=None) -> LossWeights:
    """The loss weights of a run: the preset's (default: the method's), each overridden when given."""
    name = preset or DEFAULT_PRESET[method]
    if name not in PRESETS:
        raise ValueError(f"preset (--preset) must be one of {sorted(PRESETS)}, got {name!r}")
    w = dict(PRESETS[name])
    for key, value in (("target", target), ("output", output), ("feature", feature)):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"loss_{key} (--loss-{key}) must be a non-negative number, got {value!r}")
            w[key] = float(value)
    if not any(w.values()):
        raise ValueError("the loss weights (--preset / --loss-*) are all zero: nothing to train")
    return LossWeights(w)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    return []


def feature_loss(student: dict, teacher: dict) -> torch.Tensor:
    """Mean over layers of the MSE between the student's and the teacher's attention outputs (every tensor of a
    layer's output, e.g. FLUX's image and text streams)."""
    if set(student) != set(teacher) or not student:
        raise RuntimeError(f"feature hooks saw different layers: student {sorted(student)[:3]}, "
                           f"teacher {sorted(teacher)[:3]}")
    terms = []
    for name, s in student.items():
        for a, b in zip(_tensors(s), _tensors(teacher[name])):
            terms.append(F.mse_loss(a.float(), b.float()))
    return torch.stack(terms).mean()
