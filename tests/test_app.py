"""The Gradio demo's functions: model and method lists from the registry, option fields from the options
dataclasses, every bad request refused before any generation, runs with progress, the pattern picture."""
import dataclasses
import os

import pytest

import app
from diffaccel.registry import available_methods, get_method


def _request(**kw):
    base = dict(model="small-flux", method="neighborhood", options={"kernel_size": "5"}, height=32, width=32,
                steps=2, compare=True)
    base.update(kw)
    return app.Request(**base)


def _forwards(model_name):
    """A list that grows by one per completed denoiser forward of the cached pipeline."""
    done = []
    app.probe.denoiser_of(app.load_model(model_name)).register_forward_hook(lambda *a: done.append(1))
    return done


# ------------------------------------------------------------------------------------- lists and fields


@pytest.mark.parametrize("family", ["flux", "unet", "wan", "sd3"])
def test_methods_are_the_registry_entries_for_the_family(family):
    expected = ["dense"] + [m for m in available_methods() if family in get_method(m).families]
    assert app.supported_methods(family) == expected
    assert ("linfusion" in expected) == (family == "unet") and ("clear" in expected) == (family in ("flux", "sd3"))


def test_option_fields_come_from_the_options_dataclass():
    for method in available_methods():
        cls = get_method(method).options_cls
        names = [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]
        fields = app.option_fields(method)
        assert [f.name for f in fields] == names
        for f, dc in zip(fields, [d for d in dataclasses.fields(cls) if d.name in names]):
            if dc.default is not dataclasses.MISSING:
                assert f.default == dc.default
    kinds = {f.name: f.kind for f in app.option_fields("clear")}
    assert kinds["radius"] == "float" and kinds["proportional_attention"] == "bool"
    assert kinds["backend"] == "choice" and kinds["down_factor"] == "literal"  # int | None: empty = None
    radius = next(f for f in app.option_fields("clear") if f.name == "radius")
    assert radius.default is app.REQUIRED and "required" in radius.label and "circular window" in radius.help
    assert app.option_fields("dense") == []


def test_parse_options_types_defaults_and_required():
    assert app.parse_options("neighborhood", {"kernel_size": "(9, 7)", "dilation": "", "stride": "1",
                                              "backend": "auto"}) == {"kernel_size": (9, 7)}
    assert app.parse_options("clear", {"radius": 4, "down_factor": "", "weights": "Huage001/CLEAR",
                                       "proportional_attention": True}) == \
        {"radius": 4.0, "weights": "Huage001/CLEAR", "proportional_attention": True}
    assert app.parse_options("moba", {"block": "(8, 8)", "topk": "2", "selection": "tile"}) == \
        {"block": (8, 8), "topk": 2, "selection": "tile"}
    with pytest.raises(ValueError, match="radius is required"):
        app.parse_options("clear", {"radius": None})
    # form values round-trip through the fields
    for f in app.option_fields("moba"):
        if f.default is not app.REQUIRED and f.kind != "bool":
            assert f.parse(f.initial()) in (app.REQUIRED, f.default, None)


def test_shipped_weights_are_the_default_where_they_exist():
    assert app.shipped_weights("small-unet", "linfusion") == "small-unet-linfusion"
    assert app.shipped_weights("small-flux", "clear") == "small-flux-clear"
    assert app.shipped_weights("small-flux", "moba") is None
    methods, native, video, frames, values = app.model_settings("small-unet")
    assert "clear" not in methods and "linfusion" in methods and native == (32, 32) and not video
    assert values["linfusion"]["weights"] == "small-unet-linfusion"
    assert values["neighborhood"]["kernel_size"] == "9"  # the small model's evaluated setting
    methods, native, video, frames, values = app.model_settings("small-flux")
    assert values["clear"]["weights"] == "small-flux-clear" and values["clear"]["radius"] == 8  # its training
    methods, native, video, frames, values = app.model_settings("small-wan")
    assert video and frames == 4 and "clear" not in methods
    assert values["neighborhood"]["weights"] == "small-wan-neighborhood"
    assert values["neighborhood"]["kernel_size"] == "(4, 5, 5)"


# ------------------------------------------------------------------------------ refused before any work


@pytest.mark.parametrize("kw,message", [
    (dict(model="no-such-model"), "no-such-model"),
    (dict(model=""), "model: give a small model name"),
    (dict(method="linfusion", options={}), "does not support small-flux"),
    (dict(method="nonsense"), "method must be one of"),
    (dict(options={"kernel_size": "abc"}), "kernel_size"),
    (dict(options={"kernel_size": ""}), "kernel_size is required"),
    (dict(options={"kernel_size": "(3, 3, 3)"}), "kernel_size"),  # 3 values on a 2-axis model
    (dict(options={"kernel_size": "5", "dilation": "9"}), "dilation"),  # 9 x 5 > the 16-token grid
    (dict(height=31), "height"),
    (dict(steps=0), "steps"),
    (dict(guidance_scale="much"), "guidance scale"),
    (dict(stages="64x64"), "stages"),
    (dict(height=8192, width=8192), "estimated"),
])
def test_bad_requests_are_refused_before_any_denoising(kw, message):
    done = _forwards("small-flux")
    with pytest.raises(ValueError, match=message):
        app.run(_request(**kw))
    assert not done
    assert app.applied_method(app.load_model("small-flux")) is None


