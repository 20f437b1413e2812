"""Training data for distillation: two recipes, one on-disk cache.

* **generated** (CLEAR's recipe): the teacher (the pipeline with full attention) generates one sample per
  prompt slot from a prompt file (default: the shipped ``prompts/default.txt``, or the model plug-in's prompt
  set for the small models), ``--num-samples`` in all, prompt ``i % len(prompts)`` with the noise of seed
  ``(seed, i)``;
* **images** (LinFusion's recipe): an image-caption folder (images with a ``.txt`` caption of the same name, or
  a ``metadata.jsonl`` of ``{"file_name", "text"}`` lines), a folder saved by ``datasets``' ``save_to_disk``, or a
  ``datasets`` Hub dataset name; each image is resized and centre-cropped to the training size and encoded by the
  VAE.

Both write the same cache (``--data-dir``, default ``<output>/data``): shards ``shard-00000.safetensors`` ...
holding ``latents`` (the clean latents ``x0``) and ``cond.<name>`` (the text conditioning), the prompts in the
file's metadata, plus ``uncond.safetensors`` (the empty prompt) and ``recipe.json`` (what the cache holds; a
cache of another recipe is refused).  Every file is written atomically, so a killed generation resumes at the
first missing shard, and training reads only the cache: the text encoders and the VAE never run again.
With several processes each generates every ``num_processes``-th shard.
"""
from __future__ import annotations

import hashlib
import json
import math
import os

import torch

from ..io import atomic_path, atomic_write_json

__all__ = ["DEFAULT_PROMPTS", "read_prompts", "ImageSource", "Cache", "CachedDataset", "StepBatchSampler"]

DEFAULT_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts", "default.txt")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_prompts(path) -> list[str]:
    """Non-empty lines of a prompt file (``#`` starts a comment line); ``ValueError`` naming ``--prompts``."""
    if not os.path.isfile(path):
        raise ValueError(f"prompts (--prompts) {path!r} is not a file")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompts (--prompts) {path!r} holds no prompt")
    return prompts


def prompts_digest(prompts) -> str:
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ images


class ImageSource:
    """Image-caption pairs from a folder, a ``save_to_disk`` folder or a ``datasets`` Hub dataset (``--data``).
    Opened (and counted) before any work; ``ValueError`` naming ``--data`` when it cannot be."""

    def __init__(self, source, *, split="train", image_column=None, caption_column=None, limit=None):
        self.source = os.fspath(source)
        self.split = split
        self._files = None
        self._ds = None
        if os.path.isdir(self.source) and not _is_saved_dataset(self.source):
            self._files = _folder_items(self.source)
            self.image_column, self.caption_column = "file", "caption"
        else:
            self._ds = _load_dataset(self.source, split)
            cols = list(self._ds.column_names)
            self.image_column = image_column or next((c for c in ("image", "img", "png", "jpg") if c in cols), None)
            self.caption_column = caption_column or next(
                (c for c in ("text", "caption", "prompt", "txt") if c in cols), None)
            for arg, col in (("image_column (--image-column)", self.image_column),
                             ("caption_column (--caption-column)", self.caption_column)):
                if col is None or col not in cols:
                    raise ValueError(f"{arg} {col!r}: the dataset {self.source!r} has columns {cols}")
        n = len(self._files) if self._files is not None else len(self._ds)
        if n == 0:
            raise ValueError(f"data (--data) {self.source!r} holds no image")
        self.count = n if limit is None else min(n, int(limit))

    def __len__(self):
        return self.count

    def identity(self) -> dict:
        return {"source": os.path.abspath(self.source) if os.path.exists(self.source) else self.source,
                "split": self.split, "image_column": self.image_column, "caption_column": self.caption_column,
                "count": self.count}

    def item(self, i):
        """``(PIL image, caption)``."""
        from PIL import Image

        if self._files is not None:
            path, caption = self._files[i]
            with Image.open(path) as im:
                return im.convert("RGB"), caption
        row = self._ds[int(i)]
        image = row[self.image_column]
        if not hasattr(image, "convert"):
            raise ValueError(f"data (--data): column {self.image_column!r} holds {type(image).__name__}, not images")
        return image.convert("RGB"), str(row[self.caption_column])


def _is_saved_dataset(folder):
    return os.path.isfile(os.path.join(folder, "dataset_info.json")) or \
        os.path.isfile(os.path.join(folder, "dataset_dict.json")) or os.path.isfile(os.path.join(folder, "state.json"))


