"""Attention benchmarks: every available backend of an op against dense SDPA and
FlexAttention running the same pattern, on the same tensors, in one process.

Each *case* names an op, a size and the pattern's parameters.  For every
backend it reports the median time, peak memory (CUDA: allocator peak; CPU:
peak resident-set growth sampled during the call), the pattern's density
(visible query-key pairs / all pairs), effective TFLOP/s (4·pairs·D·B·H useful
FLOPs per second) and the speedup over dense SDPA.
"""
from __future__ import annotations

import math
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from . import ops
from ._validate import flex_available, triton_available


@dataclass
class Case:
    name: str
    op: str  # neighborhood | local | moba | linear
    grid: tuple
    heads: int
    head_dim: int
    text_len: int = 0
    batch: int = 1
    params: dict = field(default_factory=dict)

    @property
    def tokens(self):
        return math.prod(self.grid) + self.text_len


# --- the ops, from the method registry -------------------------------------------------------------

def specs() -> dict:
    """``{op name: BenchSpec}`` of every registered method with a bench spec."""
    from .registry import methods

    return {m.bench.op: m.bench for m in methods() if m.bench is not None}


def bench_ops() -> list[str]:
    """The op names ``diffaccel bench --op`` accepts."""
    return sorted(specs())


def _spec(op):
    table = specs()
    if op not in table:
        raise ValueError(f"unknown op {op!r}; bench ops: {sorted(table)}")
    return table[op]


def visible_pairs(case):
    """Visible query-key pairs of ``case`` (its pattern's density times tokens squared)."""
    return _spec(case.op).pairs(case)


def _run_op(case, backend, q, k, v):
    return _spec(case.op).run(case, backend, q, k, v)


def _dense(q, k, v):
    return ops.dense_attention(q, k, v)


def _release_freed_memory():
    """Return freed heap memory to the OS (glibc ``malloc_trim``), so that the RSS growth of the next
    call counts every page it touches, including heap chunks it reuses."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _PeakRSS:
    """Peak resident-set growth of this process while the block runs (CPU memory), sampled by a thread
    every 0.5 ms.  Used on a run of its own, never around timed runs: the sampler competes for the
    cores the op runs on."""

    def __enter__(self):
        import psutil

        _release_freed_memory()
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.stop = False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.bytes = self.peak - self.base


def _measure(fn, device, warmup, repeat):
    """``(median seconds over repeat runs, peak memory bytes)``.  On CPU the memory is measured on one
    extra run after the timed ones."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeat):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with _PeakRSS() as mem:
            fn()
        peak = mem.bytes
    return statistics.median(times), peak


def _flex_same_pattern(case, q, k, v):
    """FlexAttention with the op's own mask, when the op has a flex backend."""
    return _run_op(case, "flex", q, k, v)


def run_case(case, device, dtype, backends=None, warmup=1, repeat=3, baselines=("sdpa", "flex")):
    """Benchmark one case; returns a list of result dicts (one per backend / baseline)."""
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (case.batch, case.tokens, case.heads, case.head_dim)
    q, k, v = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    pairs = visible_pairs(case)
    density = pairs / case.tokens ** 2
    useful_flops = 4.0 * pairs * case.head_dim * case.batch * case.heads
    rows = []

    def add(label, fn):
        try:
            with torch.no_grad():
                t, mem = _measure(fn, device, warmup, repeat)
        except Exception as exc:  # a backend that cannot run this case is reported, not fatal
            rows.append(dict(case=case.name, backend=label, error=f"{type(exc).__name__}: {exc}"[:200]))
            return
        rows.append(dict(case=case.name, op=case.op, backend=label, time_ms=t * 1e3, peak_mem_mb=mem / 2 ** 20,
                         density=density, tflops=useful_flops / t / 1e12, tokens=case.tokens))

    if "sdpa" in baselines:
        add("dense-sdpa", lambda: _dense(q, k, v))
    for b in backends or _available_backends(case, device):
        if b == "flex":
            continue  # reported as the FlexAttention baseline below
        add(b, lambda b=b: _run_op(case, b, q, k, v))
    spec = _spec(case.op)
    if "flex" in baselines and spec.flex and flex_available(device):
        add("flex", lambda: _flex_same_pattern(case, q, k, v))
    for r in rows:  # e.g. MoBA on Triton: the share of the gate (scores, selection, tables) in the op's time
        if spec.gate is not None and r["backend"] == "triton" and "time_ms" in r:
            with torch.no_grad():
                t_gate, _ = _measure(lambda: spec.gate(case, q, k), device, warmup, repeat)
            r["gate_ms"] = t_gate * 1e3
            r["gate_share"] = t_gate * 1e3 / r["time_ms"]
    dense = next((r["time_ms"] for r in rows if r["backend"] == "dense-sdpa" and "time_ms" in r), None)
    for r in rows:
        if dense and "time_ms" in r:
            r["speedup_vs_dense"] = dense / r["time_ms"]
    return rows


def _available_backends(case, device):
    return (["triton"] if triton_available(device) else []) + ["torch"]


# --- default suites -------------------------------------------------------------------------------

def default_cases(device, ops_wanted=None):
    """The default suite of ``ops_wanted`` (default: every bench op of the registry) on ``device``."""
    cuda = torch.device(device).type == "cuda"
    table = specs()
    wanted = bench_ops() if ops_wanted is None else list(ops_wanted)
    unknown = [op for op in wanted if op not in table]
    if unknown:
        raise ValueError(f"unknown bench op(s) {unknown}; bench ops: {sorted(table)}")
    return [case for op in wanted for case in table[op].cases(cuda)]


def format_table(rows):
    cols = ["case", "backend", "time_ms", "speedup_vs_dense", "tflops", "peak_mem_mb", "density", "gate_share"]
    fmt = {"time_ms": "{:.2f}", "speedup_vs_dense": "{:.2f}x", "tflops": "{:.3f}", "peak_mem_mb": "{:.1f}",
           "density": "{:.4f}", "gate_share": "{:.1%}"}
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["case"], r["backend"], "error: " + r["error"]] + [""] * (len(cols) - 3))
            continue
        body.append([str(r.get(c, "")) if c not in fmt or c not in r else fmt[c].format(r[c]) for c in cols])
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(x.ljust(w) for x, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_commit():
    """The commit of the checkout this package runs from (``-dirty`` with uncommitted changes), from
    ``DIFFACCEL_COMMIT`` when set (a copy without ``.git``), else None."""
    import os
    import subprocess

    if os.environ.get("DIFFACCEL_COMMIT"):
        return os.environ["DIFFACCEL_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def environment(device):
    import triton

    env = dict(device=device_name(device), torch=torch.__version__, triton=triton.__version__, commit=git_commit(),
               time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if torch.device(device).type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        env.update(cuda=torch.version.cuda, capability=f"sm_{major}{minor}")
    return env


def case_dict(case):
    return asdict(case)
