"""Does a small Wan model use its text?  docs/small-models.md ("Why small-wan needs the noise shift").

    python docs/snippets/wan_text_use.py measure small-wan      # a trained pipeline (name or folder)
    python docs/snippets/wan_text_use.py train 3.0 400          # from scratch: timestep shift, steps (prints every 50)
    python docs/snippets/wan_text_use.py words small-wan        # which words it uses (any small model)
    python docs/snippets/wan_text_use.py words small-wan images # the same on single frames (Wan models)
    python docs/snippets/wan_text_use.py redraw small-wan       # does it keep a visible shape (any small model)
    python docs/snippets/wan_text_use.py redraw small-wan images
    python docs/snippets/wan_text_use.py handoff small-wan small-unet 0.45  # A above sigma 0.45, B below
    python docs/snippets/wan_text_use.py teacher small-wan small-flux       # distance to small-unet's velocity

`measure` and `train` print the velocity loss at sigma 0.9 on 16 held-out clips with their own captions and
with the captions rotated by one (wrong ones): a model that uses its text has a clearly lower first number.
`words` prints, at sigma 0.3 / 0.5 / 0.7 / 0.9 on 32 held-out samples (clips for Wan, images otherwise), the
loss with the own captions, with every shape word replaced by the next shape (star -> circle, ...) and with
every colour word replaced by the next colour: the gap to the first number is how much the model uses that
kind of word (with `images`, a Wan model is measured on single-frame clips of the image dataset).
`redraw` noises the 32 held-out samples to sigma 0.3 / 0.5 / 0.7 / 0.9 and denoises them (the pipeline's sampler: Euler
over its 16-step schedule from that sigma on, guidance 4) with their own captions and with shape-swapped ones, then
asks the shape classifier: the fraction of the prompted shapes found with the own captions (how well the model keeps
a shape it can see), and with the swapped captions the fractions that follow the text and that keep the image's.
`handoff A B CUT` draws single frames / images for the first 48 image prompts of `eval_prompts` (the same seeds) with
small-wan's sampler (16 Euler steps, noise shift 3, guidance 4), using model A's velocity while sigma > CUT and model
B's from there on, and prints the classifier's accuracy: with CUT 0 it is A's own accuracy, with CUT 1 B's.
`teacher` prints, at sigma 0.3 / 0.5 / 0.7 / 0.9 on 64 held-out images, the mean squared distance of each model's
(conditional) velocity to small-unet's and to the true `noise - x0` (Wan models on single-frame clips).
`train` uses the default small-wan architecture, batch 16, AdamW 1e-3 (100 warm-up steps), the text encoder from
small-flux, logit-normal noise levels shifted by the given shift.  All modes use 2 threads."""
import re
import sys

import torch

from diffaccel.pipelines.small.shapes import COLOR_NAMES, SHAPES, ShapesDataset, ShapesVideoDataset
from diffaccel.pipelines.small import SmallWanPipeline, build_pipeline, load_small
from diffaccel.pipelines.small.train import _copy_text_encoder, collate, lr_at, noisy_batch


def _held_out(n, frames=4):
    """``n`` held-out samples (clips of ``frames`` frames, or images for ``None``; dataset seed 5), their captions
    and fixed noise."""
    data = ShapesVideoDataset(5, 100, 32, frames=frames) if frames else ShapesDataset(5, 100, 32)
    x0 = torch.stack([data[i]["pixels"] for i in range(n)])
    captions = [data[i]["caption"] for i in range(n)]
    return x0, captions, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _loss(pipe, x0, noise, s, captions):
    """The velocity loss of ``pipe`` at noise level ``s`` with ``captions``, rounded to 4 decimals."""
    v = pipe.predict((1 - s) * x0 + s * noise, torch.full((len(x0),), s), *pipe.encode_prompt(captions, "cpu"))
    return round(float(((v - (noise - x0)) ** 2).mean()), 4)


def text_use(pipe):
    x0, captions, noise = _held_out(16, pipe.config.num_frames)
    return _loss(pipe, x0, noise, 0.9, captions), _loss(pipe, x0, noise, 0.9, captions[1:] + captions[:1])


def _next_word(caption, words):
    return re.sub("|".join(words), lambda m: words[(words.index(m.group(0)) + 1) % len(words)], caption)


def _held_out_for(pipe, n, images):
    """:func:`_held_out` samples ``pipe`` takes: clips for a Wan model (single-frame clips of the image dataset with
    ``images``), images otherwise."""
    wan = isinstance(pipe, SmallWanPipeline)
    x0, captions, noise = _held_out(n, pipe.config.num_frames if wan and not images else None)
    if wan and images:
        x0, noise = x0.unsqueeze(2), noise.unsqueeze(2)
    return x0, captions, noise


def word_use(pipe, n=32, images=False):
    x0, captions, noise = _held_out_for(pipe, n, images)
    variants = (captions, [_next_word(c, SHAPES) for c in captions], [_next_word(c, COLOR_NAMES) for c in captions])
    for s in (0.3, 0.5, 0.7, 0.9):
        losses = [_loss(pipe, x0, noise, s, caps) for caps in variants]
        print(f"sigma {s}: loss with own / shape-swapped / colour-swapped captions {losses}", flush=True)


