"""Small file-system helpers for writing weights and configs atomically.

Readers never see a half-written file: everything is written to a temporary
name in the *same* directory as the target (so the final ``os.replace`` is a
rename within one file system, which POSIX and Windows make atomic) and
renamed over the target only after it was flushed and fsync'ed.  On any error
the temporary is removed and the target is left as it was.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_dir", "RUN_MARKER", "read_marker",
           "claim_folder", "check_separate_folders", "is_training_export", "owned_folder", "replace_folder", "pack_tree",
           "unpack_tree", "save_tree", "load_tree", "CheckpointDir"]


def _fsync_dir(path):
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary file name beside ``path``; on a clean exit it replaces ``path``.

    Use it with writers that want a file name (``safetensors.torch.save_file``,
    ``torch.save``)::

        with atomic_path("weights.safetensors") as tmp:
            save_file(tensors, tmp)
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        yield tmp
        # mkstemp makes 0600, and writers that replace the file themselves (safetensors >= 0.8) do too:
        # give the result the usual permissions
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(parent)


def atomic_write_bytes(path, data: bytes):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_json(path, obj, indent=2):
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, sort_keys=False) + "\n").encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(folder):
    """Yield a temporary directory beside ``folder``; on a clean exit its files land in ``folder``.

    * ``folder`` absent (or an empty directory): the temporary directory is
      renamed to ``folder`` in one step, so the folder appears complete or not at all.
    * ``folder`` exists with content: each written file replaces its namesake
      atomically (other files in ``folder`` are kept); a reader may briefly see
      a mix of old and new *files*, never a partial file.

    On an exception nothing in ``folder`` changes and the temporary is removed.
    """
    folder = os.path.abspath(os.fspath(folder))
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"folder {folder!r} exists and is not a directory")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.", suffix=".tmp", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        yield tmp
        names = sorted(os.listdir(tmp))
        for name in names:
            p = os.path.join(tmp, name)
            if os.path.isfile(p):
                _fsync_file(p)
        _fsync_dir(tmp)
        moved = False
        if not os.path.exists(folder) or (os.path.isdir(folder) and not os.listdir(folder)):
            try:
                os.replace(tmp, folder)
                moved = True
            except OSError:  # raced with another writer, or a platform that refuses: fall back to per file
                moved = False
        if not moved:
            os.makedirs(folder, exist_ok=True)
            for name in names:
                os.replace(os.path.join(tmp, name), os.path.join(folder, name))
        _fsync_dir(parent)
        _fsync_dir(folder)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


HUB_REPO_ID = r"[A-Za-z0-9][\w.-]*/[\w.-]+"


def is_hub_repo_id(text) -> bool:
    """Whether ``text`` looks like a Hugging Face Hub repo id (``owner/name``)."""
    import re

    return re.fullmatch(HUB_REPO_ID, str(text)) is not None


def hub_fetch(repo_id, filename=None, allow_patterns=None):
    """A local path for a file (``hf_hub_download``) or a snapshot folder (``snapshot_download``) of a Hub repo,
    from the local cache when ``HF_HUB_OFFLINE`` is set.  Any failure is one ``ValueError`` saying what to do."""
    try:
        import huggingface_hub

        if filename is not None:
            return huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename)
        return huggingface_hub.snapshot_download(repo_id=repo_id, allow_patterns=allow_patterns)
    except Exception as e:  # offline, not cached, no such repo or file, network error ...
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        what = f"{filename!r} from the Hugging Face Hub repo {repo_id!r}" if filename else f"the Hugging Face Hub repo {repo_id!r}"
        hint = " (HF_HUB_OFFLINE is set and it is not in the local Hub cache)" if offline else ""
        cmd = f"huggingface-cli download {repo_id}" + (f" {filename}" if filename else "")
        raise ValueError(f"could not get {what}{hint}: {type(e).__name__}: {e}. "
                         f"Download it first ({cmd}) or pass a local path.") from e


# ---------------------------------------------------------------------------------------------
# folders the project writes: claimed with a marker, replaced only when they are ours

RUN_MARKER = ".diffaccel-run.json"


def read_marker(folder) -> dict | None:
    """The marker :func:`claim_folder` wrote in ``folder`` (``None`` when there is none).  A marker that
    is not a JSON object is a ``ValueError`` naming the file."""
    path = os.path.join(os.fspath(folder), RUN_MARKER)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{path} is not a readable diffaccel run marker ({type(e).__name__}: {e})") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("kind"), str):
        raise ValueError(f"{path} is not a diffaccel run marker (expected a JSON object with a 'kind')")
    return marker


def claim_folder(folder, *, kind: str, identity: dict | None = None, arg: str = "output",
                 allow_other_identity: bool = False, create: bool = True) -> dict:
    """Make ``folder`` a folder of a diffaccel run of ``kind`` (e.g. ``"distill"``), before any work starts.

    * absent, or an empty directory: created, and the marker ``.diffaccel-run.json`` written in it
      (``{"kind": ..., "identity": ...}``);
    * holding the marker of a run of the same ``kind``: accepted; when ``identity`` (a JSON-able dict
      describing the run: method, model, options ...) is given and differs from the recorded one, a
      ``ValueError`` naming ``arg`` (unless ``allow_other_identity``);
    * anything else (a file, a folder with other content, a run of another kind): ``ValueError`` naming
      ``arg``; nothing is touched.

    With ``create=False`` only the checks run (nothing is created or written).  Returns the marker."""
    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{arg} {folder!r} exists and is not a folder")
    marker = read_marker(folder) if os.path.isdir(folder) else None
    if marker is None:
        if os.path.isdir(folder) and os.listdir(folder):
            raise ValueError(
                f"{arg} {folder!r} is not empty and was not written by a diffaccel {kind} run; "
                "diffaccel never writes into a folder it did not create: pass a new or empty folder"
            )
        marker = {"kind": kind, "identity": identity}
        if not create:
            return marker
        os.makedirs(folder, exist_ok=True)
        atomic_write_json(os.path.join(folder, RUN_MARKER), marker)
        return marker
    if marker["kind"] != kind:
        raise ValueError(f"{arg} {folder!r} holds a diffaccel {marker['kind']!r} run, not a {kind!r} one: "
                         "pass another folder")
    if identity is not None and not allow_other_identity and marker.get("identity") not in (None, identity):
        raise ValueError(f"{arg} {folder!r} holds a different {kind} run ({marker.get('identity')}), not "
                         f"{identity}: pass another folder")
    return marker


def check_separate_folders(**folders) -> None:
    """``ValueError`` when two of the named folders (``output=..., work_dir=...``) are the same folder or
    one lies inside the other (an export replacing its folder would then take the other's files)."""
    items = [(name, os.path.realpath(os.fspath(p))) for name, p in folders.items() if p is not None]
    for i, (a, pa) in enumerate(items):
        for b, pb in items[i + 1:]:
            if pa == pb or pa.startswith(pb + os.sep) or pb.startswith(pa + os.sep):
                raise ValueError(f"{a} ({pa}) and {b} ({pb}) must be separate folders, neither inside the other")


def is_training_export(folder) -> bool:
    """Whether ``folder`` is an export a diffaccel training run wrote (``train-small``, ``diffaccel distill
    --export``): it holds a ``training.json`` with the run's ``command`` and ``steps``.  The only kind of non-empty
    folder an export replaces."""
    try:
        with open(os.path.join(folder, "training.json"), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(info, dict) and "command" in info and "steps" in info


def owned_folder(folder, is_ours) -> bool:
    """Whether ``folder`` may be replaced: absent, empty, or ``is_ours(folder)`` says it was written by us."""
    folder = os.fspath(folder)
    if not os.path.exists(folder):
        return True
    return os.path.isdir(folder) and (not os.listdir(folder) or bool(is_ours(folder)))


@contextlib.contextmanager
def replace_folder(folder, is_ours=lambda f: read_marker(f) is not None, *, arg: str = "output"):
    """Yield a new temporary folder beside ``folder``; on a clean exit it *becomes* ``folder``.

    ``folder`` must be absent, empty, or one of ours (``is_ours(folder)``, by default: it holds a run
    marker); otherwise ``ValueError`` naming ``arg`` before anything is written.  The previous folder is
    renamed aside, the new one renamed into place, and only then the previous one removed: a reader sees
    the old or the new folder, never a mix, and a crash leaves the old one (or the aside copy) intact.
    On an exception inside the block nothing changes and the temporary folder is removed."""
    folder = os.path.abspath(os.fspath(folder))
    if not owned_folder(folder, is_ours):
        raise ValueError(f"{arg} {folder!r} is not empty and was not written by diffaccel; "
                         "it is never replaced: pass a new or empty folder")
    parent, base = os.path.dirname(folder), os.path.basename(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.", suffix=".tmp", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync_file(os.path.join(root, name))
        _fsync_dir(tmp)
        aside = None
        if os.path.isdir(folder):
            if not owned_folder(folder, is_ours):  # checked again: it may have changed meanwhile
                raise ValueError(f"{arg} {folder!r} changed while it was written and is no longer ours")
            aside = tempfile.mkdtemp(prefix=f".{base}.", suffix=".old", dir=parent)
            os.rmdir(aside)
            os.replace(folder, aside)
        os.replace(tmp, folder)
        _fsync_dir(parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# checkpoints: safetensors for tensors, JSON for the rest (no pickle), published atomically

_TENSOR_REF = "__tensor__"
TENSORS_NAME = "tensors.safetensors"
STATE_NAME = "state.json"


def pack_tree(obj):
    """Split a nested structure of dicts (str keys), lists, tuples, tensors and JSON scalars into
    ``(tensors, skeleton)``: ``tensors`` a flat ``{key: tensor}`` for safetensors, ``skeleton`` JSON where
    each tensor is ``{"__tensor__": key}`` (tuples become ``{"__tuple__": [...]}``, non-str dict keys are
    kept as ``{"__items__": [[key, value], ...]}``).  Anything else is a ``TypeError``."""
    import torch

    tensors = {}

    def walk(x, path):
        if isinstance(x, torch.Tensor):
            key = path or "root"
            tensors[key] = x.detach().to("cpu").clone().contiguous()  # no shared storage
            return {_TENSOR_REF: key}
        if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
            return x
        if isinstance(x, float):
            return x if x == x and x not in (float("inf"), float("-inf")) else {"__float__": repr(x)}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {"__dict__": {k: walk(v, f"{path}.{k}" if path else k) for k, v in x.items()}}
            return {"__items__": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")]
                                  for i, (k, v) in enumerate(x.items())]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
        raise TypeError(f"cannot store a {type(x).__name__} at {path or 'the root'} in a checkpoint")

    return tensors, walk(obj, "")


def unpack_tree(tensors, skeleton, where="checkpoint"):
    """Inverse of :func:`pack_tree`; a malformed skeleton or a missing tensor is a ``ValueError`` naming ``where``."""

    def walk(x):
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, dict):
            if len(x) != 1:
                raise ValueError(f"{where}: malformed entry {str(x)[:80]}")
            (tag, value), = x.items()
            if tag == _TENSOR_REF:
                if value not in tensors:
                    raise ValueError(f"{where}: the tensor {value!r} is missing")
                return tensors[value]
            if tag == "__dict__" and isinstance(value, dict):
                return {k: walk(v) for k, v in value.items()}
            if tag == "__items__" and isinstance(value, list):
                return {walk(k): walk(v) for k, v in value}
            if tag == "__tuple__" and isinstance(value, list):
                return tuple(walk(v) for v in value)
            if tag == "__float__" and value in ("nan", "inf", "-inf"):
                return float(value)
            raise ValueError(f"{where}: malformed entry {str(x)[:80]}")
        return x

    return walk(skeleton)


def save_tree(folder, obj, *, metadata: dict | None = None):
    """Write ``obj`` (see :func:`pack_tree`) into ``folder`` as ``tensors.safetensors`` + ``state.json``."""
    from safetensors.torch import save_file

    tensors, skeleton = pack_tree(obj)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, TENSORS_NAME))
    with open(os.path.join(folder, STATE_NAME), "w", encoding="utf-8") as f:
        json.dump({"format": "diffaccel-checkpoint", "version": 1, "metadata": metadata or {}, "tree": skeleton}, f)


def load_tree(folder):
    """``(obj, metadata)`` written by :func:`save_tree`; anything wrong (missing, truncated, corrupt,
    not ours) is a ``ValueError`` naming the file and what is wrong.  Nothing is unpickled."""
    from safetensors.torch import load_file

    state_path, tensor_path = os.path.join(folder, STATE_NAME), os.path.join(folder, TENSORS_NAME)
    for p in (state_path, tensor_path):
        if not os.path.isfile(p):
            raise ValueError(f"checkpoint {folder!r} is incomplete: {os.path.basename(p)} is missing")
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"checkpoint file {state_path!r} is corrupt ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != "diffaccel-checkpoint" or "tree" not in state:
        raise ValueError(f"checkpoint file {state_path!r} is not a diffaccel checkpoint")
    try:
        tensors = load_file(tensor_path)
    except Exception as e:  # safetensors raises its own error types for truncated / random files
        raise ValueError(f"checkpoint file {tensor_path!r} is corrupt ({type(e).__name__}: {e})") from None
    return unpack_tree(tensors, state["tree"], where=f"checkpoint {folder!r}"), state.get("metadata") or {}


class CheckpointDir:
    """Checkpoints under ``root``: ``root/checkpoint-<step>/`` folders and a ``root/latest`` pointer.

    :meth:`save` writes a new checkpoint into a temporary folder, renames it into place, then replaces
    the ``latest`` pointer atomically, and only then removes older checkpoints beyond ``keep``: a kill at
    any moment leaves ``latest`` naming a complete checkpoint (the previous one until the new one is
    whole).  :meth:`latest` is the path ``latest`` names (``None`` before the first save); a pointer that
    is corrupt or names a missing folder is a ``ValueError`` naming it, never a silent restart."""

    POINTER = "latest"

    def __init__(self, root, keep: int = 1):
        self.root = os.path.abspath(os.fspath(root))
        self.keep = max(1, int(keep))

    def _name(self, step):
        return f"checkpoint-{int(step):08d}"

    def latest(self) -> str | None:
        pointer = os.path.join(self.root, self.POINTER)
        if not os.path.exists(pointer):
            return None
        try:
            with open(pointer, encoding="utf-8") as f:
                name = json.load(f)["checkpoint"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"checkpoint pointer {pointer!r} is corrupt ({type(e).__name__}: {e})") from None
        if not isinstance(name, str) or os.sep in name or not name.startswith("checkpoint-"):
            raise ValueError(f"checkpoint pointer {pointer!r} names {name!r}, not a checkpoint folder")
        path = os.path.join(self.root, name)
        if not os.path.isdir(path):
            raise ValueError(f"checkpoint pointer {pointer!r} names {name!r}, which does not exist")
        return path

    def save(self, step: int, write) -> str:
        """``write(tmp_folder)`` fills a fresh folder; it is then published as checkpoint ``step``."""
        os.makedirs(self.root, exist_ok=True)
        name = self._name(step)
        final = os.path.join(self.root, name)
        tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=self.root)
        try:
            write(tmp)
            for dirpath, _, files in os.walk(tmp):
                for f in files:
                    _fsync_file(os.path.join(dirpath, f))
            _fsync_dir(tmp)
            current = self.latest()
            if os.path.isdir(final):  # the same step saved again: keep the old one until the pointer moves
                if current == final:
                    aside = tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=self.root)
                    os.rmdir(aside)
                    os.replace(final, aside)
                    os.replace(tmp, final)
                    shutil.rmtree(aside, ignore_errors=True)
                else:
                    shutil.rmtree(final)
                    os.replace(tmp, final)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.root)
            atomic_write_json(os.path.join(self.root, self.POINTER), {"checkpoint": name, "step": int(step)})
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        self._prune(name)
        return final

    def _prune(self, newest):
        names = sorted(n for n in os.listdir(self.root)
                       if n.startswith("checkpoint-") and os.path.isdir(os.path.join(self.root, n)))
        older = [n for n in names if n != newest]
        for n in older[: max(0, len(older) - (self.keep - 1))]:
            shutil.rmtree(os.path.join(self.root, n), ignore_errors=True)
        for n in os.listdir(self.root):  # leftovers of saves killed halfway
            if n.startswith(".checkpoint-") and (n.endswith(".tmp") or n.endswith(".old")):
                shutil.rmtree(os.path.join(self.root, n), ignore_errors=True)
