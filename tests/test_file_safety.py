"""Files the project writes: never delete or overwrite what it did not write; checkpoints hold no pickled
code, are published atomically and a corrupt one is a clear error (issue #25, items 1, 2 and 10)."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from diffaccel.io import (RUN_MARKER, CheckpointDir, check_separate_folders, claim_folder, load_tree, pack_tree,
                          replace_folder, save_tree, unpack_tree)


# ----------------------------------------------------------------------------------------------- io helpers


def test_claim_folder_refuses_foreign_content_and_other_runs(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="--output.*not empty"):
        claim_folder(user, kind="distill", arg="--output")
    assert os.listdir(user) == ["notes.txt"]  # nothing written

    run = tmp_path / "run"
    assert claim_folder(run, kind="distill", identity={"method": "clear"}, create=False)["kind"] == "distill"
    assert not run.exists()  # create=False writes nothing
    claim_folder(run, kind="distill", identity={"method": "clear"})
    assert json.loads((run / RUN_MARKER).read_text())["identity"] == {"method": "clear"}
    claim_folder(run, kind="distill", identity={"method": "clear"})  # the same run again: fine
    with pytest.raises(ValueError, match="different distill run"):
        claim_folder(run, kind="distill", identity={"method": "moba"})
    with pytest.raises(ValueError, match="holds a diffaccel 'distill' run"):
        claim_folder(run, kind="train-small")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        claim_folder(tmp_path / "file", kind="distill")
    (run / RUN_MARKER).write_text("[1, 2")
    with pytest.raises(ValueError, match="run marker"):
        claim_folder(run, kind="distill")


def test_separate_folders():
    check_separate_folders(output="/a/b", work_dir="/a/c")
    for other in ("/a/b", "/a/b/c", "/a"):
        with pytest.raises(ValueError, match="output .* and work_dir .* must be separate"):
            check_separate_folders(output="/a/b", work_dir=other)


def test_replace_folder_swaps_whole_and_never_takes_foreign_folders(tmp_path):
    out = tmp_path / "out"
    with replace_folder(out) as tmp:
        (open(os.path.join(tmp, RUN_MARKER), "w")).write('{"kind": "x"}')
        open(os.path.join(tmp, "a.txt"), "w").write("1")
    assert sorted(os.listdir(out)) == sorted([RUN_MARKER, "a.txt"])
    # a failure inside the block changes nothing and leaves no temporary behind
    with pytest.raises(RuntimeError):
        with replace_folder(out) as tmp:
            open(os.path.join(tmp, "b.txt"), "w").write("2")
            raise RuntimeError("boom")
    assert sorted(os.listdir(out)) == sorted([RUN_MARKER, "a.txt"])
    assert sorted(os.listdir(tmp_path)) == ["out"]
    with replace_folder(out) as tmp:
        (open(os.path.join(tmp, RUN_MARKER), "w")).write('{"kind": "x"}')
        open(os.path.join(tmp, "b.txt"), "w").write("2")
    assert sorted(os.listdir(out)) == sorted([RUN_MARKER, "b.txt"])  # the old folder (ours) replaced whole
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="never replaced"):
        with replace_folder(foreign) as tmp:
            pass
    assert os.listdir(foreign) == ["notes.txt"]


def _optimizer_state():
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.99))
    p.sum().backward()
    opt.step()
    return opt.state_dict()


def test_pack_tree_round_trip_and_no_pickle(tmp_path):
    obj = dict(step=3, name="run", ratio=0.5, nan=float("nan"), none=None, shape=(1, 4, 4), flag=True,
               model={"w": torch.arange(6.0).view(2, 3)}, ema=[torch.ones(2), torch.zeros(1)],
               optimizer=_optimizer_state(), rng=torch.get_rng_state())
    save_tree(tmp_path / "ck", obj, metadata={"kind": "test"})
    back, meta = load_tree(tmp_path / "ck")
    assert meta == {"kind": "test"}
    assert back["shape"] == (1, 4, 4) and back["step"] == 3 and back["none"] is None and back["flag"] is True
    assert back["nan"] != back["nan"]
    assert torch.equal(back["model"]["w"], obj["model"]["w"]) and torch.equal(back["rng"], obj["rng"])
    assert set(back["optimizer"]["state"]) == {0}  # int keys survive
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert sorted(os.listdir(tmp_path / "ck")) == ["state.json", "tensors.safetensors"]
    with pytest.raises(TypeError, match="cannot store a object"):
        pack_tree({"x": object()})
    with pytest.raises(ValueError, match="tensor 'nope' is missing"):
        unpack_tree({}, {"__tensor__": "nope"})


@pytest.mark.parametrize("damage", ["truncate", "empty", "random", "state_json", "missing_tensor_file"])
def test_corrupt_tree_is_a_clear_error(tmp_path, damage):
    folder = tmp_path / "ck"
    save_tree(folder, {"w": torch.randn(64, 64)})
    tensors, state = folder / "tensors.safetensors", folder / "state.json"
    if damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:100])
    elif damage == "empty":
        tensors.write_bytes(b"")
    elif damage == "random":
        tensors.write_bytes(os.urandom(4096))
    elif damage == "state_json":
        state.write_text("{not json")
    else:
        tensors.unlink()
    with pytest.raises(ValueError, match="checkpoint"):
        load_tree(folder)


def test_checkpoint_dir_keeps_the_last_good_one(tmp_path):
    ckd = CheckpointDir(tmp_path / "checkpoints")
    assert ckd.latest() is None
    first = ckd.save(1, lambda f: save_tree(f, {"step": 1}))
    assert ckd.latest() == first and load_tree(first)[0]["step"] == 1

    def killed(folder):  # a save that dies halfway: the pointer still names the last complete checkpoint
        open(os.path.join(folder, "tensors.safetensors"), "wb").write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckd.save(2, killed)
    assert ckd.latest() == first and load_tree(first)[0]["step"] == 1
    second = ckd.save(2, lambda f: save_tree(f, {"step": 2}))
    assert ckd.latest() == second and not os.path.exists(first)  # the older one pruned after the pointer moved
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-00000002", "latest"]
    (tmp_path / "checkpoints" / "latest").write_text("garbage")
    with pytest.raises(ValueError, match="pointer .* is corrupt"):
        ckd.latest()


# ----------------------------------------------------------------------------------------------- train-small

_ARGS = ["--max-steps", "1", "--batch-size", "2", "--save-every", "0", "--sample-every", "0", "--save-dtype", "fp32"]


def _train(out, work, *extra, steps=1):
    from diffaccel.pipelines.small.train import train_small

    return train_small("flux", str(out), str(work), max_steps=steps, batch_size=2, save_every=0, sample_every=0,
                       save_dtype="fp32", **dict(extra))


def test_train_small_never_deletes_a_users_folder(tmp_path):
    """#25 item 1: `--output DIR` holding a user's file is refused before any work; nothing is deleted."""
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(ValueError, match=r"output \(--output\).*not empty"):
        _train(out, work)
    assert (out / "notes.txt").read_text() == "my notes" and os.listdir(out) == ["notes.txt"]
    assert not work.exists()  # refused before anything was written
    with pytest.raises(ValueError, match="must be separate folders"):
        _train(tmp_path / "same", tmp_path / "same")
    with pytest.raises(ValueError, match="must be separate folders"):
        _train(tmp_path / "w" / "export", tmp_path / "w")
    user_work = tmp_path / "user_work"
    user_work.mkdir()
    (user_work / "data.csv").write_text("1,2")
    with pytest.raises(ValueError, match=r"work_dir \(--work-dir\).*not empty"):
        _train(tmp_path / "out2", user_work)
    assert os.listdir(user_work) == ["data.csv"]


