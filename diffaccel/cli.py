"""The ``diffaccel`` console script."""
from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _cmd_bench(args):
    from . import bench

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    cases = bench.default_cases(device, tuple(args.op))
    if args.case:
        cases = [c for c in cases if any(s in c.name for s in args.case)]
        if not cases:
            raise SystemExit(f"--case {args.case} matches none of the default cases")
    backends = args.backend or None
    rows = []
    for case in cases:
        print(f"# {case.name}: {case.op} grid={case.grid} text={case.text_len} heads={case.heads} "
              f"head_dim={case.head_dim} {case.params}", file=sys.stderr, flush=True)
        rows += bench.run_case(case, device, dtype, backends=backends, warmup=args.warmup, repeat=args.repeat,
                               baselines=tuple(b for b in ("sdpa", "flex") if b not in args.no_baseline))
    print(bench.format_table(rows))
    if args.json:
        payload = dict(environment=bench.environment(device), dtype=str(dtype).replace("torch.", ""),
                       cases=[bench.case_dict(c) for c in cases], results=rows)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="diffaccel", description="Fast attention patterns for diffusers.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="benchmark attention ops against dense SDPA and FlexAttention")
    from . import bench

    ops_ = bench.bench_ops()
    b.add_argument("--op", nargs="+", default=ops_, choices=ops_, help="ops to benchmark (default: all)")
    b.add_argument("--case", nargs="+", help="only cases whose name contains one of these strings")
    b.add_argument("--backend", nargs="+", choices=["triton", "torch"], help="backends (default: all available)")
    b.add_argument("--no-baseline", nargs="*", default=[], choices=["sdpa", "flex"], help="skip these baselines")
    b.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    b.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    b.add_argument("--warmup", type=int, default=1)
    b.add_argument("--repeat", type=int, default=3)
    b.add_argument("--json", help="also write the results as JSON to this file")
    b.set_defaults(func=_cmd_bench)

    # subcommands of higher layers (the pipelines layer: generate, eval, train-small) plug in through the
    # "diffaccel.cli" entry point group, so this package never imports the layer above it
    for ep in sorted(entry_points(group="diffaccel.cli"), key=lambda e: e.name):
        ep.load()(sub)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line as given (train-small records it with the model it trains)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
