"""`diffaccel bench`: exact densities, result rows, and the CLI's table and JSON."""
import json
import math

import pytest
import torch

from diffaccel import bench, ops
from diffaccel.cli import main
from diffaccel.kernels.local_ref import local_mask, pooled_grid
from diffaccel.kernels.neighborhood_ref import neighborhood_mask


@pytest.mark.parametrize("grid,params,text", [
    ((9, 11), dict(kernel_size=5), 3),
    ((12, 10), dict(kernel_size=(5, 3), dilation=(2, 1), stride=(2, 1)), 0),
    ((4, 6, 7), dict(kernel_size=(3, 3, 5)), 2),
])
def test_neighborhood_density_counts_the_mask(grid, params, text):
    case = bench.Case("c", "neighborhood", grid, 1, 8, text, params=params)
    g, ks, dil, st = ops.neighborhood_params(grid, params["kernel_size"], params.get("dilation", 1),
                                             params.get("stride", 1))
    assert bench.visible_pairs(case) == int(neighborhood_mask(g, ks, dil, st, text).sum())


@pytest.mark.parametrize("grid,params,text", [
    ((10, 13), dict(radius=3.5), 4),
    ((8, 8), dict(radius=4, down_factor=4), 0),
    ((7, 9), dict(radius=2.0, down_factor=3), 5),
])
def test_local_density_counts_the_mask(grid, params, text):
    case = bench.Case("c", "local", grid, 1, 8, text, params=params)
    n_pooled = math.prod(pooled_grid(grid, params.get("down_factor")))
    assert bench.visible_pairs(case) == int(local_mask(grid, params["radius"], text, n_pooled=n_pooled).sum())


def test_moba_density_counts_the_selection():
    from diffaccel.kernels.moba_ref import moba_mask, moba_select, block_partition

    grid, block = (4, 8, 8), (2, 4, 4)
    case = bench.Case("c", "moba", grid, 2, 8, 0, params=dict(block=block, topk=3))
    q, k = torch.randn(2, 1, 256, 2, 8).unbind(0)
    sel = moba_select(q, k, grid, block, topk=3)
    mask = moba_mask(sel, block_partition(grid, block))
    assert bench.visible_pairs(case) * 2 == int(mask.sum())  # both heads: exactly topk blocks per query


def test_run_case_reports_every_backend_and_speedup():
    case = bench.Case("tiny-na", "neighborhood", (12, 12), 2, 16, 4, params=dict(kernel_size=5))
    rows = bench.run_case(case, "cpu", torch.float32, backends=["torch", "nope"], warmup=0, repeat=2)
    by = {r["backend"]: r for r in rows}
    assert set(by) >= {"dense-sdpa", "torch", "nope"}
    assert "ValueError" in by["nope"]["error"] or "backend" in by["nope"]["error"]
    assert by["dense-sdpa"]["speedup_vs_dense"] == 1.0
    t = by["torch"]
    assert t["time_ms"] > 0 and t["peak_mem_mb"] >= 0
    assert t["speedup_vs_dense"] == pytest.approx(by["dense-sdpa"]["time_ms"] / t["time_ms"])
    assert t["density"] == pytest.approx(bench.visible_pairs(case) / case.tokens ** 2)
    assert "tiny-na" in bench.format_table(rows)


def test_bench_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    main(["bench", "--device", "cpu", "--op", "moba", "linear", "--backend", "torch", "--case", "moba", "linear",
          "--no-baseline", "flex", "--warmup", "0", "--repeat", "1", "--json", str(out)])
    table = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["environment"]["device"].startswith("cpu")
    names = {c["name"] for c in data["cases"]}
    assert names == {r["case"] for r in data["results"]}
    assert any(n.startswith("moba") for n in names) and any(n.startswith("linear") for n in names)
    for r in data["results"]:
        assert "error" not in r, r
        assert r["case"] in table


def test_moba_triton_row_reports_the_gate_share():
    case = bench.Case("tiny-moba", "moba", (2, 8, 8), 2, 16, 3, params=dict(block=(1, 4, 4), topk=2))
    rows = bench.run_case(case, "cpu", torch.float32, backends=["triton"], warmup=0, repeat=1, baselines=())
    (row,) = rows
    assert row["gate_ms"] > 0 and 0 < row["gate_share"] < 2, row  # the gate is part of the op's time
    assert "%" in bench.format_table(rows)
