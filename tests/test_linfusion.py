"""Method "linfusion" on a tiny random UNet2DConditionModel: checkpoints in LinFusion's format,
an independent implementation of the formula, gradients, errors, save/load, remove, ControlNet, IP-Adapter."""
import copy
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

import diffaccel  # noqa: E402
from diffaccel.api import applied_method, apply, remove  # noqa: E402
from diffaccel.linfusion import (  # noqa: E402
    LINFUSION_CHECKPOINTS,
    LinFusionAttention,
    linfusion_checkpoint_for,
    save_linfusion,
)
from diffaccel.methods.linfusion import LinFusionOptions, linfusion_parameters  # noqa: E402
from tiny_models import tiny_unet, unet_inputs  # noqa: E402

EPS = 1e-4
MIDS = (None, 16, -1)  # projection_mid_dim per entry, cycled: LinFusion's default, a custom width, identity branch


def attn1_layers(unet):
    return [(n, m) for n, m in unet.named_modules() if n.endswith("attn1")]


def forward(unet, inputs, **kw):
    with torch.no_grad():
        return unet(**inputs, **kw, return_dict=False)[0]


def make_checkpoint_tensors(unet, seed=0):
    """(modules_list, tensors) in LinFusion's format for every attn1 of ``unet``, random values."""
    g = torch.Generator().manual_seed(seed)
    modules_list, tensors = [], {}
    for i, (name, attn) in enumerate(attn1_layers(unet)):
        dim = attn.to_q.in_features
        inner = attn.to_q.out_features
        mid = MIDS[i % len(MIDS)]
        modules_list.append({"module_name": name, "dim_n": inner, "heads": attn.heads, "projection_mid_dim": mid})

        def rnd(*shape, scale=0.2):
            return torch.randn(*shape, generator=g) * scale

        tensors[f"{i}.to_q.weight"] = rnd(inner, dim)
        tensors[f"{i}.to_k.weight"] = rnd(inner, dim)
        tensors[f"{i}.to_v.weight"] = rnd(inner, dim)
        tensors[f"{i}.to_out.0.weight"] = rnd(dim, inner)
        tensors[f"{i}.to_out.0.bias"] = rnd(dim)
        if mid != -1:
            m = mid or inner
            for p in ("to_q_", "to_k_"):
                tensors[f"{i}.{p}.0.weight"] = rnd(m, dim)
                tensors[f"{i}.{p}.0.bias"] = rnd(m)
                tensors[f"{i}.{p}.1.weight"] = 1 + rnd(m)
                tensors[f"{i}.{p}.1.bias"] = rnd(m)
                tensors[f"{i}.{p}.3.weight"] = rnd(dim, m)
                tensors[f"{i}.{p}.3.bias"] = rnd(dim)
    return modules_list, tensors


