"""HunyuanVideo and CogVideoX (1.0 / 1.5): layouts, processors mirroring the stock ones, "moba" and
"neighborhood" through diffaccel.apply, HunyuanVideo's padded text."""
import functools

import pytest
import torch
import torch.nn.functional as F

import diffaccel
from diffaccel import ops
from diffaccel.context import current_context
from diffaccel.families import get_family, self_attention_layers
from diffaccel.processors import CogVideoXProcessor, HunyuanVideoProcessor, make_processor
from tiny_models import (
    cogvideox_inputs,
    hunyuan_video_inputs,
    run,
    run_with_processor,
    tiny_cogvideox,
    tiny_cogvideox15,
    tiny_hunyuan_video,
    tiny_pipeline,
)

# name -> (family, factory, inputs helper, first size, second size); sizes are (frames, height, width) of
# the latent; tokens: HunyuanVideo (F, H/2, W/2), CogVideoX 1.0 (F, H/2, W/2), 1.5 (F/2, H/2, W/2)
MODELS = {
    "hunyuan_video": ("hunyuan_video", tiny_hunyuan_video, hunyuan_video_inputs, (2, 8, 8), (3, 6, 10)),
    "cogvideox": ("cogvideox", tiny_cogvideox, cogvideox_inputs, (3, 8, 8), (2, 6, 10)),
    "cogvideox15": ("cogvideox", tiny_cogvideox15, cogvideox_inputs, (4, 8, 8), (2, 6, 10)),
}
GRIDS = {  # token grids of the first and second size
    "hunyuan_video": ((2, 4, 4), (3, 3, 5)),
    "cogvideox": ((3, 4, 4), (2, 3, 5)),
    "cogvideox15": ((2, 4, 4), (1, 3, 5)),
}
COVER = 10_000  # a topk / kernel size covering every block / the whole grid


@functools.lru_cache(maxsize=None)
def _model(name):
    return MODELS[name][1]()


def _inputs(name, size, **kw):
    model = _model(name)
    frames, height, width = size
    return MODELS[name][2](model, frames=frames, height=height, width=width, **kw)


def dense_core(q, k, v, *, grid, text_len, text_first):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


class RecordingCore:
    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, *, grid, text_len, text_first):
        self.calls.append((tuple(grid), text_len, text_first, q.shape[0], q.shape[1]))
        return dense_core(q, k, v, grid=grid, text_len=text_len, text_first=text_first)


def _processors(model):
    return {n: type(m.processor).__name__ for n, m in model.named_modules() if hasattr(m, "processor")}


# ---------------------------------------------------------------------------------------------
# families and layers


