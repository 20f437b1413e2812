"""`diffaccel generate`: every bad argument is a clear error naming it before any model is loaded or file written;
outputs are never written over a file the user did not ask to replace, and are written atomically; `--highres`
runs the chain and prints the time of every stage."""
from __future__ import annotations

import os

import pytest
from PIL import Image

import tiny_models  # noqa: F401
from diffaccel.cli import main as cli_main
from diffaccel.pipelines import cli as pcli
from diffaccel.pipelines import media


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model is loaded."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pcli, "load_pipeline", boom)


BAD = [
    # (argv, text the error must contain)
    (["--steps", "0"], "--steps"),
    (["--height", "0"], "--height"),
    (["--height", "1000000"], "--height"),
    (["--num-images", "0"], "--num-images"),
    (["--num-images", "-2"], "--num-images"),
    (["--threads", "-1"], "--threads"),
    (["--device", "bogus"], "--device"),
    (["--num-frames", "4"], "--num-frames"),
    (["--output", "{tmp}/noext"], "no extension"),
    (["--output", "{tmp}/x.txt"], "not an image format"),
    (["--output", "{tmp}"], "is a directory"),
    (["--output", "{tmp}/file.png/x.png"], "not a directory"),
    (["--output", "/proc/diffaccel/x.png"], "cannot write"),
    (["--method", "nope"], "--method"),
    (["--method", "neighborhood:bogus=1"], "bogus"),
    (["--guidance-scale", "-1"], "--guidance-scale"),
    (["--highres", "--height", "64"], "--highres needs the target size"),
    (["--highres", "--height", "64", "--width", "64", "--strength", "0"], "--strength"),
    (["--highres", "--height", "64", "--width", "64", "--stages", "32x"], "--stages"),
]
if not __import__("torch").cuda.is_available():
    BAD.append((["--device", "cuda"], "CUDA is not available"))


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_fail_before_loading(argv, needle, tmp_path, no_loading, capsys):
    (tmp_path / "file.png").write_bytes(b"not ours")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--output" not in argv:
        argv += ["--output", str(tmp_path / "out.png")]
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as e:
        cli_main(["generate", *argv])
    message = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
    assert needle in message, message
    assert "Traceback" not in message
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_existing_output_is_refused_unless_overwrite(tmp_path, no_loading):
    out = tmp_path / "out.png"
    out.write_bytes(b"the user's file")
    with pytest.raises(SystemExit, match="exists.*--overwrite"):
        cli_main(["generate", "--output", str(out)])
    assert out.read_bytes() == b"the user's file"
    # several images: out-0.png, out-1.png are checked too
    (tmp_path / "many-1.png").write_bytes(b"x")
    with pytest.raises(SystemExit, match="many-1.png"):
        cli_main(["generate", "--num-images", "2", "--output", str(tmp_path / "many.png")])


def test_save_media_is_atomic_and_refuses_existing_files(tmp_path, monkeypatch):
    class R:
        images = [Image.new("RGB", (8, 8), "red")]

    out = tmp_path / "a.png"
    out.write_bytes(b"keep")
    with pytest.raises(ValueError, match="exists"):
        media.save_media(R(), str(out))
    assert out.read_bytes() == b"keep"

    def broken_save(self, fp, format=None, **kw):
        with open(fp, "wb") as f:
            f.write(b"half a pic")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        media.save_media(R(), str(out), overwrite=True)
    assert out.read_bytes() == b"keep" and sorted(os.listdir(tmp_path)) == ["a.png"]  # no temporary left
    monkeypatch.undo()
    assert media.save_media(R(), str(out), overwrite=True) == [str(out)]
    assert Image.open(out).size == (8, 8)


def test_generate_highres_prints_every_stage(tmp_path, capsys):
    png = tmp_path / "big.png"
    assert cli_main(["generate", "--highres", "--height", "64", "--width", "128", "--steps", "4", "--method",
                     "neighborhood", "--output", str(png)]) == 0
    out = capsys.readouterr().out
    # the larger relative side starts at the native 32, then 2x stages
    assert "stage 1/3: 16x32, 4 steps, dense" in out
    assert "stage 2/3: 32x64, 2 steps, strength 0.5, neighborhood:kernel_size=9" in out
    assert "stage 3/3: 64x128, 2 steps, strength 0.4, neighborhood:kernel_size=9" in out and "total:" in out
    assert Image.open(png).size == (128, 64)
    gif = tmp_path / "clip.gif"
    assert cli_main(["generate", "--highres", "--model", "small-wan", "--height", "64", "--width", "64", "--steps",
                     "2", "--strength", "1", "--method", "freeswim", "--output", str(gif)]) == 0
    assert "freeswim" in capsys.readouterr().out
    clip = Image.open(gif)
    assert clip.size == (64, 64) and clip.n_frames == 4
