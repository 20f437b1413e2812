"""The current diffusers families (FLUX.2, FLUX.3, Chroma, Qwen-Image, Qwen-Image 2.1, HunyuanVideo 1.5, LTX-2,
Z-Image) and Wan 2.2, on tiny models built from config dicts: a pattern covering everything reproduces the unpatched
model, a small one changes it, `remove` is bit-identical, other sizes work without re-applying, padded text,
reference images as global tokens, torch.compile.

torch.compile(fullgraph=True) is tested on Qwen-Image (LTX-2 compiles too; it is left out for time).  Not with
fullgraph: FLUX.2, FLUX.3 and Chroma (diffaccel reads their grid from img_ids on the host: a graph break, see the
README); HunyuanVideo 1.5 (the stock model indexes its text by the mask: data-dependent shapes), Qwen-Image 2.1
(the stock model reads img_mask on the host) and Z-Image (diffusers' own tests mark its fullgraph compile broken)."""
import functools

import pytest
import torch

import diffaccel
from diffaccel.api import applied_method
from diffaccel.families import detect_family, get_family, self_attention_layers
from diffaccel.layout import LayoutError
from diffaccel.processors import PatternProcessor
from tiny_models import TINY, output_of, tiny_pipeline, tiny_wan, wan_inputs

# family -> (first size, second size with another aspect ratio) as keyword arguments of the inputs helper
SIZES = {
    "flux2": (dict(height=4, width=6), dict(height=5, width=3)),
    "flux3": (dict(height=4, width=6), dict(height=5, width=3)),
    "chroma": (dict(height=4, width=6), dict(height=5, width=3)),
    "qwenimage": (dict(height=4, width=6), dict(height=5, width=3)),
    "qwenimage21": (dict(height=4, width=6), dict(height=6, width=2)),
    "hunyuan_video15": (dict(frames=2, height=4, width=6), dict(frames=1, height=6, width=4)),
    "ltx2": (dict(frames=2, height=4, width=6), dict(frames=3, height=5, width=3)),
    "zimage": (dict(height=8, width=12), dict(height=10, width=6)),
}
NEW = list(SIZES)
VIDEO = {"hunyuan_video15", "ltx2"}
COVER = 64
# the self-attention layers each tiny model gets patched (all others untouched)
LAYERS = {
    "flux2": ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"],
    "flux3": ["mode_blocks.image.0.attn", "single_transformer_blocks.0.attn"],
    "chroma": ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"],
    "qwenimage": ["transformer_blocks.0.attn", "transformer_blocks.1.attn"],
    "qwenimage21": ["transformer_blocks.0.attn", "transformer_blocks.1.attn"],
    "hunyuan_video15": ["transformer_blocks.0.attn", "transformer_blocks.1.attn"],
    "ltx2": ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"],
    "zimage": ["noise_refiner.0.attention", "layers.0.attention"],
}


@functools.lru_cache(maxsize=None)
def _model(family):
    return TINY[family][0]()


def _inputs(family, size, **kw):
    return TINY[family][1](_model(family), **size, **kw)


def run(model, inputs):
    with torch.no_grad():
        return output_of(model(**inputs, return_dict=False))


def _small(family):
    return (1, 1, 1) if family in VIDEO else 1


def _processors(model):
    return {n: m.processor for n, m in model.named_modules() if hasattr(m, "set_processor")}


def _ours(model):
    return sorted(n for n, m in model.named_modules() if isinstance(getattr(m, "processor", None), PatternProcessor))


