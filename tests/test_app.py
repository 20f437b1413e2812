"""The Gradio demo: its comparison function runs offline on the small model, and the UI builds."""
import math

import app


def test_compare_runs_offline_and_reports():
    dense, fast, report = app.compare("small-flux", "neighborhood", "kernel_size=3", "a red circle on a blue background",
                                      None, None, 2, 0)
    assert dense.size == fast.size
    assert "PSNR to full attention" in report and "kernel_size=3" in report
    psnr = float(report.split("**")[1].split()[0])
    assert math.isfinite(psnr)  # a 3x3 window on the native grid differs from full attention


def test_demo_builds():
    import gradio as gr

    demo = app.build_demo()
    assert isinstance(demo, gr.Blocks)
