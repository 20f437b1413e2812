"""Writing generated images and videos to files: checked before any work, never over a file the user did not
ask to replace, and atomically (each file is written to a temporary sibling and renamed into place, so a reader
never sees half a picture and an error leaves nothing behind)."""
from __future__ import annotations

import os
import tempfile

import numpy as np
from PIL import Image

from diffaccel.io import atomic_path

__all__ = ["IMAGE_EXTENSIONS", "output_paths", "check_output", "save_media"]

# what PIL writes; videos are animated GIFs (.gif) or a strip of frames side by side (any other of these)
IMAGE_EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".gif": "GIF",
                    ".tif": "TIFF", ".tiff": "TIFF"}


def output_paths(path: str, count: int) -> list[str]:
    """The files a result of ``count`` images (or videos) is written to: ``path`` itself for one, else
    ``<name>-<i><ext>``."""
    if count == 1:
        return [path]
    root, ext = os.path.splitext(path)
    return [f"{root}-{i}{ext}" for i in range(count)]


def check_output(path, count: int = 1, *, overwrite: bool = False, arg: str = "output") -> list[str]:
    """The paths :func:`save_media` will write for ``count`` items, after checking that each can be written:
    ``path`` has an image extension (:data:`IMAGE_EXTENSIONS`), is not a directory, does not exist unless
    ``overwrite``, and its folder exists as a writable directory or can be created.  ``ValueError`` naming ``arg``
    otherwise."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"{arg} must be a file name such as out.png, got {path!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{arg} {path!r} is a directory; give a file name such as {os.path.join(path, 'out.png')}")
    ext = os.path.splitext(path)[1].lower()
    if not ext:
        raise ValueError(f"{arg} {path!r} has no extension; use one of {sorted(IMAGE_EXTENSIONS)}")
    if ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"{arg} {path!r}: {ext} is not an image format; use one of {sorted(IMAGE_EXTENSIONS)}")
    paths = output_paths(path, count)
    for p in paths:
        if os.path.isdir(p):
            raise ValueError(f"{arg} {p!r} is a directory; give a file name such as {os.path.join(p, 'out.png')}")
        if os.path.lexists(p) and not overwrite:
            raise ValueError(f"{arg} {p!r} exists; choose another name or pass --overwrite (overwrite=True) to "
                             "replace it")
    parent = os.path.dirname(os.path.abspath(path))
    probe = parent
    while not os.path.exists(probe):
        up = os.path.dirname(probe)
        if up == probe:
            break
        probe = up
    if not os.path.isdir(probe):
        raise ValueError(f"{arg} {path!r}: {probe!r} is not a directory")
    try:  # a real write (permissions, read-only or special file systems): an empty file, removed at once
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".diffaccel-write-check-"):
            pass
    except OSError as e:
        raise ValueError(f"{arg} {path!r}: cannot write in {probe!r} ({e.strerror or e})") from None
    return paths


def _items(result):
    frames = getattr(result, "frames", None)
    if frames is not None:
        return list(frames), True
    images = getattr(result, "images", None)
    if images is not None:
        return list(images), False
    raise ValueError(f"expected a pipeline result with .images or .frames, got {type(result).__name__}")


def _pil(frame):
    if isinstance(frame, Image.Image):
        return frame
    arr = np.asarray(frame)
    if arr.dtype != np.uint8:
        arr = np.rint(np.clip(arr, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(arr)


def save_media(result, path: str, *, overwrite: bool = False) -> list[str]:
    """Write a pipeline result (``.images`` or ``.frames``) to ``path``: images as the extension's format
    (``name-<i>.ext`` when there are several), videos as an animated GIF (``.gif``) or a strip of frames side by
    side (any other image extension).  Checked first (:func:`check_output`: an existing file is refused unless
    ``overwrite``); each file is written to a temporary sibling and renamed into place.  Returns the paths."""
    items, video = _items(result)
    paths = check_output(path, len(items), overwrite=overwrite)
    fmt = IMAGE_EXTENSIONS[os.path.splitext(path)[1].lower()]
    for item, p in zip(items, paths):
        if not video:
            picture, extra = _pil(item), {}
        else:
            frames = [_pil(f) for f in item]
            if fmt == "GIF":
                picture, extra = frames[0], dict(save_all=True, append_images=frames[1:], duration=250, loop=0)
            else:
                w, h = frames[0].size
                picture, extra = Image.new("RGB", (w * len(frames), h)), {}
                for k, f in enumerate(frames):
                    picture.paste(f, (k * w, 0))
        if fmt == "JPEG" and picture.mode != "RGB":
            picture = picture.convert("RGB")
        with atomic_path(p) as tmp:
            picture.save(tmp, format=fmt, **extra)
    return paths
