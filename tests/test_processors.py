"""Processors mirror diffusers' stock ones exactly; layout tracking; core calls."""
import functools
import inspect

import pytest
import torch
import torch.nn.functional as F

import diffaccel
from diffaccel import ops
from diffaccel.context import current_context, get_tracker, untrack_layout
from diffaccel.families._common import image_grid_from_ids
from diffaccel.families.unet import unet_grids
from diffaccel.layout import Layout, LayoutError
from diffaccel.processors import (
    FluxProcessor,
    PatternProcessor,
    SD3Processor,
    UNetProcessor,
    WanProcessor,
    make_processor,
    swap_processors,
)
from diffaccel.kernels.neighborhood_ref import neighborhood_mask
from tiny_models import (TINY, flux_image_ids, flux_inputs, run, run_with_processor, tiny_flux, tiny_unet, tiny_wan,
                         unet_inputs)

SIZES = {"unet": dict(height=9, width=13), "flux": dict(height=6, width=10), "sd3": dict(height=6, width=10),
         "wan": dict(frames=2, height=6, width=10)}


def dense_core(q, k, v, *, grid, text_len, text_first):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class RecordingCore:
    """Dense attention that records what each call was told about the layout."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, *, grid, text_len, text_first):
        self.calls.append((tuple(grid), text_len, text_first, q.shape[1]))
        return dense_core(q, k, v, grid=grid, text_len=text_len, text_first=text_first)


@functools.lru_cache(maxsize=None)
def _model(family):
    return TINY[family][0]()


def _self_attn_names(model, family):
    return [n for n, _ in diffaccel.families.self_attention_layers(model, family)]


# ---------------------------------------------------------------------------------------------
# exact mirrors of the stock processors (dense core), processors set with set_attn_processor


@pytest.mark.parametrize("family", ["unet", "flux", "sd3", "wan"])
def test_processor_with_dense_core_mirrors_stock(family):
    model = _model(family)
    x = TINY[family][1](model, batch=2, **SIZES[family])
    ref = run(model, x)
    core = RecordingCore()
    # one processor object on every layer (UNet/Wan cross-attention falls back to the stock processor)
    out = run_with_processor(model, x, make_processor(family, core))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert len(core.calls) == len(_self_attn_names(model, family))

    grids = {c[0] for c in core.calls}
    if family == "unet":  # both UNet levels, odd sizes: 9x13 -> 5x7
        assert grids == {(9, 13), (5, 7)}
        assert all(c[1] == 0 for c in core.calls)
    elif family == "flux":  # double- and single-stream both see [text; image] with 5 text tokens
        assert core.calls == [((6, 10), 5, True, 65), ((6, 10), 5, True, 65)]
    elif family == "sd3":  # joint [image; text] and SD3.5's image-only attn2
        assert sorted(core.calls) == sorted([((3, 5), 5, False, 20), ((3, 5), 0, False, 15), ((3, 5), 5, False, 20)])
    else:
        assert grids == {(2, 3, 5)}


def test_processor_call_signature_and_module():
    proc = FluxProcessor(dense_core)
    assert isinstance(proc, torch.nn.Module)
    params = inspect.signature(proc.__call__).parameters
    assert "image_rotary_emb" in params and "attn" in params
    assert "rotary_emb" in inspect.signature(WanProcessor(dense_core).__call__).parameters

    class WithWeight(UNetProcessor):
        def __init__(self, core):
            super().__init__(core)
            self.spatial_weight = torch.nn.Parameter(torch.zeros(2))

    model = tiny_unet()
    name = _self_attn_names(model, "unet")[0]
    undo = swap_processors(model, {name: WithWeight(dense_core)})
    assert f"{name}.processor.spatial_weight" in model.state_dict()
    undo()
    assert f"{name}.processor.spatial_weight" not in model.state_dict()


# ---------------------------------------------------------------------------------------------
# layout: tracking, explicit grid, errors


def test_untracked_processor_raises_clear_error():
    model = tiny_flux()
    x = flux_inputs(model, 4, 4)
    original = model.attn_processors
    model.set_attn_processor(FluxProcessor(dense_core))
    try:
        with pytest.raises(LayoutError, match="track_layout"):
            run(model, x)
    finally:
        model.set_attn_processor(original)


def test_explicit_grid_without_tracking():
    model = tiny_flux()
    x = flux_inputs(model, 4, 6)
    ref = run(model, x)
    original = model.attn_processors
    model.set_attn_processor(FluxProcessor(dense_core, grid=(4, 6)))
    try:
        torch.testing.assert_close(run(model, x), ref, atol=1e-6, rtol=1e-6)
        with pytest.raises(LayoutError, match="matches no token grid"):
            run(model, flux_inputs(model, 5, 6))
    finally:
        model.set_attn_processor(original)
    with pytest.raises(ValueError, match="grid"):
        WanProcessor(dense_core, grid=(4, 4))


def test_layer_matching_no_grid_names_the_layer():
    model = tiny_unet()
    name = _self_attn_names(model, "unet")[0]
    attn = model.get_submodule(name)

    def ten_tokens(module, args, kwargs):  # this layer's tokens stop being a grid of the call
        return (args[0][:, :10], *args[1:]), kwargs

    diffaccel.apply(model, "neighborhood", kernel_size=3, backend="torch")
    handle = attn.register_forward_pre_hook(ten_tokens, with_kwargs=True)
    try:
        with pytest.raises(LayoutError, match=r"10 image tokens.*matches no token grid") as e:
            run(model, unet_inputs(model, 8, 8))
        assert name in str(e.value)
        # outside a tracked call a processor without grid= says how to give it a layout
        with torch.no_grad(), pytest.raises(LayoutError, match="track_layout"):
            attn(torch.randn(1, 10, attn.to_q.in_features))
    finally:
        handle.remove()
        diffaccel.remove(model)


def test_unet_grids_follow_downsampling():
    model = tiny_unet()
    assert unet_grids(model, 9, 13) == ((9, 13), (5, 7))
    assert unet_grids(model, 8, 8) == ((8, 8), (4, 4))
    assert unet_grids(model, 1, 3) == ((1, 3), (1, 2))
    assert Layout(((9, 13), (5, 7))).grid_for(35) == (5, 7)
    with pytest.raises(LayoutError):
        Layout(((9, 13),)).grid_for(36)


def test_flux_target_grid_from_ids_and_kontext_references_as_global_tokens():
    assert image_grid_from_ids(flux_image_ids(3, 5), "FLUX") == ((3, 5), 15)
    ids = flux_image_ids(3, 5)
    kontext = torch.cat([ids, torch.cat([torch.ones(8, 1), flux_image_ids(2, 4)[:, 1:]], 1)])  # a 2x4 reference
    assert image_grid_from_ids(kontext, "FLUX") == ((3, 5), 15)
    with pytest.raises(LayoutError, match="rectangular grid"):
        image_grid_from_ids(ids[:-1], "FLUX")  # a partial grid
    with pytest.raises(LayoutError, match="rectangular grid"):
        image_grid_from_ids(ids.flip(0), "FLUX")  # not row-major

    # FLUX Kontext: the reference tokens after the target are global tokens: a window covering the target
    # reproduces the model, a small one changes the target and leaves no reference token unseen
    model = tiny_flux()
    x = flux_inputs(model, 3, 5)
    x["img_ids"] = kontext
    x["hidden_states"] = torch.cat([x["hidden_states"], torch.randn(1, 8, x["hidden_states"].shape[-1])], 1)
    ref = run(model, x)
    core = RecordingCore()
    out = run_with_processor(model, x, make_processor("flux", core))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert core.calls == [((3, 5), 5 + 8, True, 5 + 15 + 8)] * 2  # [text; refs] moved before the grid
    diffaccel.apply(model, "neighborhood", kernel_size=5, backend="torch")
    try:
        torch.testing.assert_close(run(model, x), ref, atol=1e-5, rtol=1e-5)
    finally:
        diffaccel.remove(model)


def test_track_layout_is_idempotent_and_leaves_models_without_processors_alone():
    model = tiny_wan()
    x = TINY["wan"][1](model, 2, 4, 4)
    ref = run(model, x)
    t1 = diffaccel.track_layout(model)
    t2 = diffaccel.track_layout(model)
    assert t1 is t2 and len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(current_context()))
    assert torch.equal(run(model, x), ref)  # nothing of ours in the model: inputs untouched
    handle.remove()
    assert seen[0] is not None and seen[0].model is model and seen[0].layout.grids == ((2, 2, 2),)
    assert current_context() is None  # popped after the call
    untrack_layout(model)
    assert get_tracker(model) is None and len(model._forward_pre_hooks) == 0 and len(model._forward_hooks) == 0


# ---------------------------------------------------------------------------------------------
# the pattern at the attention-layer level: a key outside a query's window does not reach it


def _seen_by(grid, kernel_size, key):
    """Which queries of ``grid`` have image token ``key`` in their window (reference semantics)."""
    mask = neighborhood_mask(grid, kernel_size, (1,) * len(grid), (1,) * len(grid))
    return mask[:, key].reshape(grid)


def _perturb_key(attn, token):
    def hook(module, args, out):
        out = out.clone()
        out[:, token] += 3.0
        return out

    return attn.to_k.register_forward_hook(hook)


def test_far_key_does_not_reach_query_flux_joint():
    torch.manual_seed(0)
    model = tiny_flux()
    attn = model.transformer_blocks[0].attn
    grid, ks = (6, 10), 3
    core = functools.partial(ops.neighborhood_attention, kernel_size=ks, backend="torch")
    undo = swap_processors(model, {"transformer_blocks.0.attn": FluxProcessor(core, grid=grid)})
    hs = torch.randn(1, 60, attn.query_dim)
    ehs = torch.randn(1, 5, attn.query_dim)
    try:
        with torch.no_grad():
            img0, txt0 = attn(hs, ehs)
            handle = _perturb_key(attn, 59)  # image token (5, 9), bottom-right corner
            img1, txt1 = attn(hs, ehs)
            handle.remove()
    finally:
        undo()
    changed = (img1 - img0).abs().amax(-1)[0].reshape(grid) > 0
    expect = _seen_by(grid, (3, 3), 59)
    assert expect.sum() == 4 and expect[4:, 8:].all()  # windows shift inward at borders
    assert torch.equal(changed, expect)
    assert ((txt1 - txt0).abs().amax(-1) > 0).all()  # text queries see every key


def test_far_key_does_not_reach_query_unet_and_wan():
    torch.manual_seed(0)
    model = tiny_unet()
    name = _self_attn_names(model, "unet")[0]
    attn = model.get_submodule(name)
    core = functools.partial(ops.neighborhood_attention, kernel_size=(3, 5), backend="torch")
    undo = swap_processors(model, {name: UNetProcessor(core, grid=(5, 8))})
    hs = torch.randn(2, 40, attn.to_q.in_features)
    try:
        with torch.no_grad():
            a = attn(hs)
            handle = _perturb_key(attn, 0)  # (0, 0)
            b = attn(hs)
            handle.remove()
    finally:
        undo()
    changed = (b - a).abs().amax(-1)[1].reshape(5, 8) > 0
    expect = _seen_by((5, 8), (3, 5), 0)
    assert 0 < expect.sum() < 40
    assert torch.equal(changed, expect)

    model = tiny_wan()
    attn = model.blocks[0].attn1
    grid = (3, 4, 5)
    core = functools.partial(ops.neighborhood_attention, kernel_size=(1, 3, 3), backend="torch")
    undo = swap_processors(model, {"blocks.0.attn1": WanProcessor(core, grid=grid)})
    hs = torch.randn(1, 60, attn.to_q.in_features)
    try:
        with torch.no_grad():
            a = attn(hs)
            handle = _perturb_key(attn, 59)  # (2, 3, 4)
            b = attn(hs)
            handle.remove()
    finally:
        undo()
    changed = (b - a).abs().amax(-1)[0].reshape(grid) > 0
    expect = _seen_by(grid, (1, 3, 3), 59)
    assert expect[:2].sum() == 0 and expect[2].sum() == 4
    assert torch.equal(changed, expect)


def test_self_attention_mask_is_rejected():
    model = tiny_unet()
    name = _self_attn_names(model, "unet")[0]
    attn = model.get_submodule(name)
    undo = swap_processors(model, {name: UNetProcessor(dense_core, grid=(2, 2))})
    try:
        with torch.no_grad(), pytest.raises(ValueError, match="attention_mask"):
            attn(torch.randn(1, 4, attn.to_q.in_features), attention_mask=torch.ones(1, 4))
    finally:
        undo()
    proc = SD3Processor(dense_core, grid=(2, 2))
    sd3 = TINY["sd3"][0]()
    with pytest.raises(ValueError, match="attention_mask"):
        proc(sd3.transformer_blocks[0].attn2, torch.randn(1, 4, 16), attention_mask=torch.ones(1, 4))


# ---------------------------------------------------------------------------------------------
# swap_processors


def test_swap_processors_is_all_or_nothing_and_undoes_exactly():
    model = tiny_unet()
    before = model.attn_processors
    names = _self_attn_names(model, "unet")
    with pytest.raises(ValueError, match="no module"):
        swap_processors(model, {names[0]: UNetProcessor(dense_core), "down_blocks.7.attn1": UNetProcessor(dense_core)})
    with pytest.raises(ValueError, match="not an attention module"):
        swap_processors(model, {names[0]: UNetProcessor(dense_core), "conv_in": UNetProcessor(dense_core)})
    assert all(before[k] is v for k, v in model.attn_processors.items())
    undo = swap_processors(model, {n + ".processor": UNetProcessor(dense_core) for n in names})
    assert all(isinstance(model.get_submodule(n).processor, PatternProcessor) for n in names)
    undo()
    assert all(before[k] is v for k, v in model.attn_processors.items())


def test_torch_compile_does_not_crash():
    model = tiny_flux()
    x = flux_inputs(model, 4, 4)
    diffaccel.apply(model, "neighborhood", kernel_size=3, backend="torch")
    try:
        ref = run(model, x)
        compiled = torch.compile(model, backend="eager")
        torch.testing.assert_close(run(compiled, x), ref)
    finally:
        diffaccel.remove(model)
