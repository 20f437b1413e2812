"""The "clear" method on tiny FLUX / SD3 models: semantics, CLEAR checkpoints, RoPE and scale options."""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import diffaccel
from diffaccel.methods.clear import ClearFluxProcessor, clear_filename, save_clear
from diffaccel.processors import make_processor
from tiny_models import flux_inputs, run, sd3_inputs, tiny_flux, tiny_pipeline, tiny_sd3

FAMILIES = {
    "flux": (tiny_flux, lambda m, h, w, **kw: flux_inputs(m, height=h, width=w, **kw), 1),
    "sd3": (tiny_sd3, lambda m, h, w, **kw: sd3_inputs(m, height=2 * h, width=2 * w, **kw), 2),
}


def _setup(family, h=5, w=7, **kw):
    factory, inputs, _ = FAMILIES[family]
    model = factory()
    return model, inputs(model, h, w, **kw)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _clear_like_checkpoint(model):
    """A checkpoint built the way CLEAR's distill.py saves one: every named parameter whose name
    contains '.attn.to_q.', '.attn.to_k.', '.attn.to_v.', '.attn.to_out.' or 'spatial_weight'."""
    keep = (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".attn.to_out.", "spatial_weight")
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if any(s in n for s in keep)}


def _perturb_attention(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".attn" in n and any(s in n for s in (".to_q.", ".to_k.", ".to_v.", ".to_out.", "spatial_weight")):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


# ---------------------------------------------------------------------------------------------
# semantics


@pytest.mark.parametrize("text_len", [5, 0])
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_radius_covering_the_grid_reproduces_the_model(family, text_len):
    model, x = _setup(family, text_len=text_len, batch=2)
    ref = run(model, x)
    diffaccel.apply(model, "clear", radius=100)
    try:
        out = run(model, x)
    finally:
        diffaccel.remove(model)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(model, x), ref, atol=0, rtol=0)  # remove restores exactly


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_small_radius_changes_the_output_and_second_resolution_works(family):
    model, x = _setup(family)
    ref = run(model, x)
    diffaccel.apply(model, "clear", radius=1.5, down_factor=2)
    try:
        out = run(model, x)
        assert not torch.allclose(out, ref, atol=1e-3)
        # another resolution and aspect ratio, another text length, no re-initialisation
        _, inputs, _ = FAMILIES[family]
        x2 = inputs(model, 4, 9, text_len=3)
        out2 = run(model, x2)
        assert torch.isfinite(out2).all()
    finally:
        diffaccel.remove(model)
    ref2 = run(model, x2)
    assert out2.shape == ref2.shape and not torch.allclose(out2, ref2, atol=1e-3)


def test_far_image_key_does_not_reach_a_query_outside_the_radius():
    """Only the circle matters: changing the input far from a token changes its attention output
    only through text and pooled tokens (none here) -> FLUX double block, one layer."""
    model = tiny_flux(num_single_layers=0)
    x = flux_inputs(model, height=6, width=6, text_len=0)
    diffaccel.apply(model, "clear", radius=2)
    try:
        out = run(model, x)
        x2 = dict(x, hidden_states=x["hidden_states"].clone())
        x2["hidden_states"][:, 35] += 5.0  # bottom-right corner; the top-left token is 7 rows/cols away
        out2 = run(model, x2)
    finally:
        diffaccel.remove(model)
    torch.testing.assert_close(out[:, 0], out2[:, 0], atol=0, rtol=0)
    assert not torch.allclose(out[:, 35], out2[:, 35])


def test_processors_are_modules_with_learnable_spatial_weight():
    model, x = _setup("flux")
    model.requires_grad_(False)
    diffaccel.apply(model, "clear", radius=2, down_factor=2)
    try:
        names = [n for n, _ in model.named_parameters() if n.endswith("spatial_weight")]
        assert names == ["transformer_blocks.0.attn.processor.spatial_weight",
                         "single_transformer_blocks.0.attn.processor.spatial_weight"]
        sw = model.get_parameter(names[0])
        assert sw.shape == (1, 1, 1, 2, 1, 2, 1) and torch.allclose(sw, torch.full_like(sw, 0.25))
        for n in names:
            model.get_parameter(n).requires_grad_(True)
        model(**x, return_dict=False)[0].square().sum().backward()
        assert all(model.get_parameter(n).grad is not None and model.get_parameter(n).grad.abs().sum() > 0
                   for n in names)
    finally:
        diffaccel.remove(model)