def test_train_small_resume_and_export_replacement(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    _train(out, work)
    assert json.loads((out / "training.json").read_text())["steps"] == 1
    ck = CheckpointDir(work / "checkpoints").latest()
    assert ck is not None and sorted(os.listdir(ck)) == ["state.json", "tensors.safetensors"]
    assert not any(n.endswith(".pt") for n in os.listdir(work))
    summary = _train(out, work, ("resume", True), steps=2)  # continues, and replaces its own export
    assert summary["steps"] == 2 and json.loads((out / "training.json").read_text())["steps"] == 2
    assert sorted(os.listdir(tmp_path)) == ["out", "work"]  # no temporary folders left behind
    with pytest.raises(ValueError, match=r"resume \(--resume\).*no checkpoint"):
        _train(tmp_path / "o2", tmp_path / "w2", ("resume", True))
    assert not (tmp_path / "w2").exists()


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("damage", ["pickle_code", "truncated", "empty", "random", "no_optimizer", "a_list"])
def test_train_small_refuses_bad_checkpoints(tmp_path, monkeypatch, damage):
    """#25 items 2 and 10: a crafted or corrupt checkpoint.pt runs no code and is a ValueError naming the file."""
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    path = work / "checkpoint.pt"
    genuine = dict(kind="flux", step=1, model={}, ema=[], rng=torch.get_rng_state())
    if damage == "pickle_code":
        path.write_bytes(pickle.dumps({"kind": "flux", "payload": _Exploit()}))
    elif damage == "truncated":
        torch.save(dict(genuine, optimizer={}), path)
        path.write_bytes(path.read_bytes()[:50])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "random":
        path.write_bytes(os.urandom(2048))
    elif damage == "no_optimizer":
        torch.save(genuine, path)
    else:
        torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="checkpoint.pt"):
        _train(tmp_path / "out", work, ("resume", True))
    assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path / "out").exists()


def test_atomic_files_get_the_usual_permissions(tmp_path):
    """Files written through atomic_path end with 0666 & ~umask, also when the writer replaces the temporary file
    itself (safetensors' save_file makes 0600 files)."""
    import torch
    from safetensors.torch import save_file

    from diffaccel.io import atomic_path, atomic_write_json

    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "w.safetensors") as tmp:
            save_file({"a": torch.zeros(2)}, tmp)
        atomic_write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(umask)
    for name in ("w.safetensors", "x.json"):
        assert oct(os.stat(tmp_path / name).st_mode & 0o777) == oct(0o644), name