def _load_dataset(source, split):
    try:
        import datasets
    except ImportError:  # pragma: no cover - a declared dependency
        raise ValueError("data (--data) names a dataset but the `datasets` package is not installed") from None
    try:
        if os.path.isdir(source):
            ds = datasets.load_from_disk(source)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
            return ds
        return datasets.load_dataset(source, split=split)
    except Exception as e:  # offline, unknown name, bad split ...
        raise ValueError(f"data (--data) {source!r} cannot be loaded as a dataset (split {split!r}): "
                         f"{type(e).__name__}: {e}") from None


def _folder_items(folder):
    """``[(image path, caption)]`` sorted by file name: captions from ``metadata.jsonl`` or ``<name>.txt``."""
    meta = os.path.join(folder, "metadata.jsonl")
    captions = {}
    if os.path.isfile(meta):
        with open(meta, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    captions[rec["file_name"]] = str(rec.get("text", rec.get("caption", "")))
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"data (--data): {meta} line {n} is not a JSON object with 'file_name' and "
                                     "'text'") from None
    items = []
    for name in sorted(os.listdir(folder)):
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        path = os.path.join(folder, name)
        if name in captions:
            items.append((path, captions[name]))
            continue
        txt = os.path.splitext(path)[0] + ".txt"
        if os.path.isfile(txt):
            with open(txt, encoding="utf-8") as f:
                items.append((path, f.read().strip()))
        elif not captions:
            raise ValueError(f"data (--data): image {name!r} has no caption ({os.path.basename(txt)} or "
                             "metadata.jsonl)")
    if not items:
        raise ValueError(f"data (--data) {folder!r} holds no captioned image ({', '.join(IMAGE_EXTENSIONS)})")
    return items


def to_tensor(image, height, width):
    """A PIL image resized (shorter side) and centre-cropped to ``height x width`` -> ``[3, H, W]`` in [0, 1]."""
    import numpy as np
    from PIL import Image

    w, h = image.size
    scale = max(height / h, width / w)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - width) // 2, (nh - height) // 2
    image = image.crop((left, top, left + width, top + height))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


# ------------------------------------------------------------------------------------------------ cache


class Cache:
    """The shard folder (module docstring)."""

    RECIPE = "recipe.json"
    UNCOND = "uncond.safetensors"

    def __init__(self, folder, recipe: dict, *, arg="data_dir (--data-dir)"):
        self.folder = os.path.abspath(os.fspath(folder))
        self.recipe = json.loads(json.dumps(recipe))
        self.arg = arg
        self.num_samples = int(recipe["num_samples"])
        self.shard_size = int(recipe["shard_size"])
        self.num_shards = math.ceil(self.num_samples / self.shard_size)

    def check(self):
        """``ValueError`` naming the argument when the folder holds another recipe's cache or foreign files."""
        path = os.path.join(self.folder, self.RECIPE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                try:
                    old = json.load(f)
                except ValueError:
                    raise ValueError(f"{self.arg}: {path} is corrupt") from None
            if old != self.recipe:
                diff = sorted(k for k in set(old) | set(self.recipe) if old.get(k) != self.recipe.get(k))
                raise ValueError(f"{self.arg} {self.folder!r} caches other data (differs in {diff}): pass another "
                                 "--data-dir, or the same data options as the run that wrote it")
        elif os.path.isdir(self.folder) and os.listdir(self.folder):
            raise ValueError(f"{self.arg} {self.folder!r} is not empty and holds no distillation data cache")

    def create(self):
        self.check()
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, self.RECIPE)
        if not os.path.isfile(path):
            atomic_write_json(path, self.recipe)

    def shard_path(self, i):
        return os.path.join(self.folder, f"shard-{i:05d}.safetensors")

    def shard_range(self, i):
        return range(i * self.shard_size, min((i + 1) * self.shard_size, self.num_samples))

    def missing(self):
        return [i for i in range(self.num_shards) if not os.path.isfile(self.shard_path(i))]

    def write_shard(self, i, latents, cond, prompts):
        from safetensors.torch import save_file

        tensors = {"latents": latents.detach().to("cpu").contiguous()}
        tensors.update({f"cond.{k}": v.detach().to("cpu").contiguous() for k, v in cond.items()})
        with atomic_path(self.shard_path(i)) as tmp:
            save_file(tensors, tmp, metadata={"prompts": json.dumps(list(prompts))})

    def write_uncond(self, cond):
        from safetensors.torch import save_file

        with atomic_path(os.path.join(self.folder, self.UNCOND)) as tmp:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in cond.items()}, tmp)

    def read_uncond(self):
        from safetensors.torch import load_file

        path = os.path.join(self.folder, self.UNCOND)
        try:
            return load_file(path)
        except Exception as e:
            raise ValueError(f"{self.arg}: {path} cannot be read ({type(e).__name__}: {e})") from None

    def has_uncond(self):
        return os.path.isfile(os.path.join(self.folder, self.UNCOND))


