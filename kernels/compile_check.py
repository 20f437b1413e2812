"""Compile every Triton kernel of the package for GPU targets, on any machine (no GPU needed).

    python -m diffaccel.kernels.compile_check                 # compile everything, check, print the table
    python -m diffaccel.kernels.compile_check --write FILE    # ... and record the results in FILE
    python -m diffaccel.kernels.compile_check --against FILE  # what the test suite runs (see below)

1. **Record.**  The package's own launchers (``neighborhood_triton``, ``local_triton``, ``moba_triton``,
   ``linear_attention_triton``) run forward and backward on small CPU tensors under
   ``launch.simulate_cuda(arch)``, with Triton's ``JITFunction.run`` replaced by a recorder: every
   ``kernel[grid](...)`` launch becomes what Triton would compile for that GPU (signature,
   constexprs, integer specialisations, ``num_warps``/``num_stages``), through Triton's own binder.
   Nothing runs.  Launches that differ only in integer specialisations (which change address
   arithmetic, not tiles) count as one *configuration*; the first one recorded is compiled.
2. **Compile.**  Each configuration goes through ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``
   down to a cubin (bundled ``ptxas``) in a process pool: shared memory (Triton's allocation),
   registers, spills and stack (``ptxas -v``), and the matrix instructions in the PTX.
3. **Check** (:func:`problems`): compiled; shared memory within ``launch.SMEM_LIMIT``; no spills in
   16-bit forward kernels (backward spills only up to ``launch.ALLOWED_SPILLS``); tensor-core
   instructions in every 16-bit kernel that multiplies matrices.

Compiling every configuration takes minutes per architecture, so the results are recorded
(``--write benchmarks/results/compile-check.json``) and the test suite runs ``--against`` that file:
it records the configurations again (seconds), requires every one of them in the file under the same
key (a hash of the kernel module's Triton sources, the configuration, the options, the architecture
and the Triton version: any change to a kernel, a launcher or a table makes a configuration
*missing*), checks every recorded result, and recompiles a sample (the heaviest configuration of
each kernel, architectures in turn) to confirm the file's numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import math
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from . import launch

FORWARD_KERNELS = ("_bs_fwd_kernel", "_state_kernel", "_output_kernel", "_moba_gate_kernel")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
HEAD_DIMS = (64, 128, 256)


# ---------------------------------------------------------------------------------------------
# 1. record
# ---------------------------------------------------------------------------------------------

def _qkv(s, h, d, dtype, seed=0, sk=None):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, h, d, generator=g).to(dtype).requires_grad_() for n in (s, sk or s, sk or s)]


def _fwd_bwd(fn, q, k, v):
    out = fn(q, k, v)
    out.backward(torch.ones_like(out))


def _neighborhood(dtype, d):
    from .neighborhood_triton import neighborhood_triton

    grid, text = (24, 20), 8
    _fwd_bwd(lambda q, k, v: neighborhood_triton(q, k, v, grid, (7, 7), (1, 1), (1, 1), text, True, d ** -0.5),
             *_qkv(text + math.prod(grid), 2, d, dtype))
    grid = (4, 8, 10)
    _fwd_bwd(lambda q, k, v: neighborhood_triton(q, k, v, grid, (3, 5, 5), (1, 2, 1), (1, 1, 2), 0, True, d ** -0.5),
             *_qkv(math.prod(grid), 2, d, dtype))


def _local(dtype, d):
    from .local_torch import pool_tokens
    from .local_triton import local_triton

    grid, text = (24, 24), 8
    q, k, v = _qkv(text + math.prod(grid), 2, d, dtype)
    w = torch.full((4, 4), 1 / 16)

    def fn(q, k, v):
        kx, vx = (pool_tokens(t, grid, 4, w, text, False) for t in (k, v))
        return local_triton(q, k, v, grid, 5.0, text, False, kx, vx, d ** -0.5)

    _fwd_bwd(fn, q, k, v)


def _moba(dtype, d):
    from .moba_triton import moba_triton

    grid = (32, 32)
    # MoBA blocks of 16, 32, 64 and 128 tokens: every kernel block the launcher picks
    for block in ((4, 4), (4, 8), (8, 8), (8, 16)):
        for topk, threshold in ((3, None), (None, 0.4)):
            _fwd_bwd(lambda q, k, v: moba_triton(q, k, v, grid, block, topk, threshold, "query", 0, True,
                                                 d ** -0.5), *_qkv(math.prod(grid), 2, d, dtype))
    # more MoBA blocks than the gate's chunk of candidates
    _fwd_bwd(lambda q, k, v: moba_triton(q, k, v, (16, 40), (1, 2), 4, None, "query", 0, True, d ** -0.5),
             *_qkv(640, 2, d, dtype))


def _linear(dtype, d):
    from .linear_attention_triton import linear_attention_triton

    _fwd_bwd(lambda q, k, v: linear_attention_triton(q, k, v, 1e-4), *_qkv(300, 2, d, dtype, sk=500))


CASES = {"neighborhood": _neighborhood, "local": _local, "moba": _moba, "linear": _linear}


def _module_sources(fn):
    """Hash of every Triton function in the kernel's module (what its compiled code can depend on)."""
    from triton.runtime.jit import JITFunction

    srcs = sorted(f"{name}:{obj.src}" for name, obj in fn.__globals__.items() if isinstance(obj, JITFunction))
    return hashlib.sha256("\n".join(srcs).encode()).hexdigest()


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    return str(x)