@torch.no_grad()
def _redraw(pipe, x, s, captions, guidance=4.0):
    """Denoise ``x`` (noise level ``s``) with ``captions`` over the steps of ``pipe``'s 16-step schedule below ``s``."""
    pipe.scheduler.set_timesteps(16)
    sigmas = [s] + [float(q) for q in pipe.scheduler.sigmas if q < s - 1e-6]  # the schedule ends at 0
    text, pooled = pipe.encode_prompt(list(captions) + [""] * len(captions), "cpu")
    for a, b in zip(sigmas[:-1], sigmas[1:]):
        v_cond, v_uncond = pipe.predict(torch.cat([x, x]), torch.full((2 * len(x),), a), text, pooled).chunk(2)
        x = x + (b - a) * (v_uncond + guidance * (v_cond - v_uncond))
    return (x.clamp(-1, 1) + 1) / 2


def redraw(pipe, n=32, images=False):
    from diffaccel.pipelines.small.evaluate import classifier_accuracy, load_classifier

    x0, captions, noise = _held_out_for(pipe, n, images)
    swapped = [_next_word(c, SHAPES) for c in captions]
    clf = load_classifier()
    for s in (0.3, 0.5, 0.7, 0.9):
        xt = (1 - s) * x0 + s * noise
        own = classifier_accuracy(clf, _redraw(pipe, xt, s, captions), captions)["shape"]
        out = _redraw(pipe, xt, s, swapped)
        follow, keep = (classifier_accuracy(clf, out, c)["shape"] for c in (swapped, captions))
        print(f"sigma {s}: shape kept with own captions {own:.2f}; with shape-swapped captions: follows the text "
              f"{follow:.2f}, keeps the image's {keep:.2f}", flush=True)


@torch.no_grad()
def _image_velocity(pipe, x, s, captions, guidance=None):
    """``pipe``'s velocity on images ``x [B, 3, H, W]`` at noise level ``s`` (as single-frame clips for Wan);
    with ``guidance``, classifier-free guided against ``""``."""
    wan = isinstance(pipe, SmallWanPipeline)
    caps = list(captions) + ([""] * len(captions) if guidance else [])
    xin = torch.cat([x, x]) if guidance else x
    xin = xin.unsqueeze(2) if wan else xin
    v = pipe.predict(xin, torch.full((len(xin),), float(s)), *pipe.encode_prompt(caps, "cpu"))
    v = v[:, :, 0] if wan else v
    if guidance:
        v_cond, v_uncond = v.chunk(2)
        v = v_uncond + guidance * (v_cond - v_uncond)
    return v


@torch.no_grad()
def handoff(a, b, cut, n=48):
    from diffaccel.pipelines.small.evaluate import classifier_accuracy, eval_prompts, load_classifier

    captions = eval_prompts(n)
    sched = load_small("small-wan").scheduler
    sched.set_timesteps(16)
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        s = float(t) / sched.config.num_train_timesteps
        x = sched.step(_image_velocity(a if s > cut else b, x, s, captions, 4.0), t, x, return_dict=False)[0]
    acc = classifier_accuracy(load_classifier(), (x.clamp(-1, 1) + 1) / 2, captions)
    print(f"A above sigma {cut}, B below: " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()), flush=True)


@torch.no_grad()
def teacher_distance(pipes, n=64):
    x0, captions, noise = _held_out(n, None)
    teacher = load_small("small-unet")
    truth = noise - x0
    for s in (0.3, 0.5, 0.7, 0.9):
        xt = (1 - s) * x0 + s * noise
        vt = _image_velocity(teacher, xt, s, captions)
        row = [f"small-unet to truth {float(((vt - truth) ** 2).mean()):.4f}"]
        for name, pipe in pipes:
            v = _image_velocity(pipe, xt, s, captions)
            row.append(f"{name}: to small-unet {float(((v - vt) ** 2).mean()):.4f}, "
                       f"to truth {float(((v - truth) ** 2).mean()):.4f}")
        print(f"sigma {s}: " + "; ".join(row), flush=True)


def train(shift, steps, batch=16):
    torch.manual_seed(0)
    pipe = build_pipeline("wan")
    _copy_text_encoder(pipe, "small-flux")
    data = ShapesVideoDataset(0, 10 ** 6, 32, frames=4)
    params = [p for m in (pipe.denoiser, pipe.text_encoder) for p in m.parameters()]
    opt = torch.optim.AdamW(params, 1e-3, betas=(0.9, 0.99), weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        captions, xt, sigma, target = noisy_batch(*collate(data, range(step * batch, (step + 1) * batch)), gen,
                                                  shift=shift)
        loss = ((pipe.predict(xt, sigma, *pipe.encode_prompt(captions, "cpu")) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, 1e-3, warmup=100)
        opt.step()
        if (step + 1) % 50 == 0:
            print(f"shift {shift} step {step + 1}: loss with own / wrong captions {text_use(pipe)}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    if sys.argv[1] == "words":
        word_use(load_small(sys.argv[2]), images=sys.argv[3:] == ["images"])
    elif sys.argv[1] == "redraw":
        redraw(load_small(sys.argv[2]), images=sys.argv[3:] == ["images"])
    elif sys.argv[1] == "handoff":
        handoff(load_small(sys.argv[2]), load_small(sys.argv[3]), float(sys.argv[4]))
    elif sys.argv[1] == "teacher":
        teacher_distance([(name, load_small(name)) for name in sys.argv[2:]])
    elif sys.argv[1] == "measure":
        print(sys.argv[2], "loss with own / wrong captions", text_use(load_small(sys.argv[2])))
    else:
        train(float(sys.argv[2]), int(sys.argv[3]))
