"""The GPU compile check (``diffaccel.kernels.compile_check``): every Triton kernel, in every configuration
the launchers produce for CUDA, compiles for sm_80 / sm_90 / sm_100 within shared memory, without spills
in 16-bit forward kernels and with tensor-core instructions in 16-bit products.

The launchers are recorded in a subprocess without ``TRITON_INTERPRET`` (compiled kernels are needed);
the compile results come from ``benchmarks/results/compile-check.json``, every configuration under a key
that changes with any kernel source, launcher or table change, and a sample is recompiled here.
"""
import json
import os
import subprocess
import sys

import pytest

from diffaccel.kernels import compile_check, launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = os.path.join(ROOT, "benchmarks", "results", "compile-check.json")
KERNELS = {"_bs_fwd_kernel", "_bs_bwd_dkdv_kernel", "_bs_bwd_dq_kernel", "_moba_gate_kernel", "_state_kernel",
           "_output_kernel", "_delta_kernel", "_dstate_kernel", "_dq_kernel", "_dkv_kernel"}


def _compiled_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), OMP_NUM_THREADS="1")
    return env


def test_every_launch_configuration_compiles_and_fits(tmp_path):
    out = tmp_path / "outcome.json"
    proc = subprocess.run([sys.executable, "-m", "diffaccel.kernels.compile_check", "--against", REPORT,
                           "--sample", "1", "--jobs", "2", "--json", str(out)],
                          env=_compiled_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    outcome = json.loads(out.read_text())
    assert outcome["missing"] == [] and outcome["problems"] == []
    # every kernel of the package, on every architecture, and the sample recompiled identically
    stored = json.load(open(REPORT))["results"]
    assert {r["kernel"] for r in stored} == KERNELS
    assert {r["arch"] for r in stored} == set(launch.ARCHES)
    assert outcome["recorded"] == len(stored)
    assert {s["kernel"] for s in outcome["sample"]} == KERNELS
    assert all(s["same"] for s in outcome["sample"]), outcome["sample"]


def test_a_changed_table_entry_is_a_missing_configuration(tmp_path):
    """The configurations come from the launchers: change a launch setting and the recorded results
    no longer cover it."""
    code = (
        "import json, sys\n"
        "from diffaccel.kernels import compile_check, launch\n"
        "row = launch._ATTN[90, '16bit', False, 128]\n"
        "row['fwd'] = (128, 64, 4, 2)\n"
        "jobs = compile_check.record(archs=(90,), dtypes=('bf16',), head_dims=(128,), cases=('neighborhood',))\n"
        "known = {r['key'] for r in json.load(open(sys.argv[1]))['results']}\n"
        "print(json.dumps([[j['kernel'], j['num_warps'], j['key'] in known] for j in jobs]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, REPORT], env=_compiled_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ["_bs_fwd_kernel", 4, False] in jobs  # the changed forward launch: not in the results
    assert ["_bs_bwd_dq_kernel", 8, True] in jobs  # the untouched backward launches: still there


def _result(**kw):
    base = dict(kernel="_bs_fwd_kernel", arch=90, dtype="bf16", constants={"BLOCK_D": 128}, shared=100_000, regs=200,
                spill_stores=0, mma="wgmma", dot=True)
    base.update(kw)
    return base


@pytest.mark.parametrize("change,flagged", [
    ({}, None),
    ({"shared": launch.SMEM_LIMIT[90] + 1}, "shared memory"),
    ({"arch": 80, "shared": 120_000, "mma": "mma"}, "shared memory"),  # fits A100, not sm_86/89/120
    ({"spill_stores": 4}, "16-bit forward"),
    ({"kernel": "_bs_bwd_dq_kernel", "spill_stores": 4}, "allowed"),
    ({"dtype": "fp32", "spill_stores": 4, "mma": "none"}, "allowed"),
    ({"mma": "none"}, "tensor-core"),
    ({"kernel": "_delta_kernel", "mma": "none", "dot": False}, None),
    ({"error": "CompilationError: boom"}, "does not compile"),
])
def test_problems_flags_what_does_not_fit(change, flagged):
    found = compile_check.problems(_result(**change))
    if flagged is None:
        assert found == []
    else:
        assert len(found) == 1 and flagged in found[0]


def test_summary_table_has_a_row_per_kernel_and_architecture():
    stored = json.load(open(REPORT))["results"]
    table = compile_check.markdown_table(stored)
    assert table.count("\n") == 1 + len(KERNELS) * len(launch.ARCHES)
    assert "| `_bs_fwd_kernel` | sm_90 |" in table


def test_keys_do_not_depend_on_where_triton_is_installed():
    """The stored report is checked in other checkouts and virtual environments (CI's): libdevice's path in the
    compile options must not change a configuration's key."""
    import types

    _bs_fwd_kernel = types.SimpleNamespace(__globals__={})  # no Triton functions around: the key's other parts
    job = dict(kernel="_bs_fwd_kernel", arch=90, signature={}, constexprs=[], attrs=[],
               options={"num_warps": 8, "extern_libs": (("libdevice", "/a/venv/triton/lib/libdevice.10.bc"),)})
    moved = dict(job, options=dict(job["options"], extern_libs=(("libdevice", "/b/lib/libdevice.10.bc"),)))
    other = dict(job, options=dict(job["options"], num_warps=4))
    key = compile_check._job_key(_bs_fwd_kernel, job)
    assert compile_check._job_key(_bs_fwd_kernel, moved) == key
    assert compile_check._job_key(_bs_fwd_kernel, other) != key
