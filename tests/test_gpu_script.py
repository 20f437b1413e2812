"""``benchmarks/gpu.sh``, the one command for a lent GPU: its CPU mode runs the same steps (correctness of
every op against the references in three dtypes, ``diffaccel bench``, the merged results file and the
summary) through Triton's interpreter on tiny shapes."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu.sh")


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_script_parses_and_rejects_unknown_arguments():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    proc = subprocess.run(["bash", SCRIPT, "--bogus"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_cpu_mode_runs_every_step_and_writes_the_results(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, DIFFACCEL_RESULTS=str(tmp_path), DIFFACCEL_COMMIT="abc123",
               OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", SCRIPT, "--cpu"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "cpu-interpreter.json").read_text())
    env_info = data["environment"]
    assert env_info["commit"] == "abc123" and env_info["torch"] and env_info["triton"]
    assert env_info["device"].startswith("cpu")
    rows = data["correctness"]
    assert {r["dtype"] for r in rows} == {"fp16", "bf16", "fp32"}
    assert {r["op"] for r in rows} == {"neighborhood", "local", "moba", "linear"}
    assert all(r["ok"] and "dq_rel" in r for r in rows)
    assert any(r["backend"] == "torch" and r["time_ms"] > 0 for r in data["results"])
    assert data["command"] == "bash benchmarks/gpu.sh --cpu"
    assert f"correctness vs the references: {len(rows)}/{len(rows)} ok" in proc.stdout
    assert "benchmark (float32" in proc.stdout


def test_report_fails_and_summary_shows_a_failed_check(tmp_path):
    gc = _gpu_check()
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(dict(environment=dict(device="x", torch="t", triton="r", commit=None, time="now"),
                                     dtype="bfloat16", cases=[], results=[
                                         dict(case="c1", backend="dense-sdpa", time_ms=4.0, speedup_vs_dense=1.0),
                                         dict(case="c1", backend="triton", time_ms=1.0, speedup_vs_dense=4.0,
                                              tflops=2.0)])))
    good = dict(case="na", op="neighborhood", dtype="bf16", ok=True, out_rel=1e-3, dq_rel=2e-3)
    bad = dict(good, dtype="fp16", ok=False, out_rel=0.5)
    corr = tmp_path / "c.json"
    corr.write_text(json.dumps(dict(rows=[good, bad])))
    out = tmp_path / "res" / "gpu.json"
    assert gc.main(["report", "--bench", str(bench), "--correctness", str(corr), "--out", str(out)]) == 1
    text = gc.summary(json.loads(out.read_text()))
    assert "1/2 ok" in text and "FAIL 5.0e-01" in text and "ok 2.0e-03" in text
    assert "4.00x" in text  # the Triton row's speedup over dense SDPA
    corr.write_text(json.dumps(dict(rows=[good])))
    assert gc.main(["report", "--bench", str(bench), "--correctness", str(corr), "--out", str(out)]) == 0


@pytest.mark.parametrize("name,slug", [("NVIDIA H200", "nvidia-h200"),
                                       ("NVIDIA A100-SXM4-80GB", "nvidia-a100-sxm4-80gb")])
def test_results_file_is_named_after_the_gpu(monkeypatch, name, slug):
    import torch

    gc = _gpu_check()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert gc.device_slug("cuda") == slug
    assert gc.device_slug("cpu") == "cpu-interpreter"
