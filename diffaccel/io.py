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

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_dir"]


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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        yield tmp
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
