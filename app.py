"""diffaccel demo: the same prompt and seed with full attention and with a diffaccel method, side by side.

    pip install -e ".[demo]"
    python app.py                      # http://127.0.0.1:7860

Offline by default: the small shapes models shipped in ``pipelines/small/models``
(``small-flux``, ``small-unet``); a local diffusers pipeline folder or a Hub id
already in the local cache works too.
"""
from __future__ import annotations

import argparse

import numpy as np

from diffaccel.pipelines import load_pipeline
from diffaccel.pipelines.cli import GENERATE_METHODS, generate

MODELS = ("small-flux", "small-unet")
METHODS = tuple(m for m in GENERATE_METHODS if m != "dense")
_PIPES = {}


def _pipe(model):
    if model not in _PIPES:
        _PIPES[model] = load_pipeline(model)
    return _PIPES[model]


def compare(model, method, options, prompt, height, width, steps, seed):
    """Generate with full attention and with ``method``; returns (dense image, method image, report markdown)."""
    opts = [o.strip() for o in (options or "").replace(";", "\n").splitlines() if o.strip()]
    kwargs = dict(height=int(height) if height else None, width=int(width) if width else None, steps=int(steps),
                  seed=int(seed), pipe=_pipe(model))
    dense, t_dense, _, _ = generate(model, "dense", (), prompt, **kwargs)
    fast, t_fast, peak, label = generate(model, method, opts, prompt, **kwargs)
    a = np.asarray(dense.images[0], dtype=np.float64)
    b = np.asarray(fast.images[0], dtype=np.float64)
    mse = float(np.mean((a - b) ** 2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
    report = (f"| | setting | time |\n|---|---|---|\n| full attention | dense | {t_dense:.2f} s |\n"
              f"| diffaccel | `{label}` | {t_fast:.2f} s |\n\n"
              f"PSNR to full attention: **{psnr:.2f} dB** · speedup {t_dense / t_fast:.2f}× · peak memory {peak}")
    return dense.images[0], fast.images[0], report


def build_demo():
    import gradio as gr

    with gr.Blocks(title="diffaccel") as demo:
        gr.Markdown("# diffaccel\nFull attention vs a diffaccel attention pattern, same prompt and seed.")
        with gr.Row():
            model = gr.Dropdown(list(MODELS), value=MODELS[0], label="model", allow_custom_value=True)
            method = gr.Dropdown(list(METHODS), value="neighborhood", label="method")
            options = gr.Textbox(label="options (KEY=VALUE, one per line; empty = the model's default)",
                                 placeholder="kernel_size=5")
        prompt = gr.Textbox(value="a red circle and a blue square on a yellow background", label="prompt")
        with gr.Row():
            height = gr.Number(value=None, label="height (empty = native)", precision=0)
            width = gr.Number(value=None, label="width (empty = native)", precision=0)
            steps = gr.Slider(1, 50, value=20, step=1, label="steps")
            seed = gr.Number(value=0, label="seed", precision=0)
        run = gr.Button("Generate", variant="primary")
        with gr.Row():
            dense_img = gr.Image(label="full attention")
            fast_img = gr.Image(label="diffaccel")
        report = gr.Markdown()
        run.click(compare, [model, method, options, prompt, height, width, steps, seed],
                  [dense_img, fast_img, report])
    return demo


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    args = p.parse_args(argv)
    build_demo().launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
