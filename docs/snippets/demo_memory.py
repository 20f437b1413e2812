"""The measurements behind diffaccel.pipelines.probe.ACTIVATION_COPIES: resident-memory growth of one denoising step
(PeakMemory) of the small models on CPU, one thread, against one [batch, tokens, width] fp32 hidden-state copy.
OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python docs/snippets/demo_memory.py"""
import torch

import diffaccel
from diffaccel.pipelines import load_pipeline
from diffaccel.pipelines.probe import PeakMemory, estimate_memory, format_bytes, token_layout

torch.set_num_threads(1)
CASES = {"small-flux": [(64, "dense"), (128, "dense"), (128, "moba"), (256, "neighborhood"), (256, "moba")],
         "small-unet": [(128, "dense"), (256, "dense"), (256, "moba")],
         "small-wan": [(128, "dense"), (128, "moba"), (256, "neighborhood")]}
for model, cases in CASES.items():
    pipe = load_pipeline(model, device="cpu")
    video = model == "small-wan"
    options = {"neighborhood": dict(kernel_size=(3, 9, 9) if video else 9),
               "moba": dict(block=(4, 8, 8) if video else (8, 8), topk=2)}
    for size, method in cases:
        lay = token_layout(pipe, size, size)
        est = estimate_memory(lay, pixels=size * size * (4 if video else 1))
        if method != "dense":
            diffaccel.apply(pipe, method, **options[method])
        peaks = []
        for _ in range(2):
            with PeakMemory("cpu") as peak:
                pipe("a red circle", height=size, width=size, num_inference_steps=1)
            peaks.append(peak.bytes)
        if method != "dense":
            diffaccel.remove(pipe)
        copy = lay.batch * lay.tokens * lay.width * 4
        print(f"{model} {size} px {method}: grid {lay.grid}, one copy {format_bytes(copy)}, growth "
              f"{[format_bytes(b) for b in peaks]} = {[round(b / copy, 1) for b in peaks]} copies; "
              f"estimate {format_bytes(est.bytes)}", flush=True)
