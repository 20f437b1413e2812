"""diffaccel.apply / remove with the "neighborhood" method on tiny UNet, FLUX, SD3 and Wan."""
import pytest
import torch

import diffaccel
from diffaccel.api import applied_method
from diffaccel.families import self_attention_layers
from diffaccel.layout import LayoutError, get_tracker, untrack_layout
from diffaccel.methods.neighborhood import NeighborhoodOptions
from diffaccel.processors import PatternProcessor
from diffaccel.registry import Method, register_method
from tiny_models import TINY, run, tiny_pipeline, tiny_unet, tiny_wan, unet_inputs

# (first size, second size with another aspect ratio); UNet sizes are odd on purpose
SIZES = {
    "unet": (dict(height=9, width=13), dict(height=8, width=6)),
    "flux": (dict(height=6, width=10), dict(height=7, width=4)),
    "sd3": (dict(height=12, width=8), dict(height=6, width=14)),
    "wan": (dict(frames=3, height=6, width=10), dict(frames=2, height=8, width=4)),
}
WHOLE = {"unet": 64, "flux": 64, "sd3": 64, "wan": (8, 64, 64)}
SMALL = {"unet": 3, "flux": 3, "sd3": (3, 1), "wan": (1, 3, 3)}


def _ours(model):
    return {n: m.processor for n, m in model.named_modules() if isinstance(getattr(m, "processor", None), PatternProcessor)}


@pytest.mark.parametrize("family", ["unet", "flux", "sd3", "wan"])
def test_whole_grid_window_reproduces_model_small_window_changes_it(family):
    factory, inputs = TINY[family]
    model = factory()
    before = model.attn_processors
    hooks_before = len(model._forward_pre_hooks)
    xs = [inputs(model, batch=2, **size) for size in SIZES[family]]  # batch 2: a CFG-style call
    refs = [run(model, x) for x in xs]

    diffaccel.apply(model, "neighborhood", kernel_size=WHOLE[family], backend="torch")
    assert applied_method(model) == "neighborhood"
    assert len(_ours(model)) == len(self_attention_layers(model, family))
    for x, ref in zip(xs, refs):  # two resolutions / aspect ratios, no re-initialisation
        torch.testing.assert_close(run(model, x), ref, atol=1e-5, rtol=1e-5)
    diffaccel.remove(model)

    diffaccel.apply(model, "neighborhood", kernel_size=SMALL[family], backend="torch")
    for x, ref in zip(xs, refs):
        out = run(model, x)
        assert out.shape == ref.shape and torch.isfinite(out).all()
        assert (out - ref).abs().max() > 1e-3
    # the two CFG halves stay independent: the batch-2 result equals two batch-1 calls
    x1 = {k: (v[:1] if torch.is_tensor(v) and v.dim() > 1 and v.shape[0] == 2 else v) for k, v in xs[0].items()}
    if family != "unet":
        x1["timestep"] = xs[0]["timestep"][:1]
    torch.testing.assert_close(run(model, x1), run(model, xs[0])[:1], atol=1e-5, rtol=1e-5)

    assert diffaccel.remove(model) is True
    assert all(before[k] is v for k, v in model.attn_processors.items())  # the same objects
    assert len(model._forward_pre_hooks) == hooks_before and get_tracker(model) is None
    for x, ref in zip(xs, refs):
        assert torch.equal(run(model, x), ref)  # bit-identical
    assert diffaccel.remove(model) is False  # nothing left to remove: no-op


def test_unet_cross_attention_untouched_and_layers_patterns():
    model = tiny_unet()
    diffaccel.apply(model, "neighborhood", kernel_size=3, backend="torch", layers="down_blocks.1")
    try:
        assert list(_ours(model)) == ["down_blocks.1.attentions.0.transformer_blocks.0.attn1"]
    finally:
        diffaccel.remove(model)
    diffaccel.apply(model, "neighborhood", kernel_size=3, backend="torch", layers=["mid_block.*", "up_blocks.*.attn1"])
    try:
        names = list(_ours(model))
        assert len(names) == 5 and all(n.endswith("attn1") for n in names)
        assert not any(n.startswith("down_blocks") for n in names)
        run(model, unet_inputs(model, 9, 13))
    finally:
        diffaccel.remove(model)
    diffaccel.apply(model, "neighborhood", kernel_size=3, backend="torch")
    try:
        assert all(n.endswith("attn1") for n in _ours(model))  # attn2 (cross-attention) never patched
    finally:
        diffaccel.remove(model)