@pytest.mark.parametrize("family", NEW)
def test_cover_reproduces_small_changes_remove_is_exact(family):
    model = _model(family)
    assert detect_family(model) == family
    assert [n for n, _ in self_attention_layers(model, family)] == LAYERS[family]
    before = _processors(model)
    xs = [_inputs(family, size, batch=2) for size in SIZES[family]]  # batch 2: a CFG-style call
    refs = [run(model, x) for x in xs]
    for method, cover in (("neighborhood", dict(kernel_size=COVER)), ("moba", dict(block=2, topk=COVER))):
        diffaccel.apply(model, method, backend="torch", **cover)
        try:
            assert _ours(model) == sorted(LAYERS[family])
            for x, ref in zip(xs, refs):  # two sizes / aspect ratios, no re-applying
                torch.testing.assert_close(run(model, x), ref, atol=2e-5, rtol=2e-5)
        finally:
            diffaccel.remove(model)
    diffaccel.apply(model, "neighborhood", kernel_size=_small(family), backend="torch")
    try:
        for x, ref in zip(xs, refs):
            out = run(model, x)
            assert out.shape == ref.shape and torch.isfinite(out).all()
            assert (out - ref).abs().max() > 1e-3
    finally:
        assert diffaccel.remove(model)
    assert all(before[k] is v for k, v in _processors(model).items())
    for x, ref in zip(xs, refs):
        assert torch.equal(run(model, x), ref)


# family -> (inputs with one padded batch element, the input holding the padded text, its padded positions)
PADDED = {
    "chroma": (dict(batch=2, valid_text=[5, 2]), "encoder_hidden_states", (1, slice(2, None))),
    "qwenimage": (dict(batch=2, valid_text=[5, 3]), "encoder_hidden_states", (1, slice(3, None))),
    "qwenimage21": (dict(batch=2, valid_text=[4, 2]), "encoder_hidden_states", (1, slice(2, 4))),
    "hunyuan_video15": (dict(batch=2, valid_text=[6, 3]), "encoder_hidden_states", (1, slice(3, None))),
    "zimage": (dict(batch=2, text_lens=[6, 40]), None, None),  # 32- and 64-token captions: a padded batch
}


@pytest.mark.parametrize("family", list(PADDED))
def test_padded_text_in_one_batch_element(family):
    model = _model(family)
    kw, name, where = PADDED[family]
    x = _inputs(family, SIZES[family][0], **kw)
    ref = run(model, x)
    diffaccel.apply(model, "moba", block=2, topk=COVER, backend="torch")
    try:
        torch.testing.assert_close(run(model, x), ref, atol=2e-5, rtol=2e-5)
    finally:
        diffaccel.remove(model)
    if name is None:
        return
    # the padded text never reaches a valid token, in the stock model and under a sparse pattern
    y = dict(x)
    y[name] = x[name].clone()
    y[name][where] += 3.0
    assert torch.equal(run(model, x)[0], run(model, y)[0])
    diffaccel.apply(model, "neighborhood", kernel_size=_small(family), backend="torch")
    try:
        a, b = run(model, x), run(model, y)
    finally:
        diffaccel.remove(model)
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)
    if family != "qwenimage21":  # the prefix rows of Qwen-Image 2.1 are in its output too
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_chroma_float_mask_is_read_as_valid_tokens():
    """ChromaPipeline's 0/1 float mask (added to the logits by the stock processor) hides the padded text under
    diffaccel, as the boolean mask does in the stock model."""
    model = _model("chroma")
    x = _inputs("chroma", SIZES["chroma"][0], batch=2, valid_text=[5, 2])
    ref = run(model, x)  # boolean mask: padded text hidden
    y = dict(x, attention_mask=x["attention_mask"].float())
    assert not torch.allclose(run(model, y), ref, atol=1e-5)  # the stock float mask does not hide it
    diffaccel.apply(model, "neighborhood", kernel_size=COVER, backend="torch")
    try:
        torch.testing.assert_close(run(model, y), ref, atol=2e-5, rtol=2e-5)
    finally:
        diffaccel.remove(model)


# family -> inputs with reference / condition images after the target
REFERENCES = {
    "flux2": dict(height=4, width=4, refs=[(2, 3), (3, 2)]),  # FLUX.2 multi-reference
    "flux3": dict(height=4, width=4, ref=(2, 3)),
    "qwenimage": dict(height=4, width=4, cond=(2, 3)),  # Qwen-Image-Edit
    "qwenimage21": dict(height=4, width=4, cond=(2, 2)),
}