def write_checkpoint(folder, modules_list, tensors):
    """Written the way LinFusion's save_pretrained lays it out, without diffaccel's writer."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"_class_name": "LinFusion", "_diffusers_version": "0.30.0", "modules_list": modules_list}, f)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    return str(folder)


class ManualLinFusionProcessor:
    """Independent implementation: the formula written out in float64 from the checkpoint tensors, in its
    quadratic form out_i = sum_j (phi(q_i).phi(k_j)) v_j / (sum_j phi(q_i).phi(k_j) + N eps),
    plugged in through diffusers' processor route on an untouched copy of the UNet."""

    def __init__(self, index, tensors, heads):
        self.w = {k.split(".", 1)[1]: v.double() for k, v in tensors.items() if k.split(".", 1)[0] == str(index)}
        self.heads = heads

    def _mlp(self, p, x):
        w = self.w
        if f"{p}.0.weight" not in w:  # projection_mid_dim == -1: LinFusion's branch is nn.Identity, so x + x
            return x
        h = x @ w[f"{p}.0.weight"].T + w[f"{p}.0.bias"]
        h = F.layer_norm(h, h.shape[-1:], w[f"{p}.1.weight"], w[f"{p}.1.bias"], eps=1e-5)
        h = torch.where(h > 0, h, 0.01 * h)
        return h @ w[f"{p}.3.weight"].T + w[f"{p}.3.bias"]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        assert encoder_hidden_states is None and attention_mask is None
        w = self.w
        x = hidden_states.double()
        q = (x + self._mlp("to_q_", x)) @ w["to_q.weight"].T
        k = (x + self._mlp("to_k_", x)) @ w["to_k.weight"].T
        v = x @ w["to_v.weight"].T
        b, n, inner = q.shape
        h = self.heads
        q, k, v = (t.view(b, n, h, inner // h).transpose(1, 2) for t in (q, k, v))  # [B, H, N, Dh]
        phi = lambda t: torch.where(t > 0, t + 1, torch.exp(t))  # noqa: E731
        a = phi(q) @ phi(k).transpose(-1, -2)  # [B, H, N, N]
        out = (a @ v) / (a.sum(-1, keepdim=True) + n * EPS)
        out = out.transpose(1, 2).reshape(b, n, inner)
        out = out @ w["to_out.0.weight"].T + w["to_out.0.bias"]
        return out.to(hidden_states.dtype)


def manual_unet(unet, modules_list, tensors):
    """A deep copy of the untouched ``unet`` whose attn1 layers run :class:`ManualLinFusionProcessor`."""
    ref = copy.deepcopy(unet)
    named = dict(ref.named_modules())
    for i, entry in enumerate(modules_list):
        attn = named[entry["module_name"]]
        attn.set_processor(ManualLinFusionProcessor(i, tensors, entry["heads"]))
    return ref


@pytest.fixture(scope="module")
def base_unet():
    return tiny_unet()


@pytest.fixture
def unet(base_unet):
    return copy.deepcopy(base_unet)


@pytest.fixture
def inputs(base_unet):
    return unet_inputs(base_unet, 8, 8, batch=2)


@pytest.fixture(scope="module")
def checkpoint(base_unet, tmp_path_factory):
    modules_list, tensors = make_checkpoint_tensors(base_unet)
    folder = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "linfusion", modules_list, tensors)
    return folder, modules_list, tensors


def snapshot(unet):
    return {k: v.clone() for k, v in unet.state_dict().items()}, [type(m) for m in unet.modules()]


def assert_unchanged(unet, snap):
    sd, types = snap
    assert [type(m) for m in unet.modules()] == types
    now = unet.state_dict()
    assert now.keys() == sd.keys()
    assert all(torch.equal(now[k], sd[k]) for k in sd)
    assert applied_method(unet) is None


# ------------------------------------------------------------------ registration and options


def test_registered():
    assert "linfusion" in diffaccel.registry.available_methods()
    m = diffaccel.registry.get_method("linfusion")
    assert m.families == ("unet",) and m.options_cls is LinFusionOptions


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(eps=0), "eps"), (dict(eps=float("nan")), "eps"), (dict(eps=-1.0), "eps"), (dict(eps="1"), "eps"),
        (dict(mid_dim=0), "mid_dim"), (dict(mid_dim=-1), "mid_dim"), (dict(mid_dim=True), "mid_dim"), (dict(mid_dim=2.0), "mid_dim"),
        (dict(mid_dim=8, weights="x/y"), "mid_dim"),
        (dict(backend="flex"), "backend"), (dict(init="zeros"), "init"),
        (dict(weights=""), "weights"), (dict(weights=3), "weights"),
    ],
)
def test_bad_options(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LinFusionOptions(**kwargs)


def test_unknown_option_via_apply(unet):
    with pytest.raises(ValueError, match="mid_width"):
        apply(unet, "linfusion", mid_width=3)


# ------------------------------------------------------------------ teacher initialisation


def test_teacher_init_copies_projections_and_zeroes_mlp(unet, base_unet, inputs):
    apply(unet, "linfusion")
    teacher = dict(base_unet.named_modules())
    students = [(n, m) for n, m in unet.named_modules() if isinstance(m, LinFusionAttention)]
    assert [n for n, _ in students] == [n for n, _ in attn1_layers(base_unet)] and len(students) == 7
    for name, s in students:
        t = teacher[name]
        assert s.heads == t.heads and s.dim_head == t.to_q.out_features // t.heads
        for p in ("to_q", "to_k", "to_v"):
            assert torch.equal(getattr(s, p).weight, getattr(t, p).weight)
            assert getattr(s, p).bias is None and getattr(t, p).bias is None
        assert torch.equal(s.to_out[0].weight, t.to_out[0].weight) and torch.equal(s.to_out[0].bias, t.to_out[0].bias)
        x = torch.randn(2, 5, t.to_q.in_features)
        for mlp in (s.to_q_, s.to_k_):
            assert [type(mlp[j]).__name__ for j in range(4)] == ["Linear", "LayerNorm", "LeakyReLU", "Linear"]
            assert torch.count_nonzero(mlp[3].weight) == 0 and torch.count_nonzero(mlp[3].bias) == 0
            assert torch.count_nonzero(mlp[0].weight) > 0  # only the last layer is zero: gradients still flow
            assert torch.equal(mlp(x), torch.zeros_like(x))
    # cross-attention is untouched: the very same modules
    for name, m in base_unet.named_modules():
        if name.endswith("attn2"):
            assert isinstance(unet.get_submodule(name), type(m))
    out = forward(unet, inputs)
    assert torch.isfinite(out).all()


def test_teacher_init_layer_equals_linear_attention_on_teacher_projections(base_unet):
    # with the MLP branch at zero, the student is the teacher's projections feeding the op
    name, t = attn1_layers(base_unet)[1]
    s = LinFusionAttention.from_attention(t)
    x = torch.randn(2, 10, t.to_q.in_features)
    h = t.heads
    q, k, v = (proj(x).view(2, 10, h, -1) for proj in (t.to_q, t.to_k, t.to_v))
    want = t.to_out[0](diffaccel.ops.linear_attention(q, k, v).reshape(2, 10, -1))
    torch.testing.assert_close(s(x), want)


def test_mid_dim_option_and_random_init(unet):
    apply(unet, "linfusion", mid_dim=12, init="random")
    s = next(m for m in unet.modules() if isinstance(m, LinFusionAttention))
    assert s.to_q_[0].out_features == 12 and s.to_k_[3].in_features == 12
    assert torch.count_nonzero(s.to_q_[3].weight) > 0


def test_identity_branch_teacher_init_is_exact(base_unet):
    # projection_mid_dim=-1 (LinFusion: nn.Identity branch, so q = W_q(x + x)); the teacher init halves W_q, W_k
    _, t = attn1_layers(base_unet)[0]
    s = LinFusionAttention.from_attention(t, mid_dim=-1)
    assert isinstance(s.to_q_, torch.nn.Identity) and not any(k.startswith("to_q_") for k in s.linfusion_state_dict())
    torch.testing.assert_close(s.to_q.weight, t.to_q.weight / 2)
    x = torch.randn(2, 10, t.to_q.in_features)
    with torch.no_grad():
        torch.testing.assert_close(s(x), LinFusionAttention.from_attention(t)(x))


# ------------------------------------------------------------------ checkpoints vs the independent formula


def test_checkpoint_loads_and_unet_matches_independent_formula(unet, base_unet, inputs, checkpoint):
    folder, modules_list, tensors = checkpoint
    apply(unet, "linfusion", weights=folder)
    students = {n: m for n, m in unet.named_modules() if isinstance(m, LinFusionAttention)}
    assert list(students) == [e["module_name"] for e in modules_list]
    assert students[modules_list[0]["module_name"]].mid_dim == modules_list[0]["dim_n"]  # null -> layer width
    assert students[modules_list[1]["module_name"]].mid_dim == 16
    assert isinstance(students[modules_list[2]["module_name"]].to_q_, torch.nn.Identity)  # -1 -> identity branch
    ref = manual_unet(base_unet, modules_list, tensors)
    out = forward(unet, inputs)
    want = forward(ref, inputs)
    base = forward(base_unet, inputs)
    assert (want - base).abs().max() > 1e-3  # the checkpoint really changes the model
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)


