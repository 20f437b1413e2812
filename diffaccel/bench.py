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
import torch.nn.functional as F

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


# --- densities (exact counts of visible query-key pairs) -----------------------------------------

def _pairs_neighborhood(case):
    from .kernels.neighborhood_ref import axis_window_start

    grid, ks, dil, st = ops.neighborhood_params(case.grid, case.params["kernel_size"], case.params.get("dilation", 1),
                                                case.params.get("stride", 1))
    img = 1
    for n, k, d, s in zip(grid, ks, dil, st):
        _, length = axis_window_start(n, k, d, s)
        img *= int(length.sum())
    n, t = math.prod(grid), case.text_len
    return img + 2 * n * t + t * t


def _pairs_local(case):
    h, w = case.grid
    r = float(case.params["radius"])
    img = 0
    ri = math.ceil(r)
    for dy in range(-ri + 1, ri):
        rem = r * r - dy * dy
        if rem <= 0 or abs(dy) >= h:
            continue
        half = math.ceil(math.sqrt(rem)) - 1  # largest dx with dx^2 < rem
        while (half + 1) ** 2 < rem:
            half += 1
        while half >= 0 and half * half >= rem:
            half -= 1
        xs = sum(max(w - abs(dx), 0) for dx in range(-half, half + 1))
        img += (h - abs(dy)) * xs
    n, t = h * w, case.text_len
    d = case.params.get("down_factor")
    pooled = n * math.ceil(h / d) * math.ceil(w / d) if d else 0
    return img + pooled + 2 * n * t + t * t


def _pairs_moba(case):
    n, t = math.prod(case.grid), case.text_len
    blocks = [math.ceil(g / b) for g, b in zip(case.grid, _per_axis(case.params["block"], len(case.grid)))]
    nb = math.prod(blocks)
    keep = min(case.params.get("topk", nb), nb)
    return int(n * n * keep / nb) + 2 * n * t + t * t  # uniform-block estimate


def _per_axis(x, nd):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,) * nd


def visible_pairs(case):
    if case.op == "neighborhood":
        return _pairs_neighborhood(case)
    if case.op == "local":
        return _pairs_local(case)
    if case.op == "moba":
        return _pairs_moba(case)
    return case.tokens ** 2  # linear attention: report against dense


# --- running ops ---------------------------------------------------------------------------------

def _run_op(case, backend, q, k, v):
    p = dict(case.params)
    if case.op == "neighborhood":
        return ops.neighborhood_attention(q, k, v, case.grid, text_len=case.text_len, backend=backend, **p)
    if case.op == "local":
        return ops.local_attention(q, k, v, case.grid, text_len=case.text_len, backend=backend, **p)
    if case.op == "moba":
        return ops.moba_attention(q, k, v, case.grid, text_len=case.text_len, backend=backend, **p)
    if case.op == "linear":
        return ops.linear_attention(q, k, v, backend=backend)
    raise ValueError(f"unknown op {case.op!r}")


def _moba_gate(case, q, k):
    """Everything the Triton MoBA op does before the attention kernel."""
    from .kernels.moba_triton import gate_tables, kernel_block

    p = dict(case.params)
    grid, block, topk, threshold, selection = ops.moba_params(case.grid, p["block"], p.get("topk"),
                                                               p.get("threshold"), p.get("selection", "query"))
    return gate_tables(q, k, grid, block, topk, threshold, selection, case.text_len, True, kernel_block(block, q))


def _dense(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


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


FLEX_OPS = ("neighborhood", "local")  # ops with a FlexAttention backend (the same mask as our kernels)


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
    if "flex" in baselines and case.op in FLEX_OPS and flex_available(device):
        add("flex", lambda: _flex_same_pattern(case, q, k, v))
    for r in rows:  # MoBA on Triton: the share of the gate (scores, selection, tables) in the op's time
        if case.op == "moba" and r["backend"] == "triton" and "time_ms" in r:
            with torch.no_grad():
                t_gate, _ = _measure(lambda: _moba_gate(case, q, k), device, warmup, repeat)
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

def default_cases(device, ops_wanted=("neighborhood", "local", "moba", "linear")):
    cuda = torch.device(device).type == "cuda"
    cases = []
    if "neighborhood" in ops_wanted:
        if cuda:
            for name, n in (("flux-1k", 64), ("flux-2k", 128), ("flux-4k", 256)):
                cases.append(Case(f"na2d-{name}-w{min(80, n)}", "neighborhood", (n, n), 24, 128, 512,
                                  params=dict(kernel_size=min(80, n))))
            cases.append(Case("na2d-flux-4k-w80-s16", "neighborhood", (256, 256), 24, 128, 512,
                              params=dict(kernel_size=80, stride=16)))
            for name, grid in (("wan-480p", (21, 30, 52)), ("wan-720p", (21, 45, 80))):
                cases.append(Case(f"na3d-{name}", "neighborhood", grid, 12, 128, 0,
                                  params=dict(kernel_size=(9, 15, 15))))
        else:
            cases.append(Case("na2d-128x128-k13", "neighborhood", (128, 128), 4, 64, 0, params=dict(kernel_size=13)))
            cases.append(Case("na2d-64x64-k13-text64", "neighborhood", (64, 64), 4, 64, 64,
                              params=dict(kernel_size=13)))
            cases.append(Case("na3d-8x32x32-k3x9x9", "neighborhood", (8, 32, 32), 4, 64, 0,
                              params=dict(kernel_size=(3, 9, 9))))
    if "local" in ops_wanted and hasattr(ops, "local_attention"):
        if cuda:
            for name, n in (("1k", 64), ("2k", 128), ("4k", 256), ("8k", 512)):
                cases.append(Case(f"clear-flux-{name}-r16", "local", (n, n), 24, 128, 512, params=dict(radius=16)))
        else:
            cases.append(Case("clear-96x96-r8-text64", "local", (96, 96), 4, 64, 64, params=dict(radius=8)))
    if "moba" in ops_wanted and hasattr(ops, "moba_attention"):
        if cuda:
            cases.append(Case("moba-wan-480p", "moba", (21, 30, 52), 12, 128, 0,
                              params=dict(block=(3, 10, 13), topk=6)))
            cases.append(Case("moba-wan-720p", "moba", (21, 45, 80), 12, 128, 0,
                              params=dict(block=(3, 9, 16), topk=26)))
        else:
            cases.append(Case("moba-8x32x32-b2x8x8-top8", "moba", (8, 32, 32), 4, 64, 0,
                              params=dict(block=(2, 8, 8), topk=8)))
    if "linear" in ops_wanted and hasattr(ops, "linear_attention"):
        if cuda:
            for n in (4096, 16384, 65536):
                cases.append(Case(f"linear-{n}", "linear", (n,), 8, 40, 0))
        else:
            cases.append(Case("linear-16384-h8-d40", "linear", (16384,), 8, 40, 0))
    return cases


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