def test_families_and_patched_layers():
    hv, cog = _model("hunyuan_video"), _model("cogvideox")
    assert diffaccel.families.detect_family(hv) == "hunyuan_video"
    assert diffaccel.families.detect_family(cog) == "cogvideox"
    assert diffaccel.families.detect_family(_model("cogvideox15")) == "cogvideox"
    # the token refiner's text-only attention is not a video self-attention
    assert [n for n, _ in self_attention_layers(hv, "hunyuan_video")] == [
        "transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    assert [n for n, _ in self_attention_layers(cog, "cogvideox")] == [
        "transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]

    before = _processors(hv)
    diffaccel.apply(hv, "moba", block=2, topk=1, backend="torch")
    try:
        after = _processors(hv)
        assert after["transformer_blocks.0.attn"] == "HunyuanVideoProcessor"
        assert after["single_transformer_blocks.0.attn"] == "HunyuanVideoProcessor"
        refiner = "context_embedder.token_refiner.refiner_blocks.0.attn"
        assert after[refiner] == before[refiner] == "AttnProcessor2_0"
    finally:
        diffaccel.remove(hv)
    assert _processors(hv) == before


def test_clear_and_linfusion_do_not_take_video_models():
    for method, opts in [("clear", dict(radius=4)), ("linfusion", {})]:
        with pytest.raises(ValueError, match="does not support"):
            diffaccel.apply(_model("cogvideox"), method, **opts)


# ---------------------------------------------------------------------------------------------
# processors mirror the stock ones (dense core), one processor object on every attention layer


@pytest.mark.parametrize("name", list(MODELS))
def test_processor_with_dense_core_mirrors_stock(name):
    family = MODELS[name][0]
    model = _model(name)
    extra = dict(valid_text=[5, 3]) if family == "hunyuan_video" else {}
    x = _inputs(name, MODELS[name][3], batch=2, **extra)
    ref = run(model, x)
    core = RecordingCore()
    # HunyuanVideo: the refiner attention gets it too and must run its stock processor unchanged
    out = run_with_processor(model, x, make_processor(family, core))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    grid = GRIDS[name][0]
    n = grid[0] * grid[1] * grid[2]
    if family == "hunyuan_video":
        # per layer: batch element 0 (5 valid text tokens) and 1 (3 valid) apart, text after the video
        assert core.calls == [(grid, 5, False, 1, n + 5), (grid, 3, False, 1, n + 3)] * 2
    else:
        assert core.calls == [(grid, 5, True, 2, n + 5)] * 2


# ---------------------------------------------------------------------------------------------
# moba: covering top-k reproduces, top-1 changes, second size, remove is exact


@pytest.mark.parametrize("name", list(MODELS))
def test_moba_covering_reproduces_top1_changes_remove_exact(name):
    model = _model(name)
    x = _inputs(name, MODELS[name][3])
    ref = run(model, x)
    pipe = tiny_pipeline(transformer=model)  # through a pipeline
    diffaccel.apply(pipe, "moba", block=(1, 2, 2), topk=COVER, backend="torch")
    try:
        torch.testing.assert_close(run(model, x), ref, atol=1e-5, rtol=1e-5)
    finally:
        diffaccel.remove(pipe)
    diffaccel.apply(model, "moba", block=(1, 2, 2), topk=1, backend="torch")
    try:
        assert (run(model, x) - ref).abs().max() > 1e-3
    finally:
        diffaccel.remove(model)
    assert torch.equal(run(model, x), ref)  # remove restores the model exactly


@pytest.mark.parametrize("name", list(MODELS))
def test_moba_second_size_reads_the_layout_per_call(name):
    model = _model(name)
    sizes, grids = MODELS[name][3:5], GRIDS[name]
    xs = [_inputs(name, s) for s in sizes]
    refs = [run(model, x) for x in xs]
    # VMoBA-style cycle over the two layers: temporal blocks, then spatio-temporal ones (partial at borders)
    diffaccel.apply(model, "moba", partitions=[(1, None, None), (2, 2, 3)], topk=COVER, backend="torch")
    seen = []
    block = model.transformer_blocks[0]
    handle = block.register_forward_pre_hook(lambda m, a: seen.append(current_context().layout.single_grid))
    try:
        for x, ref in zip(xs, refs):
            torch.testing.assert_close(run(model, x), ref, atol=1e-5, rtol=1e-5)
    finally:
        handle.remove()
        diffaccel.remove(model)
    assert seen == list(grids)
    diffaccel.apply(model, "moba", block=(1, 2, 2), topk=1, backend="torch")
    try:
        out = run(model, xs[1])
        assert out.shape == refs[1].shape and torch.isfinite(out).all()
        assert (out - refs[1]).abs().max() > 1e-3
    finally:
        diffaccel.remove(model)


def test_moba_block_must_have_three_axes():
    with pytest.raises(ValueError, match="3-axis token grids"):
        diffaccel.apply(_model("hunyuan_video"), "moba", block=(2, 2), topk=1)
    with pytest.raises(ValueError, match="3 values"):
        diffaccel.apply(_model("cogvideox"), "neighborhood", kernel_size=(3, 3))


# ---------------------------------------------------------------------------------------------
# neighborhood: a kernel covering the grid reproduces, a small one changes


@pytest.mark.parametrize("name", list(MODELS))
def test_neighborhood_covering_reproduces(name):
    model = _model(name)
    x = _inputs(name, MODELS[name][4])
    ref = run(model, x)
    diffaccel.apply(model, "neighborhood", kernel_size=COVER, backend="torch")
    try:
        torch.testing.assert_close(run(model, x), ref, atol=1e-5, rtol=1e-5)
    finally:
        diffaccel.remove(model)
    diffaccel.apply(model, "neighborhood", kernel_size=(1, 3, 3), backend="torch")
    try:
        assert (run(model, x) - ref).abs().max() > 1e-3
    finally:
        diffaccel.remove(model)
    assert torch.equal(run(model, x), ref)


# ---------------------------------------------------------------------------------------------
# HunyuanVideo with padded text


@pytest.mark.parametrize("method,options", [
    ("moba", dict(block=(1, 2, 2), topk=COVER)),
    ("neighborhood", dict(kernel_size=COVER)),
])
def test_hunyuan_padded_text_reproduces_unpatched(method, options):
    model = _model("hunyuan_video")
    x = _inputs("hunyuan_video", (2, 8, 8), batch=3, valid_text=[2, 5, 2])  # groups {2: [0, 2], 5: [1]}
    ref = run(model, x)
    diffaccel.apply(model, method, backend="torch", **options)
    try:
        out = run(model, x)
    finally:
        diffaccel.remove(model)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_hunyuan_padded_text_keys_are_invisible_under_a_sparse_pattern():
    """The stock model never lets padded text reach a valid token; a sparse pattern must not either
    (a processor that kept the padded keys would change with them)."""
    model = _model("hunyuan_video")
    x = _inputs("hunyuan_video", (2, 8, 8), batch=2, valid_text=[5, 2])
    y = dict(x, encoder_hidden_states=x["encoder_hidden_states"].clone())
    y["encoder_hidden_states"][1, 2:] += 5.0  # change only the padded text of batch element 1
    assert torch.equal(run(model, x), run(model, y))  # the stock model ignores it
    diffaccel.apply(model, "moba", block=(1, 2, 2), topk=1, backend="torch")
    try:
        a, b = run(model, x), run(model, y)
        dense_pad = dict(x, encoder_attention_mask=torch.ones_like(x["encoder_attention_mask"]))
        c = run(model, dense_pad)  # with the padding treated as valid text, element 1 changes
    finally:
        diffaccel.remove(model)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert (c[1] - a[1]).abs().max() > 1e-4
    torch.testing.assert_close(c[0], a[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("layer", ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"])
def test_hunyuan_layer_matches_stock_processor_with_padded_text(layer):
    """Attention-layer level, every output row, padded text query rows included."""
    torch.manual_seed(0)
    model = _model("hunyuan_video")
    attn = model.get_submodule(layer)
    stock = attn.processor
    grid, n_text = (2, 3, 4), 6
    n_img = 24
    dim = attn.query_dim
    hs, ehs = torch.randn(4, n_img, dim), torch.randn(4, n_text, dim)
    rope = model.rope(torch.zeros(1, 1, 2, 6, 8))
    valid = torch.tensor([4, 6, 1, 4])  # batch elements grouped by valid length, out of order
    mask = torch.cat([torch.ones(4, n_img, dtype=torch.bool),
                      torch.arange(n_text)[None, :] < valid[:, None]], 1)[:, None, None, :]
    with torch.no_grad():
        ref_img, ref_txt = stock(attn, hs, ehs, attention_mask=mask, image_rotary_emb=rope)
        cores = [functools.partial(ops.moba_attention, block=(1, 2, 2), topk=COVER, backend="torch"),
                 functools.partial(ops.neighborhood_attention, kernel_size=COVER, backend="torch")]
        for core in cores:
            proc = HunyuanVideoProcessor(core, grid=grid)
            img, txt = proc(attn, hs, ehs, attention_mask=mask, image_rotary_emb=rope)
            torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=1e-5)
        # all text valid: one core call with the whole text; the mask may also be left out
        full = torch.ones(4, 1, 1, n_img + n_text, dtype=torch.bool)
        ref_img, ref_txt = stock(attn, hs, ehs, attention_mask=full, image_rotary_emb=rope)
        rec = RecordingCore()
        proc = HunyuanVideoProcessor(rec, grid=grid)
        for m in (full, None):
            img, txt = proc(attn, hs, ehs, attention_mask=m, image_rotary_emb=rope)
            torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=1e-5)
        assert rec.calls == [(grid, n_text, False, 4, n_img + n_text)] * 2


def _layer_call(mask):
    model = _model("hunyuan_video")
    attn = model.transformer_blocks[0].attn
    proc = HunyuanVideoProcessor(dense_core, grid=(1, 2, 2))
    with torch.no_grad():
        return proc(attn, torch.randn(2, 4, attn.query_dim), torch.randn(2, 3, attn.query_dim), attention_mask=mask)


@pytest.mark.parametrize("mask,match", [
    (torch.ones(2, 1, 1, 7), "boolean"),  # a float mask adding +1 to the logits, not hiding keys
    (torch.ones(2, 1, 1, 6, dtype=torch.bool), "shape"),  # wrong length
    (torch.ones(3, 1, 1, 7, dtype=torch.bool), "shape"),  # wrong batch
    (torch.ones(2, 2, 1, 7, dtype=torch.bool), "shape"),  # per head
    (torch.tensor([[0, 1, 1, 1, 1, 1, 1]] * 2, dtype=torch.bool)[:, None, None], "image tokens"),
    (torch.eye(7, dtype=torch.bool)[None, None].expand(2, 1, 7, 7), "some queries"),  # not a padding mask
    ("yes", "torch.Tensor"),
])
def test_hunyuan_bad_attention_mask_is_a_clear_error(mask, match):
    with pytest.raises(ValueError, match=f"attention_mask.*{match}"):
        _layer_call(mask)
    # the forms the processor accepts: [B, N], a broadcast batch of 1, an additive 0 / -inf mask, a hole in the
    # text (any pattern of valid text: Qwen-Image's mask may have one), a per-query mask with every key valid
    ok = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    hole = torch.tensor([[1, 1, 1, 1, 1, 0, 1]] * 2, dtype=torch.bool)
    assert _layer_call(ok)[0].shape == (2, 4, 12 * 2)
    assert _layer_call(ok[:1, None, None])[1].shape == (2, 3, 12 * 2)
    assert _layer_call(torch.zeros(2, 7).masked_fill(~ok, float("-inf")))[0].shape == (2, 4, 12 * 2)
    assert _layer_call(hole)[0].shape == (2, 4, 12 * 2)
    assert _layer_call(torch.ones(2, 1, 7, 7, dtype=torch.bool))[0].shape == (2, 4, 12 * 2)


def test_hunyuan_text_with_a_hole_matches_stock():
    torch.manual_seed(0)
    model = _model("hunyuan_video")
    attn = model.transformer_blocks[0].attn
    hs, ehs = torch.randn(2, 4, attn.query_dim), torch.randn(2, 3, attn.query_dim)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 1], [1, 1, 1, 1, 0, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        ref = attn.processor(attn, hs, ehs, attention_mask=mask[:, None, None])
        out = HunyuanVideoProcessor(dense_core, grid=(1, 2, 2))(attn, hs, ehs, attention_mask=mask)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_hunyuan_mask_is_read_once_per_call(monkeypatch):
    """The model passes one mask object to every block: its host read happens once per call."""
    from diffaccel import context

    reads = []
    real = context.key_padding
    monkeypatch.setattr(context, "key_padding", lambda *a: reads.append(1) or real(*a))
    model = _model("hunyuan_video")
    x = _inputs("hunyuan_video", (2, 8, 8), batch=2, valid_text=[5, 3])
    diffaccel.apply(model, "neighborhood", kernel_size=3, backend="torch")
    try:
        run(model, x)
        assert len(reads) == 1  # two patched layers, one mask tensor
        run(model, x)
        assert len(reads) == 2  # a new call builds a new mask
    finally:
        diffaccel.remove(model)


def test_cogvideox_rejects_attention_mask_and_reads_frames_before_channels():
    model = _model("cogvideox")
    attn = model.transformer_blocks[0].attn1
    proc = CogVideoXProcessor(dense_core, grid=(1, 2, 2))
    with torch.no_grad(), pytest.raises(ValueError, match="attention_mask"):
        proc(attn, torch.randn(1, 4, 16), torch.randn(1, 5, 16), attention_mask=torch.ones(1, 9))
    # layout: [B, F, C, H, W]; CogVideoX 1.5 groups patch_size_t = 2 latent frames per token
    fn = get_family("cogvideox").layout
    hs = torch.zeros(1, 4, 4, 6, 10)
    ehs = torch.zeros(1, 7, 16)
    get = {"hidden_states": hs, "encoder_hidden_states": ehs}.get
    assert fn(model, get).grids == ((4, 3, 5),) and fn(model, get).text_len == 7
    assert fn(_model("cogvideox15"), get).grids == ((2, 3, 5),)
    hv_get = {"hidden_states": torch.zeros(1, 4, 3, 6, 10), "encoder_hidden_states": ehs}.get
    assert get_family("hunyuan_video").layout(_model("hunyuan_video"), hv_get).grids == ((3, 3, 5),)


@pytest.mark.parametrize("name", ["hunyuan_video", "cogvideox15"])
def test_triton_backend_covering_reproduces(name):
    """The Triton kernels (interpreted on CPU) on the processors' sliced / transposed inputs."""
    model = _model(name)
    extra = dict(batch=2, valid_text=[5, 3]) if name == "hunyuan_video" else {}
    x = _inputs(name, (2, 4, 4), **extra)  # token grids (2, 2, 2) / (1, 2, 2): 2 / 1 blocks of (1, 2, 2)
    ref = run(model, x)
    # topk=2 keeps every block of these grids (as COVER would) with one step of the interpreted gate loop
    diffaccel.apply(model, "moba", block=(1, 2, 2), topk=2, backend="triton")
    try:
        torch.testing.assert_close(run(model, x), ref, atol=1e-5, rtol=1e-5)
    finally:
        diffaccel.remove(model)
