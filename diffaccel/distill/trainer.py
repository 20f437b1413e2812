"""The distillation run: data cache, student and teacher, the accelerate training loop, checkpoints, export.

Everything that touches devices, processes, precision, gradient accumulation and logging goes through one
``accelerate.Accelerator``: the same code runs on one CPU, one GPU, many GPUs with DDP, or DeepSpeed ZeRO-2
(``accelerate launch --config_file configs/accelerate/<file>.yaml -m diffaccel.distill ...``).

Output folder (``--output``), claimed for this run before anything is written (``diffaccel.io.claim_folder``)::

    <output>/.diffaccel-run.json        the run's identity: method, model, method options, layers
    <output>/<weights>                  the final weights in the method's format (see Student.export), so
                                        diffaccel.apply(pipe, method, weights=<output>, ...) loads them
    <output>/training.json              the command, steps, losses, data recipe, timings
    <output>/data/                      the data cache (default --data-dir; see diffaccel.distill.data)
    <output>/checkpoints/checkpoint-<step>/, latest   (diffaccel.io.CheckpointDir)
    <output>/samples/step-<step>.png    validation samples (student; teacher-000000.png: the teacher)
    <output>/logs/                      TensorBoard (accelerate's tracker)

Checkpoints (single process and DDP) hold the trained parameters, the optimiser state, the EMA and the step as
safetensors + JSON (``save_tree``): nothing is pickled.  Under DeepSpeed ZeRO-2 the engine's sharded optimiser
state is saved with ``accelerator.save_state`` beside the same safetensors + JSON state and read back with
``load_state(load_kwargs={"weights_only": True})``: accelerate's own files are then read with
``torch.load(weights_only=True)``; the engine's go through DeepSpeed's ``load_checkpoint`` (not verified here).

Under FSDP (version 2, ``fully_shard``; ``configs/accelerate/fsdp.yaml``) every weight of the denoiser is sharded
across the processes, the teacher's copies included: the teacher swap only changes which module a layer calls
(see :mod:`diffaccel.distill.student`).  Checkpoints stay the same safetensors + JSON: the trained parameters, the
EMA and the optimiser state are gathered whole (a collective), written by the main process, and sharded again on
resume, so a checkpoint is independent of the number of processes and of the strategy.  FSDP version 1 and
DeepSpeed ZeRO-3 are refused (flat parameters / partitioned parameters do not survive the teacher's module swap).
A resumed run is bit-identical to an uninterrupted one on the same machine: the batches are a
function of (seed, batch number) and the noise of each micro-batch a function of (seed, step, micro-batch,
process).

Test hook: the environment variable ``DIFFACCEL_DISTILL_KILL_AT`` = ``step:N`` (or ``save:N``) makes the process
SIGKILL itself after optimiser step ``N`` (or in the middle of writing checkpoint ``N``).
"""
from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import shlex
import signal
import time

import torch

from ..io import (CheckpointDir, atomic_write_json, claim_folder, is_training_export, load_tree, read_marker,
                  save_tree)
from . import data as data_mod
from .adapters import adapter_for, pil_images
from .losses import feature_loss, resolve_weights
from .models import load_model, plugin_for
from .student import TRAINABLE_METHODS, Student, check_method, full_tensor, like_param

__all__ = ["run", "parse_options", "DistillError"]

STATE_DIR = "distill_state"  # inside a DeepSpeed checkpoint: our JSON + safetensors beside accelerate's files


class DistillError(ValueError):
    pass


def parse_options(items) -> dict:
    """``["radius=8", "block=(8,8)"]`` -> ``{"radius": 8, "block": (8, 8)}`` (values as Python literals, else
    strings); ``ValueError`` naming ``--option``."""
    out = {}
    for item in items or ():
        key, eq, value = str(item).partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise ValueError(f"option (--option) {item!r} is not KEY=VALUE")
        try:
            out[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key] = value.strip()
    return out


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def _kill_hook(kind, step):
    spec = os.environ.get("DIFFACCEL_DISTILL_KILL_AT", "")
    if spec == f"{kind}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _check_positive(name, value, kind=int, zero=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if zero else value > 0)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok:
        raise ValueError(f"{name} must be a {'non-negative' if zero else 'positive'} "
                         f"{'int' if kind is int else 'number'}, got {value!r}")


