"""Helpers shared by the method modules."""
from __future__ import annotations

from ..families import FAMILIES

ALL_FAMILIES = FAMILIES


def per_axis_for_family(name, value, family):
    """``value`` (an int, or a tuple with one entry per grid axis) checked against ``family.grid_ndim``:
    a tuple of another length is a ``ValueError`` naming the option and the family's grid."""
    nd = family.grid_ndim
    if isinstance(value, tuple) and len(value) != nd:
        grid = "(T, H, W)" if nd == 3 else "(H, W)"
        raise ValueError(
            f"{name}={value!r} has {len(value)} values but {family.name!r} models have {nd}-axis token grids "
            f"{grid}; give an int or {nd} values"
        )
    return value


def attention_projections(model, layers) -> list:
    """The trained projections of the patched attention modules ``layers`` (``[(name, module)]``):
    :data:`diffaccel.projections.PROJECTIONS`, what a ``projections.safetensors`` holds."""
    from ..projections import projection_parameters

    return projection_parameters(model, layers)
