"""PLACEHOLDER (being replaced by the tile-and-halo implementation): dense reference."""
from .neighborhood_ref import neighborhood_reference


def neighborhood_torch(q, k, v, grid, kernel_size, dilation, stride, text_len, text_first, scale):
    return neighborhood_reference(q, k, v, grid, kernel_size, dilation, stride, text_len, text_first, scale)