def test_memory_refusal_states_the_estimate():
    with pytest.raises(ValueError) as e:
        app.plan(_request(height=8192, width=8192))
    text = str(e.value)
    assert "8192x8192 needs an estimated" in text and "GiB" in text and "16,777,236 tokens" in text
    assert "available on cpu" in text


# ---------------------------------------------------------------------------------------------- runs


def test_run_side_by_side_with_progress_and_report():
    steps = []
    dense, result, md, ctx = app.run(_request(), progress=lambda f, text: steps.append((f, text)))
    assert [round(f, 3) for f, _ in steps] == [0.25, 0.5, 0.75, 1.0]  # every step of both runs
    assert steps[0][1] == "full attention: stage 1/1, step 1/2" and steps[-1][1].startswith("neighborhood")
    assert dense.frames[0].size == result.frames[0].size == (32, 32)
    for text in ("| stage | size | steps | strength | full attention | neighborhood(kernel_size=5) |",
                 "| 1 | 32x32 | 2 |  | ", "Speedup over full attention", "peak memory", "Estimated memory need at 32x32"):
        assert text in md
    pic, caption = app.render_pattern(ctx, app.default_query(ctx.grid))
    assert "25 of 256 image tokens" in caption and "20 of 20 text tokens" in caption  # 5 x 5 window
    assert pic.size == (320, 320)
    big = app.viewable(result.frames)
    assert big.size == (320, 320)


def test_run_without_comparison_and_with_moba_captures_qk():
    dense, result, md, ctx = app.run(_request(method="moba", options={"block": "(4, 4)", "topk": "2"},
                                              compare=False))
    assert dense is None and "full attention" not in md.split("Estimated")[0]
    assert ctx.q is not None and ctx.q.shape == (20 + 256, 4, 32)  # recorded from the first layer
    pic, caption = app.render_pattern(ctx, (0, 0))
    assert "32 of 256 image tokens" in caption  # the own block and one more, 16 tokens each, in every head
    assert "share of heads" in caption


def test_video_run_shows_frames_and_a_3d_pattern():
    dense, result, md, ctx = app.run(_request(model="small-wan", options={"kernel_size": "(3, 5, 5)"},
                                              num_frames=2, compare=False))
    assert len(result.frames) == 2 and ctx.grid == (2, 8, 8)
    gif = app.viewable(result.frames)
    assert isinstance(gif, str) and gif.endswith(".gif") and os.path.getsize(gif) > 0
    pic, caption = app.render_pattern(ctx, (1, 0, 0))
    assert "frame 1, row 0, column 0" in caption and "50 of 128 image tokens" in caption  # 2 x 5 x 5
    w, h = app.displayed_size(ctx, panels=True)
    assert pic.size == (w, h)
    assert app.query_from_click(ctx, w - 1, h - 1, w, h, panels=True) == (1, 7, 7)
    assert app.query_from_click(ctx, 0, 0, w, h, panels=True) == (0, 0, 0)


def test_shipped_linfusion_weights_run():
    dense, result, md, ctx = app.run(_request(model="small-unet", method="linfusion",
                                              options={"weights": "small-unet-linfusion"}, compare=False))
    assert "weights='small-unet-linfusion'" in md
    assert "every query attends to every key" in app.render_pattern(ctx, (0, 0))[1]


def test_a_failure_during_generation_leaves_no_method_applied():
    p = app.plan(_request())

    def boom(*a):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        app.generate(p, "neighborhood", progress=boom)
    assert app.applied_method(p.pipe) is None
    app.run(_request(compare=False))  # and the next request runs


def test_a_target_above_the_native_size_runs_the_chain_stage_by_stage():
    """64x64 on small-flux (native 32x32): the chain of diffaccel.pipelines.highres, two stages, the second with
    the method applied; progress follows both stages and the report has a row per stage."""
    steps = []
    dense, result, md, _ = app.run(_request(height=64, width=64, compare=False),
                                   progress=lambda f, text: steps.append(text))
    assert [(s.height, s.width) for s in result.output.stages] == [(32, 32), (64, 64)]
    assert result.output.stages[0].method_label == "dense" and result.output.stages[1].method_label != "dense"
    assert result.frames[0].size == (64, 64)
    assert any("stage 2/2" in t for t in steps)
    assert "| 1 | 32x32 |" in md and "| 2 | 64x64 |" in md


def test_click_maps_to_tokens():
    ctx = app.PatternContext(core=None, method="dense", options={}, grid=(16, 16), text_len=0, text_first=True,
                             frames=[app.Image.new("RGB", (32, 32))])
    w, h = app.displayed_size(ctx, panels=False)
    assert (w, h) == (320, 320)
    assert app.query_from_click(ctx, 0, 0, w, h) == (0, 0)
    assert app.query_from_click(ctx, 319, 100, w, h) == (5, 15)


# ----------------------------------------------------------------------------------- page and server


def test_demo_builds():
    demo = app.build_demo()
    assert isinstance(demo, app.gr.Blocks)


def test_main_binds_localhost_and_honours_port(monkeypatch):
    launched = {}

    class Fake:
        def queue(self, **kw):
            launched["queue"] = kw

        def launch(self, **kw):
            launched.update(kw)

    monkeypatch.setattr(app, "build_demo", lambda model: Fake())
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    app.main([])
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7999
    assert launched["queue"]["default_concurrency_limit"] == 1
    app.main(["--host", "0.0.0.0", "--port", "8123"])
    assert launched["server_name"] == "0.0.0.0" and launched["server_port"] == 8123