def test_apply_to_pipeline():
    unet = tiny_unet()
    pipe = tiny_pipeline(unet=unet, transformer=None)
    x = unet_inputs(unet, 9, 13, batch=2)
    ref = run(unet, x)
    assert diffaccel.apply(pipe, "neighborhood", kernel_size=64, backend="torch") is pipe
    assert applied_method(pipe.unet) == "neighborhood" and _ours(pipe.unet)
    torch.testing.assert_close(run(pipe.unet, x), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already has diffaccel method 'neighborhood'"):
        diffaccel.apply(pipe, "neighborhood", kernel_size=3)
    assert diffaccel.remove(pipe) is True
    assert not _ours(unet) and torch.equal(run(unet, x), ref)


def test_pipeline_apply_is_all_or_nothing_across_denoisers():
    unet, wan = tiny_unet(), tiny_wan()
    pipe = tiny_pipeline(unet=unet, transformer=wan)
    before = {id(m): m.attn_processors for m in (unet, wan)}
    # 2 values fit the UNet (patched first) but not Wan's (T, H, W) grid: the UNet must be restored
    with pytest.raises(ValueError, match=r"kernel_size=\(3, 3\) has 2 values"):
        diffaccel.apply(pipe, "neighborhood", kernel_size=(3, 3))
    for m in (unet, wan):
        assert all(before[id(m)][k] is v for k, v in m.attn_processors.items())
        assert applied_method(m) is None and get_tracker(m) is None
    diffaccel.apply(pipe, "neighborhood", kernel_size=3, backend="torch")
    assert _ours(unet) and _ours(wan)
    diffaccel.remove(pipe)
    assert not _ours(unet) and not _ours(wan)


def test_failing_install_changes_nothing():
    def install(model, family, options, layers):
        raise RuntimeError("boom")

    register_method(Method(name="_test_failing", options_cls=NeighborhoodOptions, install=install, families=("unet",)))
    model = tiny_unet()
    before = model.attn_processors
    try:
        with pytest.raises(RuntimeError, match="boom"):
            diffaccel.apply(model, "_test_failing", kernel_size=3)
    finally:
        diffaccel.registry._METHODS.pop("_test_failing")
    assert all(before[k] is v for k, v in model.attn_processors.items())
    assert applied_method(model) is None and get_tracker(model) is None


def test_user_tracker_is_kept_by_remove():
    model = tiny_unet()
    tracker = diffaccel.track_layout(model)
    diffaccel.apply(model, "neighborhood", kernel_size=3, backend="torch")
    assert get_tracker(model) is tracker
    seen = []
    handle = model.down_blocks[0].register_forward_pre_hook(
        lambda m, a: seen.append(diffaccel.context.current_context().layout.grids))
    run(model, unet_inputs(model, 9, 13))
    handle.remove()
    assert seen == [((9, 13), (5, 7))]
    diffaccel.remove(model)
    assert get_tracker(model) is tracker
    untrack_layout(model)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="nope", kernel_size=3), "method must be one of"),
        (dict(method="neighborhood", kernel_size=3, kernal=2), r"unknown option\(s\) \['kernal'\]"),
        (dict(method="neighborhood"), "kernel_size is required"),
        (dict(method="neighborhood", kernel_size=0), "kernel_size must be >= 1"),
        (dict(method="neighborhood", kernel_size=(3, "a")), "kernel_size"),
        (dict(method="neighborhood", kernel_size=(3, 3, 3, 3)), "kernel_size"),
        (dict(method="neighborhood", kernel_size=3, dilation=-1), "dilation"),
        (dict(method="neighborhood", kernel_size=3, stride=5), "stride"),
        (dict(method="neighborhood", kernel_size=3, backend="cuda"), "backend"),
        (dict(method="neighborhood", kernel_size=(3, 3, 3)), r"kernel_size=\(3, 3, 3\) has 3 values"),
        (dict(method="neighborhood", kernel_size=3, layers="down_blocks.9.*"), r"match no self-attention layer"),
        (dict(method="neighborhood", kernel_size=3, layers=["*.attn2"]), r"\['\*.attn2'\] match no"),
        (dict(method="neighborhood", kernel_size=3, layers=[]), "layers"),
    ],
)
def test_apply_errors_change_nothing(kwargs, match):
    model = tiny_unet()
    before = model.attn_processors
    kwargs = dict(kwargs)
    method = kwargs.pop("method")
    with pytest.raises(ValueError, match=match):
        diffaccel.apply(model, method, **kwargs)
    assert all(before[k] is v for k, v in model.attn_processors.items())
    assert applied_method(model) is None and get_tracker(model) is None


