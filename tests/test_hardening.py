"""Issue #25: bad op arguments are ValueErrors naming the argument; empty batches give empty outputs;
non-finite keys / values stay inside the attention pattern; checkpoints with broken tensors are refused
without changing the model."""
import math

import pytest
import torch

from diffaccel import ops
from diffaccel._validate import normalize_grid, per_axis

pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
              # the Triton interpreter's numpy matmul on NaN inputs (the point of the non-finite tests)
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

BACKENDS = ("torch", "flex", "triton")


def _qkv(s, b=1, h=2, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=gen) for _ in range(3)]


OPS = {
    "neighborhood": lambda q, k, v, grid, backend: ops.neighborhood_attention(q, k, v, grid, 3, backend=backend),
    "local": lambda q, k, v, grid, backend: ops.local_attention(q, k, v, grid, 2, backend=backend),
    "moba": lambda q, k, v, grid, backend: ops.moba_attention(q, k, v, grid, 2, topk=2, backend=backend),
}
MOBA_BACKENDS = ("torch", "triton")


def _cases():
    for name in OPS:
        for backend in BACKENDS:
            if name == "moba" and backend not in MOBA_BACKENDS:
                continue
            yield name, backend


# ------------------------------------------------------------------------------------ item 6: arguments


@pytest.mark.parametrize("name,backend", list(_cases()))
def test_head_dim_zero_is_a_value_error(name, backend):
    q, k, v = (torch.zeros(1, 16, 2, 0) for _ in range(3))
    with pytest.raises(ValueError, match="head dim"):
        OPS[name](q, k, v, (4, 4), backend)