def generate_shards(cache, adapter, prompts, shards, *, seed, steps, guidance, size, batch_size, log=None):
    """Recipe (a): fill ``shards`` of ``cache`` with the teacher's samples."""
    uncond = {k: v.to(adapter.device) for k, v in cache.read_uncond().items()}
    for i in shards:
        rows = list(cache.shard_range(i))
        shard_prompts = [prompts[j % len(prompts)] for j in rows]
        latents, conds = [], []
        for start in range(0, len(rows), batch_size):
            ps = shard_prompts[start:start + batch_size]
            with torch.no_grad():
                cond = adapter.encode_prompts(ps)
                gens = [torch.Generator().manual_seed(seed * 1_000_003 + j) for j in rows[start:start + batch_size]]
                lat = adapter.generate(ps, cond, uncond, gens, size, steps=steps, guidance=guidance)
            if not bool(torch.isfinite(lat).all()):  # never cache a broken sample (e.g. Qwen-Image at 1 step)
                raise ValueError(f"generation_steps (--generation-steps): the teacher's samples for shard {i} hold "
                                 f"NaN or inf at {steps} step(s) with this scheduler; use more steps")
            latents.append(lat.float().cpu())
            conds.append({k: v.cpu() for k, v in cond.items()})
        cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
        cache.write_shard(i, torch.cat(latents), cond, shard_prompts)
        if log:
            log(f"data: shard {i + 1}/{cache.num_shards} written ({len(rows)} samples)")


def encode_shards(cache, adapter, source, shards, *, size, batch_size, log=None):
    """Recipe (b): fill ``shards`` of ``cache`` with the VAE latents of ``source``'s images."""
    for i in shards:
        rows = list(cache.shard_range(i))
        latents, conds, captions = [], [], []
        for start in range(0, len(rows), batch_size):
            items = [source.item(j) for j in rows[start:start + batch_size]]
            images = torch.stack([to_tensor(im, size["height"], size["width"]) for im, _ in items])
            caps = [c for _, c in items]
            with torch.no_grad():
                cond = adapter.encode_prompts(caps)
                lat = adapter.encode_images(images, size)
            latents.append(lat.float().cpu())
            conds.append({k: v.cpu() for k, v in cond.items()})
            captions += caps
        cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
        cache.write_shard(i, torch.cat(latents), cond, captions)
        if log:
            log(f"data: shard {i + 1}/{cache.num_shards} encoded ({len(rows)} images)")


class CachedDataset(torch.utils.data.Dataset):
    """The samples of a complete cache: ``{"latents": x0, "cond": {name: tensor}}`` (CPU tensors)."""

    def __init__(self, cache: Cache):
        from safetensors import safe_open

        self.cache = cache
        self._files = []
        for i in range(cache.num_shards):
            path = cache.shard_path(i)
            try:
                f = safe_open(path, framework="pt", device="cpu")
                keys = list(f.keys())
                n = f.get_slice("latents").get_shape()[0]
            except Exception as e:
                raise ValueError(f"{cache.arg}: shard {path} cannot be read ({type(e).__name__}: {e})") from None
            if n != len(cache.shard_range(i)):
                raise ValueError(f"{cache.arg}: shard {path} holds {n} samples, expected {len(cache.shard_range(i))}")
            self._files.append((f, [k for k in keys if k.startswith("cond.")]))

    def __len__(self):
        return self.cache.num_samples

    def __getitem__(self, index):
        shard, row = divmod(int(index), self.cache.shard_size)
        f, cond_keys = self._files[shard]
        return {"latents": f.get_slice("latents")[row:row + 1][0],
                "cond": {k[5:]: f.get_slice(k)[row:row + 1][0] for k in cond_keys}}


class StepBatchSampler(torch.utils.data.Sampler):
    """Endless micro-batches of dataset indices, a pure function of ``(seed, batch number)``: sample ``k`` of the
    stream is ``permutation(seed + epoch)[k % n]`` with ``epoch = k // n``.  ``start`` skips the first batches,
    which is how a resumed run continues exactly where the checkpoint was taken.  (With several processes,
    accelerate hands the batches out round-robin.)"""

    def __init__(self, n, batch_size, seed, start=0):
        self.n, self.batch_size, self.seed, self.start = int(n), int(batch_size), int(seed), int(start)
        self._perm = {}

    def _index(self, k):
        epoch, r = divmod(k, self.n)
        perm = self._perm.get(epoch)
        if perm is None:
            self._perm = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
            perm = self._perm[epoch]
        return int(perm[r])

    def __iter__(self):
        b = self.start
        while True:
            yield [self._index(b * self.batch_size + j) for j in range(self.batch_size)]
            b += 1