def test_layer_matches_independent_formula_4d_group_norm_residual_rescale():
    # a stand-alone diffusers Attention with the features BasicTransformerBlock's attn1 lacks
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    t = Attention(query_dim=16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True,
                  rescale_output_factor=2.0, out_bias=True).eval()
    s = LinFusionAttention.from_attention(t, init="random", mid_dim=8)
    assert s.group_norm is t.group_norm
    x = torch.randn(2, 16, 3, 5)  # [B, C, H, W]
    tensors = {f"0.{k}": v for k, v in s.linfusion_state_dict().items()}
    proc = ManualLinFusionProcessor(0, tensors, 2)
    seq = x.view(2, 16, 15).transpose(1, 2)
    seq = t.group_norm(seq.transpose(1, 2)).transpose(1, 2)
    want = proc(t, seq).transpose(1, 2).reshape(2, 16, 3, 5)
    want = (want + x) / 2.0
    with torch.no_grad():
        torch.testing.assert_close(s(x), want, atol=1e-5, rtol=1e-4)


def test_triton_backend_end_to_end(unet, base_unet, checkpoint):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    folder, modules_list, tensors = checkpoint
    inputs = unet_inputs(base_unet, 4, 6, batch=1)
    apply(unet, "linfusion", weights=folder, backend="triton")
    want = forward(manual_unet(base_unet, modules_list, tensors), inputs)
    torch.testing.assert_close(forward(unet, inputs), want, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------ gradients (distillation setting)


def test_gradients_reach_exactly_the_linfusion_parameters(unet, inputs, checkpoint):
    apply(unet, "linfusion", weights=checkpoint[0])
    unet.requires_grad_(False)
    params = linfusion_parameters(unet)
    for p in params:
        p.requires_grad_(True)
    out = unet(**inputs, return_dict=False)[0]
    out.square().mean().backward()
    with_grad = {n for n, p in unet.named_parameters() if p.grad is not None}
    expected = {n for n, p in unet.named_parameters() if any(p is q for q in params)}
    assert with_grad == expected
    assert all(".attn1." in n and n.split(".attn1.")[1].split(".")[0] in
               ("to_q", "to_k", "to_v", "to_out", "to_q_", "to_k_") for n in expected)
    # every LinFusion layer's own parameters are there (7 layers; entry i%3==2 has an identity branch)
    assert len(params) == sum(len(s.linfusion_state_dict()) for s in unet.modules() if isinstance(s, LinFusionAttention))
    for n, p in unet.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


# ------------------------------------------------------------------ bad checkpoints: one error, nothing changed


def test_bad_checkpoint_lists_every_problem_and_changes_nothing(unet, tmp_path):
    modules_list, tensors = make_checkpoint_tensors(unet, seed=1)
    del tensors["0.to_q.weight"]  # missing
    tensors["1.to_k.weight"] = torch.zeros(3, 3)  # wrong shape
    tensors["2.to_v.bias"] = torch.zeros(64)  # unexpected (the teacher's to_v has no bias)
    tensors["9.to_q.weight"] = torch.zeros(2, 2)  # unexpected index
    tensors["0.lora.weight"] = torch.zeros(2, 2)  # unexpected name
    modules_list[3] = dict(modules_list[3], heads=4)  # heads mismatch
    modules_list.append({"module_name": "down_blocks.5.attn1", "dim_n": 32, "heads": 8, "projection_mid_dim": None})
    folder = write_checkpoint(tmp_path / "bad", modules_list, tensors)
    snap = snapshot(unet)
    with pytest.raises(ValueError) as info:
        apply(unet, "linfusion", weights=folder)
    msg = str(info.value)
    for needle in ("missing key 0.to_q.weight", "shape mismatch for 1.to_k.weight", "unexpected key 2.to_v.bias",
                   "unexpected key 9.to_q.weight", "unexpected key 0.lora.weight", "heads=4",
                   "'down_blocks.5.attn1' not found"):
        assert needle in msg, (needle, msg)
    assert "7 problem(s)" in msg
    assert_unchanged(unet, snap)


def test_selected_layer_without_entry_and_bad_config(unet, tmp_path):
    modules_list, tensors = make_checkpoint_tensors(unet, seed=2)
    modules_list[0] = {"module_name": modules_list[0]["module_name"], "dim_n": "32", "heads": 8}
    last = modules_list.pop()  # the last layer has no entry (its tensors become unexpected)
    folder = write_checkpoint(tmp_path / "bad2", modules_list, tensors)
    snap = snapshot(unet)
    with pytest.raises(ValueError) as info:
        apply(unet, "linfusion", weights=folder)
    msg = str(info.value)
    assert "dim_n must be a positive int" in msg
    assert f"selected layer {last['module_name']!r} has no entry" in msg
    assert f"unexpected key {len(modules_list)}.to_q.weight" in msg
    assert_unchanged(unet, snap)


def test_unreadable_checkpoints(unet, tmp_path):
    snap = snapshot(unet)
    with pytest.raises(ValueError, match="neither an existing folder nor a Hub repo id"):
        apply(unet, "linfusion", weights=str(tmp_path / "nope" / "deeper"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        apply(unet, "linfusion", weights=str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text('{"modules_list": []}')
    with pytest.raises(ValueError, match="neither diffusion_pytorch_model.safetensors"):
        apply(unet, "linfusion", weights=str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read config.json"):
        apply(unet, "linfusion", weights=str(tmp_path / "empty"))
    assert_unchanged(unet, snap)


def test_subset_of_layers_from_a_full_checkpoint(unet, base_unet, inputs, checkpoint):
    folder, modules_list, tensors = checkpoint
    apply(unet, "linfusion", weights=folder, layers="up_blocks.*")
    patched = [n for n, m in unet.named_modules() if isinstance(m, LinFusionAttention)]
    assert patched and all(n.startswith("up_blocks.") for n in patched)
    sub = [(i, e) for i, e in enumerate(modules_list) if e["module_name"].startswith("up_blocks.")]
    ref = copy.deepcopy(base_unet)
    for i, e in sub:
        ref.get_submodule(e["module_name"]).set_processor(ManualLinFusionProcessor(i, tensors, e["heads"]))
    torch.testing.assert_close(forward(unet, inputs), forward(ref, inputs), atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------ Hub ids and weights="auto"


def test_checkpoint_table():
    assert linfusion_checkpoint_for("runwayml/stable-diffusion-v1-5") == "Yuanshi/LinFusion-1-5"
    assert linfusion_checkpoint_for("stable-diffusion-v1-5/stable-diffusion-v1-5") == "Yuanshi/LinFusion-1-5"
    assert linfusion_checkpoint_for("CompVis/stable-diffusion-v1-4") == "Yuanshi/LinFusion-1-5"
    assert linfusion_checkpoint_for("StabilityAI/stable-diffusion-2-1") == "Yuanshi/LinFusion-2-1"
    assert linfusion_checkpoint_for("stabilityai/stable-diffusion-xl-base-1.0") == "Yuanshi/LinFusion-XL"
    cache = "/root/.cache/huggingface/hub/models--stabilityai--stable-diffusion-xl-base-1.0/snapshots/abc/unet"
    assert linfusion_checkpoint_for(cache) == "Yuanshi/LinFusion-XL"
    assert linfusion_checkpoint_for("some/other-model") is None and linfusion_checkpoint_for(None) is None
    assert set(LINFUSION_CHECKPOINTS.values()) == {"Yuanshi/LinFusion-1-5", "Yuanshi/LinFusion-2-1", "Yuanshi/LinFusion-XL"}


def test_auto_weights_resolves_then_fails_clearly_offline(unet, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    snap = snapshot(unet)
    unet.register_to_config(_name_or_path="/cache/models--runwayml--stable-diffusion-v1-5/snapshots/0123/unet")
    with pytest.raises(ValueError, match=r"could not get the Hugging Face Hub repo 'Yuanshi/LinFusion-1-5' \(HF_HUB_OFFLINE is set"):
        apply(unet, "linfusion", weights="auto")
    unet.register_to_config(_name_or_path="my/own-finetune")
    with pytest.raises(ValueError, match="weights='auto' found no LinFusion checkpoint.*my/own-finetune"):
        apply(unet, "linfusion", weights="auto")
    with pytest.raises(ValueError, match="could not get the Hugging Face Hub repo"):
        apply(unet, "linfusion", weights="Yuanshi/LinFusion-XL")
    assert_unchanged(unet, snap)


# ------------------------------------------------------------------ save / load / remove


def test_save_load_round_trip(unet, base_unet, inputs, tmp_path, checkpoint):
    apply(unet, "linfusion", init="random", mid_dim=8)
    out = forward(unet, inputs)
    folder = tmp_path / "saved"
    save_linfusion(unet, folder)
    assert sorted(os.listdir(folder)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert not [p for p in os.listdir(tmp_path) if p != "saved"]  # no temporaries left behind
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "LinFusion"
    assert [e["module_name"] for e in config["modules_list"]] == [n for n, _ in attn1_layers(base_unet)]
    assert all(set(e) == {"module_name", "dim_n", "heads", "projection_mid_dim"} and e["projection_mid_dim"] == 8
               for e in config["modules_list"])
    other = copy.deepcopy(base_unet)
    apply(other, "linfusion", weights=str(folder))
    assert torch.equal(forward(other, inputs), out)
    # the saved files are in the published format: an independent reader reproduces the output
    from safetensors.torch import load_file

    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    assert "0.to_q_.1.weight" in tensors and "0.to_out.0.bias" in tensors and "0.to_q.bias" not in tensors
    ref = manual_unet(base_unet, config["modules_list"], tensors)
    torch.testing.assert_close(forward(ref, inputs), out, atol=2e-5, rtol=1e-4)
    # a pipeline works too, and fp16 saving
    from tiny_models import tiny_pipeline

    save_linfusion(tiny_pipeline(unet=other), tmp_path / "half", dtype=torch.float16)
    assert load_file(tmp_path / "half" / "diffusion_pytorch_model.safetensors")["0.to_q.weight"].dtype == torch.float16


def test_save_is_atomic(unet, tmp_path, monkeypatch):
    apply(unet, "linfusion")
    folder = tmp_path / "ckpt"
    save_linfusion(unet, folder)
    before = {p: (folder / p).read_bytes() for p in os.listdir(folder)}
    import safetensors.torch

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_linfusion(unet, folder)
    assert {p: (folder / p).read_bytes() for p in os.listdir(folder)} == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    with pytest.raises(OSError):
        save_linfusion(unet, tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # a new folder appears complete or not at all


def test_save_without_linfusion_layers(base_unet, tmp_path):
    with pytest.raises(ValueError, match="no LinFusion layers"):
        save_linfusion(base_unet, tmp_path / "x")


def test_remove_restores_the_original_modules(unet, inputs, checkpoint):
    originals = dict(attn1_layers(unet))
    before = forward(unet, inputs)
    apply(unet, "linfusion", weights=checkpoint[0])
    assert applied_method(unet) == "linfusion"
    assert not torch.equal(forward(unet, inputs), before)
    with pytest.raises(ValueError, match="already has"):
        apply(unet, "linfusion")
    assert remove(unet)
    for name, m in attn1_layers(unet):
        assert m is originals[name]
    assert torch.equal(forward(unet, inputs), before)
    assert not remove(unet)


def test_attention_mask_is_refused(base_unet):
    s = LinFusionAttention.from_attention(attn1_layers(base_unet)[0][1])
    with pytest.raises(ValueError, match="attention_mask"):
        s(torch.randn(1, 4, 32), attention_mask=torch.ones(1, 4, 4))


def test_unsupported_teacher_features():
    from diffusers.models.attention_processor import Attention

    with pytest.raises(ValueError, match="norm_q"):
        LinFusionAttention.from_attention(Attention(query_dim=16, heads=2, dim_head=8, qk_norm="layer_norm"))
    with pytest.raises(ValueError, match="cross-attention"):
        LinFusionAttention.from_attention(Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8))


# ------------------------------------------------------------------ attn2 users: ControlNet, IP-Adapter


def test_controlnet_feeds_the_patched_unet(unet, base_unet, inputs, checkpoint):
    from diffusers import ControlNetModel

    folder, modules_list, tensors = checkpoint
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(base_unet, conditioning_embedding_out_channels=(8, 16)).eval()
    for p in controlnet.controlnet_down_blocks.parameters():  # from_unet zero-inits these: make them matter
        torch.nn.init.normal_(p, std=0.1)
    torch.nn.init.normal_(controlnet.controlnet_mid_block.weight, std=0.1)
    cond = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        down, mid = controlnet(**inputs, controlnet_cond=cond, return_dict=False)
    apply(unet, "linfusion", weights=folder)
    kw = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    out = forward(unet, inputs, **kw)
    want = forward(manual_unet(base_unet, modules_list, tensors), inputs, **kw)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
    assert (out - forward(unet, inputs)).abs().max() > 1e-3  # the ControlNet residuals are used


def _ip_adapter_state_dict(unet, embed_dim=12, seed=4):
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    image_proj = {"proj.weight": torch.randn(4 * cross, embed_dim, generator=g) * 0.2, "proj.bias": torch.zeros(4 * cross),
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    ip = {}
    attn2 = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    for j, m in enumerate(attn2):
        hidden = m.to_k.out_features
        ip[f"{2 * j + 1}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.2
        ip[f"{2 * j + 1}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.2
    return {"image_proj": image_proj, "ip_adapter": ip}


@pytest.mark.parametrize("order", ["ip_adapter_first", "linfusion_first"])
def test_ip_adapter_keeps_working(unet, base_unet, inputs, checkpoint, order):
    folder, modules_list, tensors = checkpoint
    sd = _ip_adapter_state_dict(base_unet)
    if order == "ip_adapter_first":
        unet._load_ip_adapter_weights([sd])
        apply(unet, "linfusion", weights=folder)
    else:
        apply(unet, "linfusion", weights=folder)
        unet._load_ip_adapter_weights([sd])
    ref = copy.deepcopy(base_unet)
    ref._load_ip_adapter_weights([sd])  # stock diffusers route: IP-Adapter processors on attn2
    for i, e in enumerate(modules_list):
        ref.get_submodule(e["module_name"]).set_processor(ManualLinFusionProcessor(i, tensors, e["heads"]))
    assert type(unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2").processor).__name__ \
        == "IPAdapterAttnProcessor2_0"
    g = torch.Generator().manual_seed(5)
    embeds = [torch.randn(2, 1, 12, generator=g)]
    out = forward(unet, inputs, added_cond_kwargs={"image_embeds": embeds})
    want = forward(ref, inputs, added_cond_kwargs={"image_embeds": embeds})
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
    other = forward(unet, inputs, added_cond_kwargs={"image_embeds": [e * -1 for e in embeds]})
    assert (other - out).abs().max() > 1e-4  # the image prompt is used


def test_hub_id_offline_without_cache(unet):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        apply(unet, "linfusion", weights="diffaccel-tests/no-such-linfusion-checkpoint")
    assert applied_method(unet) is None
