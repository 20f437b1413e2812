"""MoBA torch backend vs dense SDPA on CPU (docs/moba.md): python docs/snippets/moba_cpu_speed.py <threads>."""
import sys, time, torch, torch.nn.functional as F
from diffaccel import ops
nt = int(sys.argv[1]); torch.set_num_threads(nt)
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 8 * 32 * 32, 4, 64, generator=g) for _ in range(3))
dense = lambda: F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
res = {}
with torch.no_grad():
    fs = {"dense": dense}
    for sel in ("query", "tile", "head"):
        fs[sel] = (lambda sel=sel: ops.moba_attention(q, k, v, (8, 32, 32), (2, 8, 8), topk=8, selection=sel, backend="torch"))
    for f in fs.values(): f()
    best = {n: 1e9 for n in fs}
    for _ in range(7):
        for n, f in fs.items():
            t = time.perf_counter(); f(); best[n] = min(best[n], time.perf_counter() - t)
for n in ("query", "tile", "head"):
    print(f"| `\"{n}\"` | {nt} | {best['dense']*1e3:.0f} ms | {best[n]*1e3:.0f} ms | {best['dense']/best[n]:.1f}× |")