class _Recorder:
    """Replaces ``JITFunction.run``: turns a launch into a compile job for the simulated architecture."""

    def __init__(self):
        self.jobs = {}  # configuration -> job
        self._binders = {}

    def run(self, fn, *args, grid, warmup, **kwargs):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        arch = launch.cuda_arch("cpu")
        if (fn, arch) not in self._binders:
            backend = make_backend(GPUTarget("cuda", arch, 32))
            self._binders[fn, arch] = backend, create_function_from_signature(fn.signature, fn.params, backend)
        backend, binder = self._binders[fn, arch]
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        names = [p.name for p in fn.params]
        own = {names[path[0]]: value for path, value in constexprs.items()
               if len(path) == 1 and fn.params[path[0]].is_constexpr}
        pointers = {k: v for k, v in signature.items() if isinstance(v, str) and v.startswith("*")}
        config = (fn.module, fn.__name__, arch, tuple(sorted(own.items())), tuple(sorted(pointers.items())),
                  options.num_warps, options.num_stages)
        if config not in self.jobs:
            job = dict(module=fn.module, kernel=fn.__name__, arch=arch, signature=dict(signature),
                       constexprs=[[list(k), v] for k, v in constexprs.items()],
                       attrs=[[list(k), v] for k, v in attrs.items()], options=dict(options.__dict__),
                       constants=own, num_warps=options.num_warps, num_stages=options.num_stages,
                       dtype=_dtype_of(pointers))
            job["key"] = _job_key(fn, job)
            self.jobs[config] = job
        return None


def _dtype_of(pointers):
    kinds = {v[1:] for v in pointers.values()} & {"fp16", "bf16", "fp32"}
    for k in ("fp16", "bf16"):
        if k in kinds:
            return k
    return "fp32"


def _portable_options(options):
    """The compile options without what depends on where Triton is installed (libdevice's path: its file name
    stays), so that keys agree between checkouts and virtual environments."""
    out = dict(options)
    if out.get("extern_libs"):
        out["extern_libs"] = [[name, os.path.basename(str(path))] for name, path in out["extern_libs"]]
    return out


def _job_key(fn, job):
    import triton

    payload = [_module_sources(fn), job["kernel"], job["arch"], job["signature"], job["constexprs"], job["attrs"],
               _portable_options(job["options"]), triton.__version__]
    return hashlib.sha256(json.dumps(_jsonable(payload), sort_keys=True).encode()).hexdigest()[:24]