def _reference_tokens(family, x):
    """(input name, token slice) of the reference images."""
    if family == "flux3":
        return "image_cond_hidden_states", slice(None)
    if family == "qwenimage21":
        return "hidden_states", slice(0, 4)
    return "hidden_states", slice(16, None)


@pytest.mark.parametrize("family", list(REFERENCES))
def test_reference_images_are_global_tokens(family):
    """A window covering the target reproduces the model; under the smallest window every target token still
    sees every reference token (changing the references changes every target token)."""
    model = _model(family)
    x = _inputs(family, REFERENCES[family])
    ref = run(model, x)
    diffaccel.apply(model, "neighborhood", kernel_size=4, backend="torch")
    try:
        torch.testing.assert_close(run(model, x), ref, atol=2e-5, rtol=2e-5)
    finally:
        diffaccel.remove(model)
    name, tokens = _reference_tokens(family, x)
    y = dict(x)
    y[name] = x[name].clone()
    y[name][:, tokens] += 1.0
    diffaccel.apply(model, "neighborhood", kernel_size=1, backend="torch")
    try:
        a, b = run(model, x), run(model, y)
    finally:
        diffaccel.remove(model)
    assert (a - ref).abs().max() > 1e-3
    target = slice(-16, None) if family == "qwenimage21" else slice(0, 16)  # output rows of the target tokens
    changed = (a[:, target] - b[:, target]).abs().amax(-1) > 1e-6
    assert changed.all(), changed


def test_wan22_two_experts_and_ti2v_per_token_timesteps():
    """Wan 2.2 A14B: `transformer` and `transformer_2` both patched and counting one sequence of steps;
    TI2V-5B: per-token timesteps ([B, tokens])."""
    high, low = tiny_wan(seed=1), tiny_wan(seed=2)
    pipe = tiny_pipeline(transformer=high)
    pipe.register_modules(transformer_2=low)
    x = wan_inputs(high, frames=2, height=4, width=6)
    refs = {t: (run(high, {**x, "timestep": torch.tensor([t])}), run(low, {**x, "timestep": torch.tensor([t])}))
            for t in (900.0, 500.0, 100.0)}
    diffaccel.apply(pipe, "moba", block=(1, 1, 1), topk=1, dense_steps=2, backend="torch")
    try:
        assert applied_method(high) == applied_method(low) == "moba"
        assert len(_ours(high)) == len(_ours(low)) == 2
        assert torch.equal(run(high, {**x, "timestep": torch.tensor([900.0])}), refs[900.0][0])  # step 0: dense
        assert torch.equal(run(low, {**x, "timestep": torch.tensor([500.0])}), refs[500.0][1])  # step 1: dense
        out = run(low, {**x, "timestep": torch.tensor([100.0])})  # step 2 (the other expert counted too): sparse
        assert (out - refs[100.0][1]).abs().max() > 1e-3
        tokens = 2 * 2 * 3
        per_token = torch.full((1, tokens), 900.0)
        per_token[:, :6] = 0.0  # TI2V: the conditioning frame's tokens at t = 0
        assert torch.isfinite(run(high, {**x, "timestep": per_token})).all()
    finally:
        diffaccel.remove(pipe)
    assert not _ours(high) and not _ours(low)


def test_ltx2_audio_stays_on_full_attention():
    model = _model("ltx2")
    audio = [n for n, m in model.named_modules() if hasattr(m, "processor") and "audio" in n]
    assert audio and not set(audio) & set(LAYERS["ltx2"])
    before = {n: model.get_submodule(n).processor for n in audio}
    diffaccel.apply(model, "moba", block=1, topk=1, backend="torch")
    try:
        assert all(model.get_submodule(n).processor is p for n, p in before.items())
    finally:
        diffaccel.remove(model)
    x = _inputs("ltx2", SIZES["ltx2"][0])
    # video_coords given instead of the sizes: the model runs, the layout has no grid to read
    x["video_coords"] = model.rope.prepare_video_coords(1, x.pop("num_frames"), x.pop("height"), x.pop("width"),
                                                        torch.device("cpu"), fps=x["fps"])
    diffaccel.apply(model, "neighborhood", kernel_size=1, backend="torch")
    try:
        with pytest.raises(LayoutError, match="num_frames"):
            run(model, x)
    finally:
        diffaccel.remove(model)