def test_down_factor_one_means_no_pooling_and_options_are_validated():
    model, x = _setup("flux")
    diffaccel.apply(model, "clear", radius=2, down_factor=1)
    try:
        assert not any(n.endswith("spatial_weight") for n, _ in model.named_parameters())
    finally:
        diffaccel.remove(model)
    for bad, word in [(dict(radius=0), "radius"), (dict(radius=2, down_factor=0), "down_factor"),
                      (dict(radius=2, ntk_factor=-1), "ntk_factor"), (dict(radius=2, train_tokens=1), "train_tokens"),
                      (dict(radius=2, backend="gpu"), "backend"), (dict(radius=2, window=3), "window"),
                      (dict(radius=2, weights=3), "weights"), (dict(radius=2, weights_file="x.safetensors"), "weights")]:
        with pytest.raises(ValueError, match=word):
            diffaccel.apply(model, "clear", **bad)
    assert diffaccel.api.applied_method(model) is None


def test_triton_backend_end_to_end():
    model, x = _setup("flux", 4, 5, text_len=3)
    diffaccel.apply(model, "clear", radius=2, down_factor=2)
    try:
        out_torch = run(model, x)
    finally:
        diffaccel.remove(model)
    diffaccel.apply(model, "clear", radius=2, down_factor=2, backend="triton")
    try:
        out_triton = run(model, x)
    finally:
        diffaccel.remove(model)
    torch.testing.assert_close(out_triton, out_torch, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# checkpoints


def test_clear_checkpoint_loads_changes_output_round_trips_and_remove_restores(tmp_path):
    # "trained" model: CLEAR applied, attention projections and spatial weights changed
    trained, x = _setup("flux")
    diffaccel.apply(trained, "clear", radius=2, down_factor=2)
    _perturb_attention(trained)
    want = run(trained, x)
    ckpt = _clear_like_checkpoint(trained)
    assert "single_transformer_blocks.0.attn.to_q.weight" in ckpt
    assert "transformer_blocks.0.attn.to_out.0.bias" in ckpt
    assert not any("add_q_proj" in k or "to_add_out" in k for k in ckpt)
    path = tmp_path / clear_filename(2, 2)
    assert path.name == "clear_local_2_down_2.safetensors"
    save_file(ckpt, str(path))

    model, _ = _setup("flux")
    before, ref = _params(model), run(model, x)
    pipe = tiny_pipeline(transformer=model)
    diffaccel.apply(pipe, "clear", radius=2, down_factor=2, weights=str(path))
    try:
        torch.testing.assert_close(run(model, x), want, atol=1e-6, rtol=1e-6)
        out_path = tmp_path / "saved.safetensors"
        assert save_clear(pipe, out_path) == out_path
        saved = load_file(str(out_path))
        assert set(saved) == set(ckpt)
        for k in ckpt:
            torch.testing.assert_close(saved[k], ckpt[k], atol=0, rtol=0)
    finally:
        diffaccel.remove(pipe)
    # remove restores processors and the original projections exactly
    after = _params(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    torch.testing.assert_close(run(model, x), ref, atol=0, rtol=0)
    # the saved file loads again, from a folder + default name too
    other, _ = _setup("flux")
    diffaccel.apply(other, "clear", radius=2, down_factor=2, weights=str(tmp_path))
    try:
        torch.testing.assert_close(run(other, x), want, atol=1e-6, rtol=1e-6)
    finally:
        diffaccel.remove(other)


def test_sd3_checkpoint_state_dict_round_trip():
    trained, x = _setup("sd3")
    diffaccel.apply(trained, "clear", radius=2)
    _perturb_attention(trained)
    want = run(trained, x)
    state = diffaccel.methods.clear.clear_state_dict(trained)
    assert "transformer_blocks.0.attn2.to_q.weight" in state and "transformer_blocks.1.attn.to_out.0.weight" in state
    diffaccel.remove(trained)
    model, _ = _setup("sd3")
    diffaccel.apply(model, "clear", radius=2, weights=state)
    try:
        torch.testing.assert_close(run(model, x), want, atol=1e-6, rtol=1e-6)
    finally:
        diffaccel.remove(model)


def test_bad_checkpoint_one_error_listing_every_problem_and_model_unchanged(tmp_path):
    trained, _ = _setup("flux")
    diffaccel.apply(trained, "clear", radius=2, down_factor=2)
    ckpt = _clear_like_checkpoint(trained)
    good = tmp_path / "good.safetensors"
    save_file(ckpt, str(good))
    diffaccel.remove(trained)
    ckpt.pop("transformer_blocks.0.attn.to_k.bias")  # missing
    ckpt["transformer_blocks.0.attn.to_v.weight"] = torch.zeros(7, 32)  # wrong shape
    ckpt["transformer_blocks.0.attn.to_x.weight"] = torch.zeros(2)  # unexpected
    path = tmp_path / "bad.safetensors"
    save_file(ckpt, str(path))

    model, x = _setup("flux")
    before, ref, procs = _params(model), run(model, x), dict(model.attn_processors)
    with pytest.raises(ValueError) as err:
        diffaccel.apply(model, "clear", radius=2, down_factor=2, weights=str(path))
    msg = str(err.value)
    for word in ("transformer_blocks.0.attn.to_k.bias", "transformer_blocks.0.attn.to_v.weight [7, 32]",
                 "transformer_blocks.0.attn.to_x.weight", "nothing was loaded"):
        assert word in msg
    after = _params(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert {k: type(v) for k, v in model.attn_processors.items()} == {k: type(v) for k, v in procs.items()}
    assert diffaccel.api.applied_method(model) is None
    torch.testing.assert_close(run(model, x), ref, atol=0, rtol=0)

    # pooled weights without down_factor: the error says which down_factor to pass
    with pytest.raises(ValueError, match="down_factor=2"):
        diffaccel.apply(model, "clear", radius=2, weights=str(good))
    assert diffaccel.api.applied_method(model) is None


def test_checkpoint_keys_of_unpatched_layers_are_left_alone(tmp_path):
    trained, x = _setup("flux")
    diffaccel.apply(trained, "clear", radius=2)
    _perturb_attention(trained)
    ckpt = _clear_like_checkpoint(trained)
    diffaccel.remove(trained)
    model, _ = _setup("flux")
    before = _params(model)
    diffaccel.apply(model, "clear", radius=2, weights=ckpt, layers="transformer_blocks.*")
    try:
        after = _params(model)
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert changed == {k for k in ckpt if k.startswith("transformer_blocks.")}
    finally:
        diffaccel.remove(model)


def test_hub_repo_id_resolves_the_release_file_name_from_the_local_cache(tmp_path, monkeypatch):
    """weights="owner/name": hf_hub_download of clear_local_{r}[_down_{d}].safetensors (here offline,
    from a Hub cache laid out as huggingface_hub does)."""
    from huggingface_hub import constants

    trained, x = _setup("flux")
    diffaccel.apply(trained, "clear", radius=3, down_factor=2)
    _perturb_attention(trained)
    want = run(trained, x)
    rev = "0" * 40
    repo = tmp_path / "models--Huage001--CLEAR"
    (repo / "snapshots" / rev).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    save_clear(trained, repo / "snapshots" / rev / "clear_local_3_down_2.safetensors")
    diffaccel.remove(trained)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    model, _ = _setup("flux")
    diffaccel.apply(model, "clear", radius=3, down_factor=2, weights="Huage001/CLEAR")
    try:
        torch.testing.assert_close(run(model, x), want, atol=1e-6, rtol=1e-6)
    finally:
        diffaccel.remove(model)


def test_weights_not_found_and_offline_hub_errors(tmp_path, monkeypatch):
    model, _ = _setup("flux")
    with pytest.raises(ValueError, match="no such file"):
        diffaccel.apply(model, "clear", radius=8, weights=str(tmp_path / "nope.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="clear_local_8_down_4.safetensors.*Huage001/CLEAR.*HF_HUB_OFFLINE"):
        diffaccel.apply(model, "clear", radius=8, down_factor=4, weights="Huage001/CLEAR")
    assert diffaccel.api.applied_method(model) is None


# ---------------------------------------------------------------------------------------------
# high-resolution options


def test_ntk_factor_scales_rope_theta_and_remove_restores_pos_embed():
    model, x = _setup("flux")
    pos_embed = model.pos_embed
    ref = run(model, x)
    diffaccel.apply(model, "clear", radius=100, ntk_factor=1)
    try:
        assert model.pos_embed is pos_embed
        torch.testing.assert_close(run(model, x), ref, atol=1e-5, rtol=1e-5)
    finally:
        diffaccel.remove(model)
    diffaccel.apply(model, "clear", radius=100, ntk_factor=10)
    try:
        assert model.pos_embed is not pos_embed and model.pos_embed.theta == pos_embed.theta * 10
        out = run(model, x)
    finally:
        diffaccel.remove(model)
    assert model.pos_embed is pos_embed
    assert not torch.allclose(out, ref, atol=1e-4)
    # expected: the dense model with RoPE theta * 10
    pos_embed.theta *= 10
    try:
        torch.testing.assert_close(out, run(model, x), atol=1e-5, rtol=1e-5)
    finally:
        pos_embed.theta /= 10


def test_ntk_factor_on_sd3_is_an_error():
    model, _ = _setup("sd3")
    with pytest.raises(ValueError, match="ntk_factor"):
        diffaccel.apply(model, "clear", radius=4, ntk_factor=10)
    assert diffaccel.api.applied_method(model) is None


def _dense_with_scale(scale):
    def core(q, k, v, *, grid, text_len, text_first):
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), scale=scale).transpose(1, 2)
    return core


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_proportional_attention_scale(family):
    model, x = _setup(family)  # 5 x 7 grid + 5 text tokens
    n, head_dim = 35 + 5, model.config.attention_head_dim
    ref = run(model, x)
    # base = N is a no-op (SD3.5's image-only attn2 sees fewer tokens: left out here)
    diffaccel.apply(model, "clear", radius=100, proportional_attention=True, train_tokens=n, layers="*.attn")
    try:
        torch.testing.assert_close(run(model, x), ref, atol=1e-5, rtol=1e-5)
    finally:
        diffaccel.remove(model)
    base = 7
    diffaccel.apply(model, "clear", radius=100, proportional_attention=True, train_tokens=base)
    try:
        out = run(model, x)
    finally:
        diffaccel.remove(model)
    assert not torch.allclose(out, ref, atol=1e-4)
    # expected: dense attention with softmax scale sqrt(log_base(N) / D) in every layer
    scale = math.sqrt(math.log(n, base) / head_dim)
    if family == "sd3":  # SD3.5's image-only attn2 sees N = 35 tokens
        procs = {name: make_processor("sd3", _dense_with_scale(
            math.sqrt(math.log(35 if name.endswith("attn2.processor") else n, base) / head_dim)))
            for name in model.attn_processors}
    else:
        procs = {name: make_processor("flux", _dense_with_scale(scale)) for name in model.attn_processors}
    original = dict(model.attn_processors)
    model.set_attn_processor(procs)
    diffaccel.track_layout(model)
    try:
        torch.testing.assert_close(out, run(model, x), atol=1e-5, rtol=1e-5)
    finally:
        diffaccel.layout.untrack_layout(model)
        model.set_attn_processor(original)


def test_default_proportional_base_and_clear_down_factor_quirk():
    p = ClearFluxProcessor(8, proportional_attention=True)
    assert p.train_tokens == 64 * 64 + 512
    assert p.softmax_scale(4608, 128) == pytest.approx(128 ** -0.5)
    assert p.softmax_scale(4 * 4608, 128) > 128 ** -0.5
    p10 = ClearFluxProcessor(8, down_factor=4, proportional_attention=True, proportional_n_factor=10)
    assert p10.softmax_scale(16896, 128) == pytest.approx(math.sqrt(math.log(10 * 16896, 4608) / 128))
    assert ClearFluxProcessor(8).softmax_scale(16896, 128) is None
