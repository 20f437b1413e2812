"""The Python side of ``benchmarks/gpu.sh`` (see there and the README's "GPU runs").

    python benchmarks/gpu_check.py shim DIR            # DIR/diffaccel: this checkout as a package, no install
    python benchmarks/gpu_check.py name [--device D]   # results file name of the device, e.g. nvidia-h200
    python benchmarks/gpu_check.py correctness --dtype bf16 --json F [--device D] [--quick]
    python benchmarks/gpu_check.py report --bench F --correctness F... --out F

``correctness`` runs every op on the Triton backend (the user's front door, ``diffaccel.ops``) on small
shapes, forward and backward, against the plain PyTorch references in ``diffaccel.kernels``:
``rel = |out - ref| / |ref|`` (Frobenius norms) for the output and the gradients of q, k, v (and CLEAR's
pool weight), NaN or Inf never passing.  Before every call the CUDA caching allocator's free memory is
filled with NaN, so an output element the kernels never write shows up.  MoBA's block selection may
differ from the reference's where two gate scores tie to the last bits (different summation order): at
most 0.5% of a case's query rows may then exceed the tolerance, and the gradients are compared only when
none does.  ``--quick`` (what ``gpu.sh --cpu`` and the tests use): tiny shapes, for Triton's CPU interpreter.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# relative error bounds: output, gradients
TOLERANCE = {"fp32": (1e-4, 5e-4), "fp16": (5e-3, 1e-2), "bf16": (2e-2, 4e-2)}
MOBA_TIE_ROWS = 0.005


def cmd_shim(args):
    """``DIR/diffaccel``: links to this checkout's ``diffaccel/*``, with ``kernels`` and ``pipelines`` as its
    subpackages (what ``pip install`` would lay out), so ``PYTHONPATH=DIR`` imports this checkout."""
    pkg = os.path.join(args.dir, "diffaccel")
    os.makedirs(pkg, exist_ok=True)
    for name in os.listdir(os.path.join(ROOT, "diffaccel")):
        if name != "__pycache__":
            os.symlink(os.path.join(ROOT, "diffaccel", name), os.path.join(pkg, name))
    for sub in ("kernels", "pipelines"):
        if not os.path.exists(os.path.join(pkg, sub)):
            os.symlink(os.path.join(ROOT, sub), os.path.join(pkg, sub))
    return 0


def device_slug(device):
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return "cpu-interpreter"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def cmd_name(args):
    print(device_slug(args.device))
    return 0


# ---------------------------------------------------------------------------------------------
# correctness
# ---------------------------------------------------------------------------------------------

def _cases(quick):
    """``(name, op, kwargs, grid, text_len)``: every op and its main variants, small shapes."""
    if quick:
        return [
            ("neighborhood-2d-text", "neighborhood", dict(kernel_size=3, text_first=False), (5, 6), 3),
            ("local-text-pooled", "local", dict(radius=2.5, down_factor=2), (6, 6), 2),
            ("moba-query-topk", "moba", dict(block=(2, 4), topk=2), (4, 8), 0),
            ("linear", "linear", {}, (30,), 0),
        ]
    return [
        ("neighborhood-1d-text-after", "neighborhood", dict(kernel_size=9, text_first=False), (300,), 20),
        ("neighborhood-2d-text", "neighborhood", dict(kernel_size=7), (24, 20), 16),
        ("neighborhood-2d-dilation-stride", "neighborhood", dict(kernel_size=(5, 7), dilation=(2, 1),
                                                                 stride=(1, 3)), (20, 24), 0),
        ("neighborhood-3d", "neighborhood", dict(kernel_size=(3, 5, 5)), (4, 12, 10), 8),
        ("local-text", "local", dict(radius=6.5), (24, 24), 16),
        ("local-pooled", "local", dict(radius=4, down_factor=4, text_first=False), (20, 28), 8),
        ("moba-query-topk", "moba", dict(block=(2, 8, 8), topk=3), (4, 16, 16), 0),
        ("moba-query-threshold-text", "moba", dict(block=(2, 8, 8), threshold=0.5), (4, 16, 16), 12),
        ("moba-small-blocks", "moba", dict(block=(4, 4), topk=5), (20, 20), 0),
        ("moba-tile", "moba", dict(block=(1, 8, 8), topk=2, selection="tile"), (4, 16, 16), 0),
        ("moba-head", "moba", dict(block=(2, 8, 8), threshold=0.3, selection="head"), (4, 16, 16), 0),
        ("linear-self", "linear", {}, (700,), 0),
        ("linear-cross", "linear", {"sk": 333}, (500,), 0),
    ]


def _run(op, q, k, v, grid, text_len, kw, backend, pool_weight=None):
    from diffaccel import ops

    kw = dict(kw)
    if op == "neighborhood":
        return ops.neighborhood_attention(q, k, v, grid, text_len=text_len, backend=backend, **kw)
    if op == "local":
        return ops.local_attention(q, k, v, grid, text_len=text_len, backend=backend, pool_weight=pool_weight, **kw)
    if op == "moba":
        return ops.moba_attention(q, k, v, grid, text_len=text_len, backend=backend, **kw)
    kw.pop("sk", None)
    return ops.linear_attention(q, k, v, backend=backend)


def _reference(op, q, k, v, grid, text_len, kw, pool_weight=None):
    from diffaccel import ops
    from diffaccel.kernels import linear_attention_ref, local_ref, moba_ref, neighborhood_ref
    from diffaccel.kernels.reference import masked_attention_reference

    kw = dict(kw)
    text_first = kw.pop("text_first", True)
    scale = q.shape[-1] ** -0.5
    f = [t.float() for t in (q, k, v)]
    if op == "neighborhood":
        g, ks, dil, st = ops.neighborhood_params(grid, kw["kernel_size"], kw.get("dilation", 1), kw.get("stride", 1))
        return neighborhood_ref.neighborhood_reference(*f, g, ks, dil, st, text_len, text_first, scale)
    if op == "local":
        return local_ref.local_reference(*f, grid, kw["radius"], text_len, text_first, kw.get("down_factor"),
                                         pool_weight, scale)
    if op == "moba":
        g, block, topk, threshold, selection = ops.moba_params(grid, kw["block"], kw.get("topk"), kw.get("threshold"),
                                                               kw.get("selection", "query"))
        # the selection from the inputs as given (their dtype), the attention in fp32
        sel = moba_ref.moba_select(q.detach(), k.detach(), g, block, topk, threshold, selection, text_len, text_first)
        mask = moba_ref.moba_mask(sel, moba_ref.block_partition(g, block, q.device), text_len, text_first)
        return masked_attention_reference(*f, mask, scale)
    return linear_attention_ref.linear_attention_reference(*f)


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    if not bool(a.isfinite().all()):
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _poison(device):
    """Fill the caching allocator's free blocks with NaN (large and small pools)."""
    import torch

    if device.type != "cuda":
        return
    big = torch.full((1 << 24,), float("nan"), device=device)
    small = [torch.full((1 << 15,), float("nan"), device=device) for _ in range(32)]
    del big, small