@pytest.mark.parametrize("name,backend", list(_cases()))
@pytest.mark.parametrize("shape", [(0, 16, 2, 8), (2, 16, 0, 8)], ids=["batch0", "heads0"])
def test_empty_batch_or_heads_give_an_empty_output(name, backend, shape):
    q, k, v = (torch.zeros(shape) for _ in range(3))
    out = OPS[name](q, k, v, (4, 4), backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    q.requires_grad_(True)
    OPS[name](q, k, v, (4, 4), backend).sum().backward()  # still attached to the graph
    assert q.grad.shape == q.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("radius", [1e200, 1e300, 1e155, 10 ** 400], ids=["1e200", "1e300", "1e155", "10**400"])
def test_huge_radius_sees_the_whole_grid(backend, radius):
    q, k, v = _qkv(4 + 20)
    out = ops.local_attention(q, k, v, (4, 5), radius, text_len=4, backend=backend)
    dense = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


def test_tiny_radius_still_sees_the_query_itself():
    q, k, v = _qkv(12)
    out = ops.local_attention(q, k, v, (3, 4), 1e-200, backend="torch")
    torch.testing.assert_close(out, v)  # every query sees exactly its own key


BAD_GRIDS = [(4.9, 4), "44", (True, 16), (4, 4.0), [4, "4"], 16.0, None, (4, None), b"44", {4: 4}]


@pytest.mark.parametrize("grid", BAD_GRIDS, ids=repr)
@pytest.mark.parametrize("name", list(OPS))
def test_grids_that_are_not_ints_are_refused(name, grid):
    q, k, v = _qkv(16)
    with pytest.raises(ValueError, match="grid"):
        OPS[name](q, k, v, grid, "torch")


def test_grid_accepts_int_likes():
    np = pytest.importorskip("numpy")
    assert normalize_grid((np.int64(4), 4)) == (4, 4)
    assert normalize_grid(torch.Size([2, 3, 4])) == (2, 3, 4)
    assert normalize_grid(7) == (7,)


@pytest.mark.parametrize("name,value", [
    ("kernel_size", 2.5), ("kernel_size", (3, 3.0)), ("kernel_size", "33"), ("kernel_size", (True, 3)),
    ("kernel_size", True), ("dilation", (1, 0)), ("stride", (1, 1, 1)), ("kernel_size", None),
])
def test_neighborhood_per_axis_arguments(name, value):
    q, k, v = _qkv(16)
    kwargs = {"kernel_size": 3, name: value}
    with pytest.raises(ValueError, match=name):
        ops.neighborhood_attention(q, k, v, (4, 4), **kwargs, backend="torch")


def test_one_per_axis_validator_for_ops_and_methods():
    from diffaccel.methods.moba import MobaOptions
    from diffaccel.methods.neighborhood import NeighborhoodOptions

    assert per_axis("kernel_size", 3, 2) == (3, 3)
    assert per_axis("kernel_size", (3, 5)) == (3, 5)
    assert per_axis("block", (None, 4, 4), allow_none=True) == (None, 4, 4)
    for bad in ((3, 3.5), "33", (True, 3), (3,), (1, 2, 3, 4), 0, -1, 2.0):
        with pytest.raises(ValueError, match="kernel_size"):
            NeighborhoodOptions(kernel_size=bad)
        with pytest.raises(ValueError, match="block"):
            MobaOptions(block=bad, topk=2)
        with pytest.raises(ValueError, match="kernel_size"):
            per_axis("kernel_size", bad, 2)
    with pytest.raises(ValueError, match="partitions"):
        MobaOptions(partitions=[(2, 2, 2), (None, 2.5, 2)], topk=2)
    with pytest.raises(ValueError, match="stride"):
        NeighborhoodOptions(kernel_size=3, stride=(1, None))
    assert NeighborhoodOptions(kernel_size=(3, 5)).kernel_size == (3, 5)
    assert MobaOptions(block=[None, 4, 4], topk=2).block == (None, 4, 4)


def test_no_second_per_axis_validator():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "diffaccel"
    for path in root.rglob("*.py"):
        text = path.read_text()
        for name in ("def _check_axes", "def _check_block"):
            assert name not in text, f"{path}: use diffaccel._validate.per_axis"


@pytest.mark.parametrize("call,name", [
    (lambda q, k, v: ops.neighborhood_attention(q, k, v, (4, 4), 3, scale=10 ** 400), "scale"),
    (lambda q, k, v: ops.local_attention(q, k, v, (4, 4), 2, scale=float("nan")), "scale"),
    (lambda q, k, v: ops.linear_attention(q, k, v, eps=10 ** 400), "eps"),
    (lambda q, k, v: ops.moba_attention(q, k, v, (4, 4), 2, threshold=10 ** 400), "threshold"),
    (lambda q, k, v: ops.local_attention(q, k, v, (4, 4), float("inf")), "radius"),
    (lambda q, k, v: ops.local_attention(q, k, v, (4, 4), -(10 ** 400)), "radius"),
])
def test_numbers_too_large_for_a_float_are_value_errors(call, name):
    q, k, v = _qkv(16)
    with pytest.raises(ValueError, match=name):
        call(q, k, v)


# ------------------------------------------------------------------------------------ item 5: NaN spread


def _reference(name, q, k, v, grid):
    from diffaccel.kernels.local_ref import local_reference
    from diffaccel.kernels.moba_ref import moba_reference
    from diffaccel.kernels.neighborhood_ref import neighborhood_reference

    if name == "neighborhood":
        return neighborhood_reference(q, k, v, grid, (3, 3), (1, 1), (1, 1))
    if name == "local":
        return local_reference(q, k, v, grid, 2)
    return moba_reference(q, k, v, grid, (2, 2), topk=2)


@pytest.mark.parametrize("name,backend", list(_cases()))
@pytest.mark.parametrize("which", ["k", "v"])  # (non-finite queries: tests/test_fuzz.py)
def test_a_nan_reaches_only_the_queries_that_see_it(name, backend, which):
    # 6 x 6: partial Triton tiles; 5 x 6 with 2 x 2 MoBA blocks: token 26 sits in a partial border block
    grid, at = ((6, 6), 0) if name != "moba" else ((5, 6), 26)
    q, k, v = _qkv(math.prod(grid))
    {"k": k, "v": v}[which][0, at, 1, 2] = float("nan")
    out, ref = OPS[name](q, k, v, grid, backend), _reference(name, q, k, v, grid)
    nan = torch.isnan(ref)
    assert 0 < int(nan[0, :, 1].any(-1).sum()) < math.prod(grid)  # some queries see it, not all
    assert torch.equal(torch.isnan(out), nan)
    torch.testing.assert_close(out[~nan], ref[~nan], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_neighborhood_issue_repro_nan_key_on_6x6_kernel_3(backend):
    q, k, v = _qkv(36, h=1)
    k[0, 14] = float("nan")  # (2, 2): in the windows of the 16 queries of rows / columns 0..3
    out = ops.neighborhood_attention(q, k, v, (6, 6), 3, backend=backend)
    bad = torch.isnan(out[0, :, 0]).any(-1).view(6, 6)
    want = torch.zeros(6, 6, dtype=torch.bool)
    want[:4, :4] = True
    assert torch.equal(bad, want)


# ------------------------------------------------------------------------------------ item 7: CLEAR weights


def _clear_model():
    from tiny_models import flux_inputs, tiny_flux

    model = tiny_flux()
    return model, flux_inputs(model, height=4, width=5)


def _clear_checkpoint(model):
    import diffaccel
    from diffaccel.methods.clear import clear_state_dict

    diffaccel.apply(model, "clear", radius=2, down_factor=2)
    try:
        state = clear_state_dict(model)
    finally:
        diffaccel.remove(model)
    g = torch.Generator().manual_seed(1)
    return {k: t + 0.01 * torch.randn(t.shape, generator=g) for k, t in state.items()}


class _FailingTensor(torch.Tensor):
    """A tensor whose conversion fails, as a corrupt or lazily-read entry would, half-way through a load."""

    def to(self, *args, **kwargs):
        raise RuntimeError("simulated read failure")


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("bad", ["unreadable", "nan", "inf"])
def test_clear_load_is_all_or_nothing(keep, bad):
    import diffaccel
    from tiny_models import run

    model, x = _clear_model()
    state = _clear_checkpoint(model)
    keys = sorted(k for k in state if not k.endswith("spatial_weight"))
    victim = keys[len(keys) // 2]  # half of the tensors load before it
    if bad == "unreadable":
        state[victim] = state[victim].as_subclass(_FailingTensor)
    else:
        state[victim] = state[victim].clone()
        state[victim].view(-1)[3] = float("nan") if bad == "nan" else float("inf")
    before, ref = _params(model), run(model, x)
    with pytest.raises(ValueError, match=victim.replace(".", r"\.")):
        diffaccel.apply(model, "clear", radius=2, down_factor=2, weights=state, keep_original_weights=keep)
    after = _params(model)
    assert [n for n in before if not torch.equal(before[n], after[n])] == []
    assert diffaccel.api.applied_method(model) is None
    torch.testing.assert_close(run(model, x), ref, atol=0, rtol=0)


def test_clear_checkpoint_file_with_nan_pooling_weight_is_refused(tmp_path):
    from safetensors.torch import save_file

    import diffaccel

    model, _ = _clear_model()
    state = _clear_checkpoint(model)
    key = next(k for k in state if k.endswith("spatial_weight"))
    state[key] = torch.full_like(state[key], float("nan"))
    path = tmp_path / "clear_local_2_down_2.safetensors"
    save_file(state, str(path))
    before = _params(model)
    with pytest.raises(ValueError, match=rf"{path.name}.*NaN or inf"):
        diffaccel.apply(model, "clear", radius=2, down_factor=2, weights=str(path))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert diffaccel.api.applied_method(model) is None


# ------------------------------------------------------------------------------------ items 7, 8: LinFusion


@pytest.fixture(scope="module")
def linfusion_unet():
    from tiny_models import tiny_unet

    return tiny_unet()


def _linfusion_folder(unet, folder):
    import copy

    import diffaccel
    from diffaccel.linfusion import save_linfusion

    student = copy.deepcopy(unet)
    diffaccel.apply(student, "linfusion", init="random")
    save_linfusion(student, folder)
    return folder


def _unchanged(unet, before):
    from diffaccel.api import applied_method

    now = unet.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before) \
        and applied_method(unet) is None


def test_save_linfusion_writes_null_for_the_default_mid_dim(linfusion_unet, tmp_path):
    import json

    folder = _linfusion_folder(linfusion_unet, tmp_path / "ckpt")
    entries = json.loads((folder / "config.json").read_text())["modules_list"]
    assert entries and all(e["projection_mid_dim"] is None for e in entries)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_linfusion_checkpoint_with_non_finite_weights_is_refused(linfusion_unet, tmp_path, value):
    import copy

    from safetensors.torch import load_file, save_file

    import diffaccel

    folder = _linfusion_folder(linfusion_unet, tmp_path / "ckpt")
    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    tensors["1.to_k.weight"][0, 0] = float(value)
    save_file(tensors, str(path))
    unet = copy.deepcopy(linfusion_unet)
    before = {k: t.clone() for k, t in unet.state_dict().items()}
    with pytest.raises(ValueError, match=r"1\.to_k\.weight .*NaN or inf"):
        diffaccel.apply(unet, "linfusion", weights=str(folder))
    assert _unchanged(unet, before)


@pytest.mark.parametrize("content,why", [
    (b'{"modules_list": ' + b"[" * 100000 + b"]" * 100000 + b"}", "nested too deeply"),
    (b'{"modules_list": [], "x": "\xff\xfe"}', "UnicodeDecodeError"),
    (b"\xef\xbb\xbf{}", "JSONDecodeError"),
], ids=["deep", "utf8", "bom"])
def test_linfusion_unreadable_config_names_the_file(linfusion_unet, tmp_path, content, why):
    import copy

    import diffaccel

    folder = _linfusion_folder(linfusion_unet, tmp_path / "ckpt")
    (folder / "config.json").write_bytes(content)
    unet = copy.deepcopy(linfusion_unet)
    before = {k: t.clone() for k, t in unet.state_dict().items()}
    with pytest.raises(ValueError, match=why) as err:
        diffaccel.apply(unet, "linfusion", weights=str(folder))
    assert str(folder / "config.json") in str(err.value)
    assert _unchanged(unet, before)


def test_a_missing_required_option_is_a_value_error():
    import diffaccel
    from tiny_models import tiny_flux

    model = tiny_flux()
    with pytest.raises(ValueError, match=r"'clear' needs the option\(s\) \['radius'\]"):
        diffaccel.apply(model, "clear")
    assert diffaccel.api.applied_method(model) is None