def record(archs=launch.ARCHES, dtypes=tuple(DTYPES), head_dims=HEAD_DIMS, cases=tuple(CASES)):
    """Compile jobs of every configuration the launchers produce (a list, in recording order)."""
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the compile check needs compiled kernels: unset TRITON_INTERPRET")
    rec = _Recorder()
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        return rec.run(self, *args, grid=grid, warmup=warmup, **kwargs)

    JITFunction.run = run
    try:
        for arch in archs:
            with launch.simulate_cuda(arch):
                for dt in dtypes:
                    for d in head_dims:
                        for case in cases:
                            with torch.random.fork_rng():
                                CASES[case](DTYPES[dt], d)
    finally:
        JITFunction.run = original
    for job in rec.jobs.values():
        job["head_dim"] = job["constants"].get("BLOCK_D")
    return list(rec.jobs.values())


# ---------------------------------------------------------------------------------------------
# 2. compile
# ---------------------------------------------------------------------------------------------

_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def compile_job(job):
    """Compile one job for its architecture; the job's identity plus what the compiler reports."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = {k: job[k] for k in ("key", "kernel", "arch", "dtype", "constants", "num_warps", "num_stages")}
    t0 = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(job["module"]), job["kernel"])
        src = ASTSource(fn, job["signature"], {tuple(k): v for k, v in job["constexprs"]},
                        {tuple(k): v for k, v in job["attrs"]})
        knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
        text = log.getvalue()
        for name, pattern in _PTXAS.items():
            m = pattern.search(text)
            out[name] = int(m.group(1)) if m else 0
        out["shared"] = int(kernel.metadata.shared)
        ptx = kernel.asm["ptx"]
        out["mma"] = ("tcgen05" if "tcgen05.mma" in ptx else "wgmma" if "wgmma.mma_async" in ptx
                      else "mma" if "mma.sync" in ptx else "none")
        out["dot"] = "tl.dot" in fn.src or any("tl.dot" in f.src for f in _helpers(fn))
    except Exception as exc:  # a compile error is a result: the check reports it
        out["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _helpers(fn):
    from triton.runtime.jit import JITFunction

    return [obj for name, obj in fn.__globals__.items() if isinstance(obj, JITFunction) and name in fn.src]


def compile_jobs(jobs, workers=None, cache_dir=None):
    """Compile ``jobs`` in a process pool (``workers``: default the CPU count), each compile really run
    (a fresh Triton cache: a cache hit would skip ptxas and its report)."""
    import tempfile

    if not jobs:
        return []
    with tempfile.TemporaryDirectory(prefix="diffaccel-compile-") as tmp:
        os.environ["TRITON_CACHE_DIR"] = cache_dir or tmp
        workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
        if workers == 1:
            return [compile_job(j) for j in jobs]
        # heaviest first (backward kernels), so the pool does not end on one long compile
        order = sorted(range(len(jobs)), key=lambda i: ("bwd" not in jobs[i]["kernel"], i))
        with ProcessPoolExecutor(workers) as pool:
            results = dict(zip(order, pool.map(compile_job, [jobs[i] for i in order])))
        return [results[i] for i in range(len(jobs))]


# ---------------------------------------------------------------------------------------------
# 3. check
# ---------------------------------------------------------------------------------------------

def problems(result):
    """What is wrong with one compiled configuration (empty list: it fits)."""
    where = f"{result['kernel']} sm_{result['arch']} {result['dtype']} {result['constants']}"
    if "error" in result:
        return [f"{where}: does not compile: {result['error'][:300]}"]
    out = []
    limit = launch.SMEM_LIMIT[launch.arch_class(result["arch"])]
    if result["shared"] > limit:
        out.append(f"{where}: needs {result['shared']} B of shared memory, sm_{result['arch']} allows {limit}")
    sixteen = result["dtype"] != "fp32"
    spills = result["spill_stores"]
    if spills:
        allowed = launch.allowed_spills(result["kernel"], result["arch"], result["dtype"],
                                        result["constants"].get("BLOCK_D"))
        if result["kernel"] in FORWARD_KERNELS and sixteen:
            out.append(f"{where}: spills {spills} B in a 16-bit forward kernel")
        elif spills > allowed:
            out.append(f"{where}: spills {spills} B (allowed: {allowed} B, launch.ALLOWED_SPILLS)")
    if sixteen and result.get("dot") and result["mma"] == "none":
        out.append(f"{where}: no tensor-core instruction (mma/wgmma/tcgen05) in a 16-bit kernel")
    return out


# ---------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------

def summary_rows(results):
    """One row per (kernel, arch): configurations, worst shared memory / registers / spills, matrix
    instructions of the 16-bit and fp32 configurations."""
    rows = {}
    for r in results:
        if "error" in r:
            continue
        row = rows.setdefault((r["kernel"], r["arch"]), dict(kernel=r["kernel"], arch=r["arch"], configs=0, shared=0,
                                                             regs=0, spills16=0, spills32=0, mma16=set(),
                                                             mma32=set()))
        row["configs"] += 1
        row["shared"] = max(row["shared"], r["shared"])
        row["regs"] = max(row["regs"], r["regs"])
        key = "32" if r["dtype"] == "fp32" else "16"
        row["spills" + key] = max(row["spills" + key], r["spill_stores"])
        row["mma" + key].add(r["mma"])
    out = []
    for key in sorted(rows, key=lambda k: (_kernel_order(k[0]), k[1])):
        row = rows[key]
        row["mma16"], row["mma32"] = ("/".join(sorted(row[m])) or "-" for m in ("mma16", "mma32"))
        out.append(row)
    return out


def _kernel_order(name):
    order = ["_bs_fwd_kernel", "_bs_bwd_dkdv_kernel", "_bs_bwd_dq_kernel", "_moba_gate_kernel", "_state_kernel",
             "_output_kernel", "_delta_kernel", "_dstate_kernel", "_dq_kernel", "_dkv_kernel"]
    return order.index(name) if name in order else len(order)


def markdown_table(results):
    lines = ["| kernel | arch | configs | max shared (KB) | max regs | max spill (B) 16-bit / fp32 | "
             "matrix instr. 16-bit / fp32 |", "|---|---|---|---|---|---|---|"]
    for r in summary_rows(results):
        lines.append(f"| `{r['kernel']}` | sm_{r['arch']} | {r['configs']} | {r['shared'] / 1024:.0f} | {r['regs']} | "
                     f"{r['spills16']} / {r['spills32']} | {r['mma16']} / {r['mma32']} |")
    return "\n".join(lines)


def _sample(jobs, known):
    """The heaviest configuration (most shared memory recorded) of each kernel, architectures in turn."""
    by_kernel = {}
    for job in jobs:
        by_kernel.setdefault(job["kernel"], []).append(job)
    picks = []
    for i, name in enumerate(sorted(by_kernel, key=_kernel_order)):
        arch = launch.ARCHES[i % len(launch.ARCHES)]
        cands = [j for j in by_kernel[name] if j["arch"] == arch] or by_kernel[name]
        picks.append(max(cands, key=lambda j: (known.get(j["key"], {}).get("shared", 0), j["key"])))
    return picks


def main(argv=None):
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (and its warning silenced)
    p = argparse.ArgumentParser(prog="python -m diffaccel.kernels.compile_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(launch.ARCHES), choices=launch.ARCHES)
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--head-dim", type=int, nargs="+", default=list(HEAD_DIMS))
    p.add_argument("--case", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--kernel", nargs="+", help="only these kernels")
    p.add_argument("--jobs", type=int, help="parallel compiles (default: CPU count)")
    p.add_argument("--write", help="compile everything and write the results to this JSON file")
    p.add_argument("--update", action="store_true",
                   help="with --write: keep the file's results whose key is unchanged, compile the rest")
    p.add_argument("--against", help="check the recorded results in this file instead of compiling everything")
    p.add_argument("--sample", type=int, default=1, help="with --against: recompile a sample (0: none)")
    p.add_argument("--json", help="write this run's outcome (missing, problems, sample) as JSON")
    p.add_argument("--list", action="store_true", help="only list the recorded configurations")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    jobs = record(tuple(args.arch), tuple(args.dtype), tuple(args.head_dim), tuple(args.case))
    if args.kernel:
        jobs = [j for j in jobs if j["kernel"] in args.kernel]
    t_record = time.perf_counter() - t0
    print(f"recorded {len(jobs)} configurations in {t_record:.1f} s", file=sys.stderr)
    if args.list:
        for j in jobs:
            print(j["kernel"], f"sm_{j['arch']}", j["dtype"], j["constants"], j["num_warps"], j["num_stages"])
        return 0
    outcome = dict(recorded=len(jobs), record_seconds=round(t_record, 1), missing=[], problems=[], sample=[])
    if args.against:
        with open(args.against) as f:
            stored = json.load(f)
        import triton

        if stored.get("triton") != triton.__version__:
            print(f"{args.against} was written with Triton {stored.get('triton')}, this is {triton.__version__}: "
                  f"rerun with --write", file=sys.stderr)
            return 2
        known = {r["key"]: r for r in stored["results"]}
        outcome["missing"] = [f"{j['kernel']} sm_{j['arch']} {j['dtype']} {j['constants']}"
                              for j in jobs if j["key"] not in known]
        results = [known[j["key"]] for j in jobs if j["key"] in known]
        if args.sample:
            t1 = time.perf_counter()
            sample = _sample([j for j in jobs if j["key"] in known], known)
            fresh = compile_jobs(sample, args.jobs)
            for new in fresh:
                old = known[new["key"]]
                same = all(new.get(k) == old.get(k) for k in ("shared", "regs", "spill_stores", "mma", "error"))
                outcome["sample"].append(dict(kernel=new["kernel"], arch=new["arch"], dtype=new["dtype"],
                                              seconds=new["seconds"], same=same,
                                              **{k: new.get(k) for k in ("shared", "regs", "spill_stores", "mma",
                                                                         "error")}))
            outcome["sample_seconds"] = round(time.perf_counter() - t1, 1)
    else:
        kept = {}
        if args.update and args.write and os.path.exists(args.write):
            with open(args.write) as f:
                kept = {r["key"]: r for r in json.load(f)["results"]}
        todo = [j for j in jobs if j["key"] not in kept]
        t1 = time.perf_counter()
        fresh = {r["key"]: r for r in compile_jobs(todo, args.jobs)}
        outcome["compile_seconds"] = round(time.perf_counter() - t1, 1)
        outcome["compiled"] = len(todo)
        print(f"compiled {len(todo)} configurations in {outcome['compile_seconds']} s "
              f"({len(jobs) - len(todo)} unchanged)", file=sys.stderr)
        results = [fresh[j["key"]] if j["key"] in fresh else kept[j["key"]] for j in jobs]
    for r in results:
        outcome["problems"] += problems(r)
    print(markdown_table(results))
    for line in outcome["missing"]:
        print("missing from", args.against, ":", line)
    for line in outcome["problems"]:
        print("PROBLEM:", line)
    for s in outcome["sample"]:
        print("recompiled:", s["kernel"], f"sm_{s['arch']}", s["dtype"], "same" if s["same"] else "DIFFERENT",
              f"({s['seconds']} s)")
    if args.write:
        import triton

        payload = dict(triton=triton.__version__, command="python -m diffaccel.kernels.compile_check "
                       + " ".join(argv if argv is not None else sys.argv[1:]),
                       smem_limits={f"sm_{a}": launch.SMEM_LIMIT[a] for a in args.arch},
                       compile_seconds=outcome.get("compile_seconds"), results=results)
        tmp = args.write + ".tmp"
        with open(tmp, "w") as f:
            json.dump(_jsonable(payload), f, indent=1)
        os.replace(tmp, args.write)
        print(f"wrote {args.write}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_jsonable(outcome), f, indent=1)
    bad = outcome["missing"] or outcome["problems"] or not all(s["same"] for s in outcome["sample"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