def lr_factor(step, warmup, schedule, max_steps, final_ratio=0.0):
    """Learning-rate multiplier at optimiser step ``step`` (0-based): linear warm-up over ``warmup`` steps, then
    ``constant``, ``linear`` or ``cosine`` decay to ``final_ratio`` at ``max_steps``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, max_steps - warmup)
    p = min(1.0, (step - warmup) / span)
    if schedule == "linear":
        return 1.0 - (1.0 - final_ratio) * p
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1 + math.cos(math.pi * p))


def _gathered(obj):
    """``obj`` (nested dicts / lists / tensors, e.g. an optimiser's ``state_dict``) with every sharded ``DTensor``
    gathered whole (collective: every process walks the same structure in the same order)."""
    if isinstance(obj, dict):
        return {k: _gathered(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_gathered(v) for v in obj)
    return full_tensor(obj) if isinstance(obj, torch.Tensor) else obj


def _sharded_optimizer_state(saved, params):
    """An optimiser ``state_dict`` of whole tensors (as :func:`_gathered` wrote it) laid out for ``params``: each
    per-parameter tensor shaped like its (possibly FSDP-sharded) parameter is sharded like it; the rest (``step``,
    scalars) is kept."""
    state = {}
    for idx, entry in saved.get("state", {}).items():
        i = int(idx)
        p = params[i] if 0 <= i < len(params) else None
        state[idx] = {k: (like_param(v, p).to(v.dtype) if p is not None and isinstance(v, torch.Tensor)
                          and tuple(v.shape) == tuple(p.shape) else v) for k, v in entry.items()}
    return {**saved, "state": state}


def _check_fsdp(plugin):
    """FSDP is supported as version 2 (``fully_shard``) without accelerate's activation checkpointing."""
    if getattr(plugin, "fsdp_version", 1) != 2:
        raise ValueError("accelerate config: diffaccel distill needs FSDP version 2 (fsdp_config: fsdp_version: 2, "
                         "as configs/accelerate/fsdp.yaml); version 1's flat parameters do not survive the teacher's "
                         "module swap")
    if getattr(plugin, "activation_checkpointing", False):
        raise ValueError("accelerate config: fsdp_activation_checkpointing renames the model's modules; use "
                         "--gradient-checkpointing (the model's own) instead")


def _wrap_present_blocks(plugin, model):
    """accelerate's transformer-based wrapping reads the model's ``_no_split_modules`` and fails on a listed class
    the model does not contain (a UNet without ``UpBlock2D``, say): with no classes named in the config, wrap the
    listed blocks the model has."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if plugin.auto_wrap_policy is transformer_auto_wrap_policy and plugin.transformer_cls_names_to_wrap is None:
        present = {type(m).__name__ for m in model.modules()}
        plugin.transformer_cls_names_to_wrap = [n for n in (getattr(model, "_no_split_modules", None) or [])
                                                if n in present]


def _check_args(args):
    """Every check that needs neither the model nor the accelerator.  Returns the parsed method options."""
    if args.method not in TRAINABLE_METHODS:
        raise ValueError(f"method (--method) must be one of {list(TRAINABLE_METHODS)}, got {args.method!r}")
    options = parse_options(args.option)
    if not args.output:
        raise ValueError("output (--output) is required")
    for name, kind, zero in (("max_steps (--max-steps)", int, False), ("batch_size (--batch-size)", int, False),
                             ("gradient_accumulation_steps (--gradient-accumulation-steps)", int, False),
                             ("lr (--lr)", float, False), ("num_samples (--num-samples)", int, False),
                             ("generation_steps (--generation-steps)", int, False),
                             ("generation_batch_size (--generation-batch-size)", int, False),
                             ("shard_size (--shard-size)", int, False),
                             ("checkpoint_every (--checkpoint-every)", int, True),
                             ("validate_every (--validate-every)", int, True),
                             ("lr_warmup_steps (--lr-warmup-steps)", int, True),
                             ("max_grad_norm (--max-grad-norm)", float, True),
                             ("weight_decay (--weight-decay)", float, True)):
        attr = name.split(" ")[0]
        value = getattr(args, attr)
        if value is not None:
            _check_positive(name, value, kind, zero)
    if not 0 <= args.caption_dropout < 1:
        raise ValueError(f"caption_dropout (--caption-dropout) must be in [0, 1), got {args.caption_dropout!r}")
    if not 0 <= args.ema_decay < 1:
        raise ValueError(f"ema_decay (--ema-decay) must be in [0, 1) (0: no EMA), got {args.ema_decay!r}")
    if args.resume is not None and args.resume != "latest" and not os.path.isdir(args.resume):
        raise ValueError(f"resume (--resume) must be 'latest' or a checkpoint folder, got {args.resume!r}")
    if args.data is not None and args.prompts is not None:
        raise ValueError("give either prompts (--prompts, the teacher generates the data) or data (--data, "
                         "images with captions), not both")
    return options


def _check_output(args, identity):
    """Before anything is written: ``--output`` new/empty, or this run's folder (then ``--resume`` to continue)."""
    output = os.path.abspath(args.output)
    marker = claim_folder(output, kind="distill", identity=identity, arg="output (--output)", create=False)
    ckdir = CheckpointDir(os.path.join(output, "checkpoints"))
    if args.resume is None and os.path.isdir(output) and read_marker(output) is not None:
        latest = ckdir.latest()
        if latest is not None:
            raise ValueError(f"output (--output) {output!r} holds checkpoints of this run ({os.path.basename(latest)}); "
                             "pass --resume latest to continue it, or another folder")
    return marker, ckdir


def _resume_path(args, ckdir, identity):
    """The checkpoint to resume from (``None``: start at step 0); a checkpoint of another run is a ValueError."""
    if args.resume is None:
        return None
    path = ckdir.latest() if args.resume == "latest" else os.path.abspath(args.resume)
    if path is None:
        return None
    state_dir = os.path.join(path, STATE_DIR) if os.path.isdir(os.path.join(path, STATE_DIR)) else path
    try:
        _, meta = load_tree(state_dir)
    except ValueError as e:
        raise ValueError(f"resume (--resume): {e}") from None
    if meta.get("identity") != identity:
        raise ValueError(f"resume (--resume) {path!r} is a checkpoint of another run ({meta.get('identity')}), "
                         f"not of {identity}")
    return path


def _command(args):
    argv = list(getattr(args, "argv", None) or [])
    if argv and argv[0] == "distill":
        argv = argv[1:]
    return "diffaccel distill " + " ".join(shlex.quote(a) for a in argv) if argv else None


def run(args) -> dict:
    """Run ``diffaccel distill`` with parsed ``args`` (see :mod:`diffaccel.distill.cli`); returns a summary."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed

    if args.threads:
        torch.set_num_threads(int(args.threads))
    cpu0 = time.process_time()
    options = _check_args(args)
    layers = list(args.layers) if args.layers else None
    identity = {"method": args.method, "model": args.model, "options": options, "layers": layers}
    if getattr(args, "denoiser", None):
        identity["denoiser"] = args.denoiser
    identity = _jsonable(identity)
    output = os.path.abspath(args.output)
    _, ckdir = _check_output(args, identity)
    if args.export:
        from ..io import check_separate_folders, owned_folder

        check_separate_folders(output=output, export=os.path.abspath(args.export))
        if not owned_folder(args.export, is_training_export):
            raise ValueError(f"export (--export) {os.path.abspath(args.export)!r} is not empty and holds no earlier "
                             "export (training.json); it is never replaced: pass a new or empty folder")
    resume_from = _resume_path(args, ckdir, identity)
    weights = resolve_weights(args.method, args.preset, args.loss_target, args.loss_output, args.loss_feature)
    prompts = data_mod.read_prompts(args.prompts) if args.prompts else None
    source = None
    if args.data is not None:
        source = data_mod.ImageSource(args.data, split=args.split, image_column=args.image_column,
                                      caption_column=args.caption_column, limit=args.num_samples)

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        cpu=bool(args.cpu),
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=output, logging_dir=os.path.join(output, "logs")),
        rng_types=[],
    )
    main = accelerator.is_main_process
    log = (lambda m: accelerator.print(m, flush=True))
    sharded = accelerator.distributed_type == DistributedType.DEEPSPEED
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp:
        _check_fsdp(accelerator.state.fsdp_plugin)
    if sharded:  # our DataLoader has a batch sampler, so DeepSpeed cannot read the micro-batch size from it
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = args.batch_size
        if ds_config.get("zero_optimization", {}).get("stage", 0) > 2:
            raise ValueError("accelerate config: DeepSpeed ZeRO-3 partitions parameters in a way the teacher's "
                             "module swap does not survive; use ZeRO stage 2 (configs/accelerate/deepspeed_zero2.yaml) "
                             "or FSDP (configs/accelerate/fsdp.yaml)")
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    set_seed(args.seed)

    # ---------------------------------------------------------------------------------- model and checks
    pipe = load_model(args.model, device=accelerator.device, dtype=weight_dtype, allow_download=args.allow_download)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    adapter = adapter_for(pipe)
    if getattr(args, "denoiser", None):
        adapter.select_denoiser(args.denoiser)
    from ..families import detect_family

    try:
        family = detect_family(adapter.denoiser)
    except ValueError as e:
        raise ValueError(f"model (--model): {e}") from None
    try:
        check_method(args.method, family, options)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(("method", "option")) else f"option (--option): {msg}") from None
    size = adapter.default_size()
    for key in ("height", "width", "num_frames"):
        if getattr(args, key, None) is not None:
            size[key] = getattr(args, key)
    size = adapter.check_size(size)
    adapter.size = size
    if source is not None and not adapter.supports_images:
        raise ValueError(f"data (--data): {type(pipe).__name__} cannot be trained on images with captions (it "
                         "generates more than pictures); use --prompts")
    plugin = plugin_for(pipe)
    if source is None and prompts is None:
        prompts = plugin.default_prompts(pipe, args.num_samples, args.seed) if plugin is not None else \
            data_mod.read_prompts(data_mod.DEFAULT_PROMPTS)
    guidance = args.guidance_scale if args.guidance_scale is not None else adapter.default_guidance
    adapter.guidance = guidance
    if source is not None:
        recipe = {"recipe": "images", "model": args.model, **source.identity(), "size": size,
                  "num_samples": len(source), "shard_size": args.shard_size}
        validation_prompts = [source.item(i)[1] for i in range(min(args.num_validation, len(source)))]
    else:
        recipe = {"recipe": "generated", "model": args.model, "prompts_sha256": data_mod.prompts_digest(prompts),
                  "num_prompts": len(prompts), "num_samples": args.num_samples, "seed": args.seed,
                  "steps": args.generation_steps, "guidance": guidance, "size": size, "shard_size": args.shard_size}
        validation_prompts = prompts[:args.num_validation]
    data_dir = os.path.abspath(args.data_dir or os.path.join(output, "data"))
    cache = data_mod.Cache(data_dir, recipe, arg="data_dir (--data-dir)" if args.data_dir else "output (--output)")
    cache.check()

    # ---------------------------------------------------------------------------------- claim, data
    if main:
        claim_folder(output, kind="distill", identity=identity, arg="output (--output)")
        cache.create()
        if not cache.has_uncond():
            with torch.no_grad():
                cache.write_uncond(adapter.encode_uncond())
    accelerator.wait_for_everyone()
    todo = [i for i in cache.missing() if i % accelerator.num_processes == accelerator.process_index]
    if cache.missing():
        log(f"data: {len(cache.missing())} of {cache.num_shards} shards to make in {data_dir}")
    if source is not None:
        data_mod.encode_shards(cache, adapter, source, todo, size=size, batch_size=args.generation_batch_size, log=log)
    else:
        data_mod.generate_shards(cache, adapter, prompts, todo, seed=args.seed, steps=args.generation_steps,
                                 guidance=guidance, size=size, batch_size=args.generation_batch_size,
                                 log=lambda m: print(m, flush=True))
    accelerator.wait_for_everyone()
    if cache.missing():
        raise RuntimeError(f"data cache {data_dir} is incomplete after generation: shards {cache.missing()[:5]}")
    uncond = {k: v.to(accelerator.device) for k, v in cache.read_uncond().items()}
    with torch.no_grad():
        val_cond = adapter.encode_prompts(validation_prompts) if validation_prompts and args.validate_every else None

    # ---------------------------------------------------------------------------------- student, optimiser
    set_seed(args.seed)  # the student's initialisation does not depend on whether the data was just generated
    student = Student(adapter.denoiser, args.method, options, layers)
    adapter.dtype = weight_dtype
    for p in student.trained.values():  # trained parameters in fp32 (frozen ones stay in weight_dtype)
        p.data = p.data.float()
    if weights["feature"] > 0:
        student.capture_features()
    if args.gradient_checkpointing:
        if not getattr(adapter.denoiser, "_supports_gradient_checkpointing", False):
            raise ValueError(f"gradient_checkpointing (--gradient-checkpointing): "
                             f"{type(adapter.denoiser).__name__} does not support it")
        adapter.denoiser.enable_gradient_checkpointing()
    adapter.denoiser.train()
    params = list(student.trained.values())
    if args.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ValueError("optimizer (--optimizer) prodigy needs the prodigyopt package") from None
        optimizer = Prodigy(params, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                            weight_decay=args.weight_decay, use_bias_correction=True, safeguard_warmup=True)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                                      weight_decay=args.weight_decay, eps=1e-8)
    dataset = data_mod.CachedDataset(cache)

    state = {"step": 0, "elapsed": 0.0, "cpu": 0.0, "runs": []}
    saved = None
    if resume_from is not None:
        state_dir = os.path.join(resume_from, STATE_DIR) if sharded else resume_from
        saved, meta = load_tree(state_dir)
        if saved.get("global_batch") != args.batch_size * args.gradient_accumulation_steps * accelerator.num_processes:
            raise ValueError(f"resume (--resume): the checkpoint was trained with {saved.get('global_batch')} samples per "
                             "step (--batch-size x --gradient-accumulation-steps x processes); this run has "
                             f"{args.batch_size * args.gradient_accumulation_steps * accelerator.num_processes}")
        state.update(step=saved["step"], elapsed=saved["elapsed"], cpu=saved.get("cpu", 0.0),
                     runs=list(saved.get("runs") or []))

    sampler = data_mod.StepBatchSampler(len(dataset), args.batch_size, args.seed,
                                        start=state["step"] * args.gradient_accumulation_steps * accelerator.num_processes)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=0)
    if fsdp:
        _wrap_present_blocks(accelerator.state.fsdp_plugin, adapter.denoiser)
    model, optimizer, loader = accelerator.prepare(adapter.denoiser, optimizer, loader)
    params = student.rebind()  # FSDP2 replaced the parameter objects (elsewhere the same ones)
    ema = None
    if saved is not None:
        if sharded:
            accelerator.load_state(resume_from, load_kwargs={"weights_only": True})
        else:
            student.load_trained(saved["trained"], f"checkpoint {resume_from}")
            try:
                optimizer.load_state_dict(_sharded_optimizer_state(saved["optimizer"], params))
            except (ValueError, KeyError, RuntimeError) as e:
                raise ValueError(f"resume (--resume): the optimiser state of {resume_from} does not fit "
                                 f"--optimizer {args.optimizer} ({e})") from None
        if saved.get("ema"):
            ema = {k: like_param(v, student.trained[k]).float() for k, v in saved["ema"].items()}
    if args.ema_decay and ema is None:
        ema = {k: p.detach().float().clone() for k, p in student.trained.items()}
    unwrapped = accelerator.unwrap_model(model)
    if args.report_to != "none":
        config = {"method": args.method, "model": args.model, "options": json.dumps(_jsonable(options)),
                  **{f"loss_{k}": v for k, v in weights.items()}, "lr": args.lr, "batch_size": args.batch_size,
                  "optimizer": args.optimizer, "seed": args.seed}
        accelerator.init_trackers("distill", config=config)

    n_train = sum(p.numel() for p in params)
    n_teacher = sum(p.numel() for p in student.teacher_parameters())
    log(f"distill {args.method} on {type(pipe).__name__} ({family}): {n_train / 1e6:.3f}M trained parameters "
        f"({n_teacher / 1e6:.3f}M frozen teacher copies), {len(dataset)} samples at {size}, losses {dict(weights)}, "
        f"{accelerator.num_processes} process(es) on {accelerator.device}"
        f"{'' if accelerator.distributed_type == DistributedType.NO else f' ({accelerator.distributed_type.value})'}"
        f"{'; sharded with FSDP2: ' + type(next(iter(student.trained.values()))).__name__ if fsdp else ''}")

    # ---------------------------------------------------------------------------------- helpers
    def micro_generator(step, micro):
        g = torch.Generator()
        g.manual_seed(hash((args.seed, step, micro, accelerator.process_index)) & 0x7FFF_FFFF_FFFF_FFFF)
        return g

    def losses_of(batch, g):
        x0 = batch["latents"].float()
        cond = batch["cond"]
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        t = adapter.noise_levels(x0, g).to(x0.device)
        if args.caption_dropout:
            drop = (torch.rand(x0.shape[0], generator=g) < args.caption_dropout).to(x0.device)
            cond = {k: torch.where(drop.view(-1, *([1] * (v.dim() - 1))), uncond[k].to(v.dtype).expand_as(v), v)
                    for k, v in cond.items()}
        xt = adapter.noisy(x0, noise, t)
        out = {}
        t_out = t_feats = None
        if weights.needs_teacher:
            with torch.no_grad(), student.teacher() as teacher, student.capturing() as feats, accelerator.autocast():
                t_out = adapter.forward(teacher, xt, t, cond, size).float()
                t_feats = dict(feats)
        with student.capturing() as feats:
            pred = adapter.forward(model, xt, t, cond, size).float()
            s_feats = dict(feats)
        total = 0.0
        if weights["target"]:
            out["target"] = torch.nn.functional.mse_loss(pred, adapter.target(x0, noise, t).float())
            total = total + weights["target"] * out["target"]
        if weights["output"]:
            out["output"] = torch.nn.functional.mse_loss(pred, t_out)
            total = total + weights["output"] * out["output"]
        if weights["feature"]:
            out["feature"] = feature_loss(s_feats, t_feats)
            total = total + weights["feature"] * out["feature"]
        out["loss"] = total
        return out

    def trained_tensors(source_state=None):
        if source_state is not None:
            return {k: full_tensor(v.detach()).to("cpu", torch.float32).clone() for k, v in source_state.items()}
        return student.trained_state()

    def save_checkpoint(step, elapsed, runs):
        payload = {"step": step, "elapsed": elapsed, "cpu": state["cpu"] + time.process_time() - cpu0, "runs": runs,
                   "ema": trained_tensors(ema) if ema else None,
                   "global_batch": args.batch_size * args.gradient_accumulation_steps * accelerator.num_processes}
        meta = {"identity": identity, "step": step}
        if not sharded:
            payload.update(trained=student.trained_state(), optimizer=_gathered(optimizer.state_dict()))
            if main:
                def write(folder):
                    save_tree(folder, payload, metadata=meta)
                    _kill_hook("save", step)
                ckdir.save(step, write)
        else:
            staging = os.path.join(ckdir.root, f".staging-{step:08d}")
            if main:
                os.makedirs(ckdir.root, exist_ok=True)
                if os.path.isdir(staging):
                    import shutil

                    shutil.rmtree(staging)
            accelerator.wait_for_everyone()
            accelerator.save_state(staging)
            if main:
                save_tree(os.path.join(staging, STATE_DIR), payload, metadata=meta)

                def write(folder):
                    for name in os.listdir(staging):
                        os.replace(os.path.join(staging, name), os.path.join(folder, name))
                    os.rmdir(staging)
                    _kill_hook("save", step)
                ckdir.save(step, write)
        accelerator.wait_for_everyone()

    @torch.no_grad()
    def validate(step, teacher=False):
        if val_cond is None or not (main or fsdp):  # under FSDP every process takes part in each forward pass
            return
        gens = [torch.Generator().manual_seed(i) for i in range(len(validation_prompts))]
        ctx = student.teacher() if teacher else contextlib.nullcontext()
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            with ctx:
                images = adapter.generate(validation_prompts, val_cond, uncond, gens, size,
                                          steps=args.validation_steps, guidance=guidance, output_type="pil")
        finally:
            unwrapped.train(was_training)
        if not main:
            return
        if isinstance(images, torch.Tensor):
            images = pil_images(images)
        from PIL import Image

        w, h = images[0].size
        grid = Image.new("RGB", (w * len(images), h))
        for i, im in enumerate(images):
            grid.paste(im.convert("RGB"), (i * w, 0))
        os.makedirs(os.path.join(output, "samples"), exist_ok=True)
        name = "teacher-000000.png" if teacher else f"step-{step:08d}.png"
        from ..io import atomic_path

        with atomic_path(os.path.join(output, "samples", name)) as tmp:
            grid.save(tmp, format="PNG")
        if args.report_to in ("tensorboard", "all"):
            try:
                import numpy as np

                tracker = accelerator.get_tracker("tensorboard", unwrap=True)
                tracker.add_image("teacher" if teacher else "student", np.asarray(grid), step, dataformats="HWC")
            except Exception:  # a tracker without images: the PNG is on disk anyway
                pass

    # ---------------------------------------------------------------------------------- loop
    step = state["step"]
    t0 = time.time()
    history = []
    if args.validate_every and step == 0 and not os.path.isfile(os.path.join(output, "samples", "teacher-000000.png")):
        validate(0, teacher=True)
    runs = state["runs"]
    command = _command(args)

    def all_runs():
        return runs + [{"command": command, "start_step": state["step"], "end_step": step,
                        "minutes": round((time.time() - t0) / 60, 2),
                        "cpu_minutes": round((time.process_time() - cpu0) / 60, 2),
                        "processes": accelerator.num_processes}]

    from tqdm.auto import tqdm

    bar = tqdm(total=args.max_steps, initial=step, disable=not accelerator.is_local_main_process,
               desc=f"distill {args.method}", unit="step", dynamic_ncols=True)
    batches = iter(loader)
    while step < args.max_steps:
        for g_ in optimizer.param_groups:
            g_["lr"] = args.lr * lr_factor(step, args.lr_warmup_steps, args.lr_schedule, args.max_steps)
        parts = {}
        for micro in range(args.gradient_accumulation_steps):
            batch = next(batches)
            with accelerator.accumulate(model):
                out = losses_of(batch, micro_generator(step, micro))
                accelerator.backward(out["loss"])
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in out.items():
                parts[k] = parts.get(k, 0.0) + v.detach() / args.gradient_accumulation_steps
        step += 1
        if ema is not None:
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, p in student.trained.items():
                    ema[k].lerp_(p.detach().float(), 1 - decay)
        reduced = {k: float(accelerator.reduce(v, "mean")) for k, v in parts.items()}
        history.append(reduced["loss"])
        bar.set_postfix({k: f"{v:.4g}" for k, v in reduced.items()}, refresh=False)
        bar.update(1)
        if args.report_to != "none":
            accelerator.log({f"loss/{k}": v for k, v in reduced.items()} | {"lr": optimizer.param_groups[0]["lr"]},
                            step=step)
        _kill_hook("step", step)
        if args.checkpoint_every and step % args.checkpoint_every == 0 and step < args.max_steps:
            save_checkpoint(step, state["elapsed"] + time.time() - t0, all_runs())
        if args.validate_every and step % args.validate_every == 0:
            validate(step)
    bar.close()

    # ---------------------------------------------------------------------------------- final
    elapsed = state["elapsed"] + time.time() - t0
    if step > state["step"] or resume_from is None:
        save_checkpoint(step, elapsed, all_runs())
    final = trained_tensors(ema) if ema is not None else student.trained_state()
    files = []
    info = None
    if main:
        files = student.export(output, final)
        info = {"kind": "distill", "method": args.method, "model": args.model, "denoiser": adapter.denoiser_attr,
                "options": options, "layers": layers,
                "steps": step, "loss_weights": dict(weights), "final_loss": sum(history[-50:]) / max(1, len(history[-50:]))
                if history else None, "data": recipe, "batch_size": args.batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "processes": accelerator.num_processes, "optimizer": args.optimizer, "lr": args.lr,
                "lr_schedule": args.lr_schedule, "lr_warmup_steps": args.lr_warmup_steps, "ema_decay": args.ema_decay,
                "caption_dropout": args.caption_dropout, "mixed_precision": accelerator.mixed_precision,
                "seed": args.seed, "minutes_trained": round(elapsed / 60, 2),
                "cpu_minutes": round((state["cpu"] + time.process_time() - cpu0) / 60, 2),
                "weights": [os.path.basename(f) for f in files], "command": command, "runs": all_runs()}
        info = _jsonable(info)
        atomic_write_json(os.path.join(output, "training.json"), info)
        if args.export:
            _export(args.export, files, info)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    summary = {"steps": step, "output": output, "weights": files, "final_loss": info and info["final_loss"]}
    log(json.dumps(summary))
    return summary


def _export(folder, files, info):
    """Copy the final weights and ``training.json`` into ``folder`` (new, empty or an earlier export; replaced whole)."""
    import shutil

    from ..io import replace_folder

    with replace_folder(folder, is_training_export, arg="export (--export)") as tmp:
        for f in files:
            shutil.copy2(f, os.path.join(tmp, os.path.basename(f)))
        with open(os.path.join(tmp, "training.json"), "w", encoding="utf-8") as fh:
            json.dump(info, fh, indent=2)
            fh.write("\n")


__all__ += ["lr_factor"]