def test_unwrapped_processors_and_modes_are_clear_errors():
    from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21FlexAttnProcessor

    flux2 = TINY["flux2"][0]()
    flux2.transformer_blocks[0].attn.set_processor(Flux2KVAttnProcessor())
    with pytest.raises(ValueError, match="runs Flux2KVAttnProcessor, not the stock processor"):
        diffaccel.apply(flux2, "neighborhood", kernel_size=3)
    assert applied_method(flux2) is None
    qwen = TINY["qwenimage21"][0]()
    qwen.set_attn_processor(QwenImage21FlexAttnProcessor())
    with pytest.raises(ValueError, match="runs QwenImage21FlexAttnProcessor"):
        diffaccel.apply(qwen, "moba", block=2, topk=1)
    x = _inputs("zimage", SIZES["zimage"][0])
    x["x"] = [[x["x"][0], x["x"][0]]]  # omni mode: condition images
    with pytest.raises(LayoutError, match="omni"):
        get_family("zimage").layout(_model("zimage"), x.get)


@pytest.mark.parametrize("family", ["flux2", "chroma", "qwenimage"])
def test_clear_on_mm_dit_families(family):
    model = _model(family)
    x = _inputs(family, SIZES[family][0], batch=2)
    ref = run(model, x)
    diffaccel.apply(model, "clear", radius=100, backend="torch")
    try:
        torch.testing.assert_close(run(model, x), ref, atol=2e-5, rtol=2e-5)
    finally:
        diffaccel.remove(model)
    diffaccel.apply(model, "clear", radius=1, down_factor=2, backend="torch")
    try:
        assert (run(model, x) - ref).abs().max() > 1e-3
        params = diffaccel.trainable_parameters(model)
        assert sum(p.dim() == 7 for p in params) == len(LAYERS[family])  # one spatial_weight per layer
    finally:
        diffaccel.remove(model)
    assert torch.equal(run(model, x), ref)


def test_compile_fullgraph():
    """Qwen-Image reads its layout from img_shapes and shapes: the patched model compiles with fullgraph=True,
    the diffaccel parts (hook, call context, wrapped stock processor) tracing without a break.  (FLUX-style
    families read their grid from img_ids on the host and break the graph there: see the README.)"""
    model = _model("qwenimage")
    x = _inputs("qwenimage", dict(height=2, width=2))
    # the Triton kernels are torch custom ops (one graph node; interpreted on CPU): the tiniest shape
    diffaccel.apply(model, "neighborhood", kernel_size=3, backend="triton")
    try:
        eager = run(model, x)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
        torch.testing.assert_close(run(compiled, x), eager, atol=1e-5, rtol=1e-5)
    finally:
        diffaccel.remove(model)
        torch._dynamo.reset()


def test_triton_backend_on_the_tiniest_shapes():
    """The Triton kernels (interpreted on CPU) on the wrapped processors: Qwen-Image 2.1's target-only queries
    and FLUX.2's reference tokens moved in front of the grid."""
    for family, size in (("qwenimage21", dict(height=2, width=2, cond=(2, 2))),
                         ("flux2", dict(height=2, width=2, refs=[(1, 2)]))):
        model = _model(family)
        x = _inputs(family, size)
        ref = run(model, x)
        diffaccel.apply(model, "moba", block=2, topk=COVER, backend="triton")
        try:
            torch.testing.assert_close(run(model, x), ref, atol=2e-5, rtol=2e-5)
        finally:
            diffaccel.remove(model)