def check_case(case, dtype_name, device, head_dim, seed, quick=False):
    import torch

    name, op, kw, grid, text_len = case
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    tol_out, tol_grad = TOLERANCE[dtype_name]
    g = torch.Generator().manual_seed(seed)
    kw = dict(kw)
    sk = kw.pop("sk", None)
    s = math.prod(grid) + text_len
    batch, heads = (1, 1) if quick else (2, 3)
    q = torch.randn(batch, s, heads, head_dim, generator=g)
    k = torch.randn(batch, sk or s, heads, head_dim, generator=g)
    v = torch.randn(batch, sk or s, heads, head_dim, generator=g)
    q, k, v = (t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v))
    pool_weight = None
    if op == "local" and kw.get("down_factor"):
        d = kw["down_factor"]
        pool_weight = (torch.rand(d, d, generator=g) / (d * d)).to(device).requires_grad_()
    dout = torch.randn(batch, s, heads, head_dim, generator=g).to(device=device, dtype=dtype)
    row = dict(case=name, op=op, dtype=dtype_name, head_dim=head_dim, tokens=s)
    t0 = time.perf_counter()
    try:
        _poison(device)
        out = _run(op, q, k, v, grid, text_len, kw, "triton", pool_weight)
        ins = [q, k, v] + ([pool_weight] if pool_weight is not None else [])
        _poison(device)
        grads = torch.autograd.grad(out, ins, dout)
        ref = _reference(op, q, k, v, grid, text_len, kw, pool_weight)
        ref_grads = torch.autograd.grad(ref, ins, dout.float())
    except Exception as exc:  # reported, and the check fails
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500], seconds=round(time.perf_counter() - t0, 2))
        return row
    ok = True
    if op == "moba":
        # rows beyond the tolerance: only near-tie selections may differ, a few at most
        o, r = out.detach().double(), ref.detach().double()
        per_row = (o - r).norm(dim=-1) / r.norm(dim=-1).clamp_min(1e-30)
        bad = ~(per_row <= 4 * tol_out)  # NaN counts as bad
        row["rows_off"] = int(bad.sum())
        ok &= row["rows_off"] <= MOBA_TIE_ROWS * bad.numel()
        keep = ~bad[..., None]
        row["out_rel"] = _rel(torch.where(keep, out.float(), 0), torch.where(keep, ref.float(), 0))
        ok &= bool(out.isfinite().all())
    else:
        row["out_rel"] = _rel(out, ref)
    ok &= row["out_rel"] <= tol_out
    if row.get("rows_off", 0) == 0:
        names = ["dq", "dk", "dv", "dpool"][:len(ins)]
        for n, a, b in zip(names, grads, ref_grads):
            row[n + "_rel"] = _rel(a, b)
            ok &= row[n + "_rel"] <= tol_grad
    row.update(ok=bool(ok), seconds=round(time.perf_counter() - t0, 2))
    return row