def test_unsupported_models_and_processors():
    with pytest.raises(ValueError, match="unsupported model Linear"):
        diffaccel.apply(torch.nn.Linear(2, 2), "neighborhood", kernel_size=3)
    with pytest.raises(ValueError, match="expected a diffusers DiffusionPipeline or a denoiser model, got dict"):
        diffaccel.apply({}, "neighborhood", kernel_size=3)
    with pytest.raises(ValueError, match="unsupported model Linear"):
        diffaccel.track_layout(torch.nn.Linear(2, 2))
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Custom(AttnProcessor2_0):
        pass

    model = tiny_unet()
    model.set_attn_processor(Custom())
    with pytest.raises(ValueError, match="runs Custom, not the stock processor"):
        diffaccel.apply(model, "neighborhood", kernel_size=3)


def test_options_dataclass():
    o = NeighborhoodOptions(kernel_size=[5, 7], dilation=1, stride=(1, 2))
    assert o.kernel_size == (5, 7) and o.stride == (1, 2)
    with pytest.raises(ValueError, match="dilation"):
        NeighborhoodOptions(kernel_size=(3, 3), dilation=(1, 1, 1))
    with pytest.raises(ValueError, match="kernel_size"):
        NeighborhoodOptions(kernel_size=True)


def test_layout_error_message_when_grid_is_not_findable():
    from tiny_models import flux_image_ids, flux_inputs, tiny_flux

    model = tiny_flux()
    diffaccel.apply(model, "neighborhood", kernel_size=3, backend="torch")
    try:
        x = flux_inputs(model, 4, 4)
        x["img_ids"] = flux_image_ids(4, 4)[torch.randperm(16)]
        with pytest.raises(LayoutError):
            run(model, x)
        # inference tensors have no version counter: the img_ids check runs on every call
        with torch.inference_mode():
            x = flux_inputs(model, 4, 4)
            assert model(**x, return_dict=False)[0].shape == (1, 16, 4)
            x["img_ids"] = flux_image_ids(4, 4)[torch.randperm(16)]
            with pytest.raises(LayoutError):
                model(**x)
    finally:
        diffaccel.remove(model)


def test_method_and_layers_arguments_are_checked_like_every_option():
    """A method given as a list is a ValueError naming `method`; `layers=` as a generator is read once and still
    checked pattern by pattern."""
    model = tiny_unet()
    with pytest.raises(ValueError, match="method"):
        diffaccel.apply(model, ["neighborhood"], kernel_size=3)
    with pytest.raises(ValueError, match=r"\['nope\.\*'\] match no self-attention layer"):
        diffaccel.apply(model, "neighborhood", kernel_size=3, layers=(p for p in ["down_blocks.1", "nope.*"]))
    assert applied_method(model) is None and get_tracker(model) is None
    diffaccel.apply(model, "neighborhood", kernel_size=3, backend="torch", layers=(p for p in ["down_blocks.1"]))
    try:
        assert list(_ours(model)) == ["down_blocks.1.attentions.0.transformer_blocks.0.attn1"]
    finally:
        diffaccel.remove(model)


