"""The package layout: kernels/ and pipelines/ install only as diffaccel.kernels / diffaccel.pipelines."""
import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_wheel_maps_kernels_and_pipelines_under_diffaccel(tmp_path):
    # -v shows the build backend's output: the build must print no setuptools deprecation and no
    # "package would be ignored" warning (license as an SPDX string, model folders as package data)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-v", "-w", str(tmp_path)],
                           check=True, capture_output=True, text=True)
    log = build.stdout + build.stderr
    for warning in ("SetuptoolsDeprecationWarning", "would be ignored", "_Warning:"):
        assert warning not in log, log[log.index(warning) - 300:log.index(warning) + 600]
    (whl,) = tmp_path.glob("diffaccel-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "kernels" not in tops and "pipelines" not in tops, sorted(tops)
    assert "diffaccel/kernels/blocksparse.py" in names
    assert "diffaccel/pipelines/__init__.py" in names
    # every subpackage of the source tree is in the wheel
    for init in (ROOT / "diffaccel").rglob("__init__.py"):
        assert init.relative_to(ROOT).as_posix() in names, f"{init} missing from the wheel"
    # the shipped small models: every tracked file under pipelines/small/models
    models = subprocess.run(["git", "ls-files", "pipelines/small/models"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    assert models, "no shipped models found by git ls-files"
    for f in models:
        assert "diffaccel/" + f in names, f"{f} missing from the wheel"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "diffaccel = diffaccel.cli:main" in zipfile.ZipFile(whl).read(entry).decode()


def test_import_direction_kernels_know_tensors_only():
    # kernels/ must not import diffaccel's higher layers or diffusers
    for path in (ROOT / "kernels").glob("*.py"):
        text = path.read_text()
        for bad in ("import diffusers", "from diffusers", "from diffaccel", "import diffaccel", "from ..", "pipelines"):
            assert bad not in text, f"{path.name} imports {bad!r}"
    for path in (ROOT / "diffaccel").rglob("*.py"):
        text = path.read_text()
        for bad in ("diffaccel.pipelines", "from .pipelines", "from ..pipelines", "from . import pipelines"):
            assert bad not in text, f"{path} imports the pipelines layer ({bad!r})"


def test_references_are_for_tests_only():
    # the plain PyTorch references (kernels/*_ref.py, kernels/reference.py) are never imported at run time
    import re

    ref = re.compile(r"(from|import)\s+[\w.]*(_ref|reference)\b")
    for path in list((ROOT / "kernels").glob("*.py")) + list((ROOT / "diffaccel").rglob("*.py")):
        if path.name.endswith("_ref.py") or path.name == "reference.py":
            continue
        assert not ref.search(path.read_text()), f"{path} imports a reference module"