def cmd_correctness(args):
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("Triton on CPU needs TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    head_dims = args.head_dim
    rows = []
    for dt in args.dtype:
        for d in head_dims:
            for i, case in enumerate(_cases(args.quick)):
                row = check_case(case, dt, device, d, seed=1000 * d + i, quick=args.quick)
                rows.append(row)
                status = "ok  " if row["ok"] else "FAIL"
                detail = row.get("error") or " ".join(f"{k}={row[k]:.1e}" for k in row if k.endswith("_rel"))
                print(f"{status} {dt} d={d} {row['case']}: {detail} ({row['seconds']} s)", flush=True)
    if args.json:
        _write_json(args.json, dict(device=str(device), rows=rows))
    return 0 if all(r["ok"] for r in rows) else 1


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

def _write_json(path, payload):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def summary(payload):
    """The one-screen text of a results file."""
    env = payload["environment"]
    lines = [f"{env.get('device')}  torch {env.get('torch')}  triton {env.get('triton')}  "
             f"commit {(env.get('commit') or 'unknown')[:12]}  {env.get('time')}", ""]
    rows = payload.get("correctness", [])
    dtypes = [d for d in ("fp16", "bf16", "fp32") if any(r["dtype"] == d for r in rows)]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    n_ok = sum(r["ok"] for r in rows)
    lines.append(f"correctness vs the references: {n_ok}/{len(rows)} ok (worst rel. error over outputs and "
                 f"gradients, all head dims)")
    lines.append(f"{'case':34s}" + "".join(f"{d:>14s}" for d in dtypes))
    for c in cases:
        cells = []
        for d in dtypes:
            rs = [r for r in rows if r["case"] == c and r["dtype"] == d]
            if not rs:
                cells.append("-")
                continue
            worst = max((r[k] for r in rs for k in r if k.endswith("_rel")), default=float("nan"))
            tag = "ok" if all(r["ok"] for r in rs) else "FAIL"
            cells.append(f"{tag} {worst:.1e}" if not any("error" in r for r in rs) else "ERROR")
        lines.append(f"{c:34s}" + "".join(f"{x:>14s}" for x in cells))
    bench = [r for r in payload.get("results", []) if "time_ms" in r]
    if payload.get("results"):
        lines += ["", f"benchmark ({payload.get('dtype')}, median ms; speedup = dense SDPA time / time)",
                  f"{'case':28s}{'triton':>9s}{'sdpa':>9s}{'flex':>9s}{'speedup':>9s}{'vs flex':>9s}{'TFLOP/s':>9s}"]
        for c in dict.fromkeys(r["case"] for r in payload["results"]):
            by = {r["backend"]: r for r in bench if r["case"] == c}
            t = by.get("triton")
            cell = lambda r, k="time_ms": f"{r[k]:9.2f}" if r else f"{'-':>9s}"  # noqa: E731
            vs_flex = f"{by['flex']['time_ms'] / t['time_ms']:8.2f}x" if t and "flex" in by else f"{'-':>9s}"
            speed = f"{t['speedup_vs_dense']:8.2f}x" if t and "speedup_vs_dense" in t else f"{'-':>9s}"
            lines.append(f"{c:28s}{cell(t)}{cell(by.get('dense-sdpa'))}{cell(by.get('flex'))}{speed}{vs_flex}"
                         f"{cell(t, 'tflops') if t else '-':>9s}")
        errors = [r for r in payload["results"] if "error" in r]
        for r in errors:
            lines.append(f"  error: {r['case']} {r['backend']}: {r['error'][:90]}")
    return "\n".join(lines)


def cmd_report(args):
    with open(args.bench) as f:
        payload = json.load(f)
    rows = []
    for path in args.correctness:
        with open(path) as f:
            rows += json.load(f)["rows"]
    payload["correctness"] = rows
    payload["command"] = "bash benchmarks/gpu.sh" + (" --cpu" if args.cpu else "")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    _write_json(args.out, payload)
    print(summary(payload))
    print(f"\nwrote {args.out}")
    return 0 if rows and all(r["ok"] for r in rows) and not any("error" in r for r in payload["results"]) else 1


def main(argv=None):
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("shim")
    s.add_argument("dir")
    s.set_defaults(func=cmd_shim)
    s = sub.add_parser("name")
    s.add_argument("--device", default="cuda")
    s.set_defaults(func=cmd_name)
    s = sub.add_parser("correctness")
    s.add_argument("--device")
    s.add_argument("--dtype", nargs="+", default=["fp16", "bf16", "fp32"], choices=list(TOLERANCE))
    s.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    s.add_argument("--quick", action="store_true", help="tiny shapes (Triton's CPU interpreter)")
    s.add_argument("--json")
    s.set_defaults(func=cmd_correctness)
    s = sub.add_parser("report")
    s.add_argument("--bench", required=True)
    s.add_argument("--correctness", nargs="+", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--cpu", action="store_true", help="the results of gpu.sh --cpu")
    s.set_defaults(func=cmd_report)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