def test_trainable_parameters_follow_the_method():
    from tiny_models import tiny_flux

    flux = tiny_flux()
    with pytest.raises(ValueError, match="no diffaccel method"):
        diffaccel.trainable_parameters(flux)
    diffaccel.apply(flux, "neighborhood", kernel_size=3, backend="torch", layers="single_transformer_blocks.*")
    try:
        params = diffaccel.trainable_parameters(flux)
        attn = flux.single_transformer_blocks[0].attn
        assert {id(p) for p in params} == {id(p) for m in attn.modules() if isinstance(m, torch.nn.Linear)
                                            for p in m.parameters()}
    finally:
        diffaccel.remove(flux)
    # a joint (MM-DiT) layer: the image stream's projections train, the text stream's own stay frozen -- exactly
    # what a projections.safetensors holds (the same list for neighborhood, MoBA and CLEAR)
    from diffaccel.projections import projection_keys

    for method, options in (("neighborhood", dict(kernel_size=3)), ("moba", dict(block=2, topk=1)),
                            ("clear", dict(radius=2))):
        diffaccel.apply(flux, method, backend="torch", layers="transformer_blocks.*", **options)
        try:
            attn = flux.transformer_blocks[0].attn
            params = {id(p) for p in diffaccel.trainable_parameters(flux)}
            assert params == {id(p) for p in projection_keys([("a", attn)]).values()}
            mine = {id(p) for m in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]) for p in m.parameters()}
            assert params == mine and not params & {id(p) for p in attn.add_q_proj.parameters()}
        finally:
            diffaccel.remove(flux)
    unet = tiny_unet()
    pipe = tiny_pipeline(unet=unet, transformer=None)
    diffaccel.apply(pipe, "linfusion")
    try:
        from diffaccel.methods.linfusion import linfusion_parameters

        assert [id(p) for p in diffaccel.trainable_parameters(pipe)] == [id(p) for p in linfusion_parameters(unet)]
    finally:
        diffaccel.remove(pipe)


def test_every_list_derives_from_the_registry():
    from diffaccel import bench, registry
    from diffaccel.cli import build_parser
    from diffaccel.pipelines.cli import GENERATE_METHODS

    names = registry.available_methods()
    assert GENERATE_METHODS == ("dense", *names)
    ops_ = {m.bench.op for m in registry.methods() if m.bench}
    assert set(bench.bench_ops()) == ops_ == {"neighborhood", "local", "moba", "linear"}
    assert {c.op for c in bench.default_cases("cpu")} == ops_
    op_action = next(a for a in build_parser()._subparsers._group_actions[0].choices["bench"]._actions
                     if a.dest == "op")
    assert sorted(op_action.choices) == sorted(ops_)
    for m in registry.methods():  # default settings are valid options of the method
        assert m.default_settings is not None, m.name
        for grid in ((16, 16), (4, 8, 8)):
            for options in m.default_settings(grid):
                registry.build_options(m, options)


def test_two_threads_see_their_own_call_context():
    """Two threads running one patched model at two sizes at once: each call uses its own layout."""
    import threading

    from tiny_models import tiny_wan, wan_inputs

    model = tiny_wan()
    xs = [wan_inputs(model, frames=2, height=h, width=w) for h, w in ((4, 6), (8, 4))]
    diffaccel.apply(model, "neighborhood", kernel_size=(1, 3, 3), backend="torch")
    try:
        refs = [run(model, x) for x in xs]
        outs, errors = {}, []

        def work(i):
            try:
                outs[i] = [run(model, xs[i % 2]) for _ in range(5)]
            except Exception as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        diffaccel.remove(model)
    assert not errors, errors
    for i, results in outs.items():
        assert all(torch.equal(r, refs[i % 2]) for r in results)
