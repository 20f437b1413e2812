"""Writing generated images and videos to files."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

__all__ = ["save_media"]


def save_media(result, path: str) -> list[str]:
    """Write a pipeline result to ``path``: images as PNG/JPEG (``name-<i>.ext`` when there are several), videos as an
    animated GIF (``.gif``) or a strip of frames side by side (any other image extension).  Returns the paths."""
    frames = getattr(result, "frames", None)
    items = frames if frames is not None else result.images
    root, ext = os.path.splitext(path)
    paths = []
    for i, item in enumerate(items):
        p = path if len(items) == 1 else f"{root}-{i}{ext}"
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
        if frames is None:
            item.save(p)
        else:
            frames_pil = list(item) if isinstance(item, (list, tuple)) else \
                [Image.fromarray(np.rint(np.asarray(f) * 255).astype(np.uint8)) for f in item]
            if ext.lower() == ".gif":
                frames_pil[0].save(p, save_all=True, append_images=frames_pil[1:], duration=250, loop=0)
            else:
                w, h = frames_pil[0].size
                strip = Image.new("RGB", (w * len(frames_pil), h))
                for k, f in enumerate(frames_pil):
                    strip.paste(f, (k * w, 0))
                strip.save(p)
        paths.append(p)
    return paths
