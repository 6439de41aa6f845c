"""
One optimisation step: the learning-rate schedule, the optimizer, a training step and the state a
checkpoint keeps so that a run continues exactly. train.py runs these in its loop; bench.py times
train_step and ablate.py's probes continue a checkpoint with it, so all of them step the way a
training run does. Every function takes the config (a dict of config.py's keys) it reads.
"""

import contextlib
import random

import numpy as np
import torch
import torch.distributed as dist

import copypaste
import data
import losses
import mask2former
import sim


# -----------------------------------------------------------------------------
# the schedule


def get_lr(it, cfg):
    """Linear warm-up from warmup_factor, then lr_schedule "step": x0.1 at each of lr_steps (detectron2's
    WarmupMultiStep) or "poly": x (1 - it / max_iters)^poly_power (detectron2's WarmupPolyLR, the warm-up
    factor times the poly factor, as there)."""
    factor = 1.0
    if it < cfg["warmup_iters"]:
        a = it / cfg["warmup_iters"]
        factor = cfg["warmup_factor"] * (1 - a) + a
    if cfg["lr_schedule"] == "poly":
        return cfg["lr"] * factor * (1 - it / cfg["max_iters"]) ** cfg["poly_power"]
    if cfg["lr_schedule"] != "step":
        raise SystemExit(f"step.py: --lr_schedule={cfg['lr_schedule']!r} — fix: step or poly")
    return cfg["lr"] * factor * 0.1 ** sum(it >= s for s in cfg["lr_steps"])


def set_lr(optimizer, it, cfg):
    """get_lr on every parameter group, times the group's lr_mult (param_groups: the backbone's
    backbone_lr_mult; 1 for a group without one, e.g. from an older checkpoint's optimizer)."""
    lr = get_lr(it, cfg)
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)


ITERATION_KEYS = ("max_iters", "warmup_iters", "lr_steps", "sim_start_iter", "teacher_start_iter",
                  "pairwise_warmup_iters", "lambda1_ramp_iters", "ckpt_interval", "eval_interval", "viz_interval",
                  "iters_1x")


def scale_schedule(cfg, world_size):
    """The linear scaling rule (Goyal et al. 2017) from the recipe's global batch R (reference_batch) to
    this run's G = batch_size x world_size x accum_steps: lr x G/R; every iteration count x R/G (the same
    number of images seen at each point); the per-iteration EMA momenta m -> m^(G/R) (the same horizon in
    images). -> the changed keys."""
    G, R = cfg["batch_size"] * world_size * cfg["accum_steps"], cfg["reference_batch"]
    k = R / G
    out = {"lr": cfg["lr"] * G / R}
    for key in ITERATION_KEYS:
        v = cfg[key]
        if isinstance(v, tuple):
            out[key] = tuple(int(round(x * k)) for x in v)
        elif v >= 0:  # a negative value is a rule (lambda1_ramp_iters = -1), not a count
            out[key] = int(round(v * k))
    for key in ("teacher_momentum", "proto_momentum"):
        out[key] = cfg[key] ** (1 / k)
    return out


# -----------------------------------------------------------------------------
# the optimizer


NORM_TYPES = (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.SyncBatchNorm)
# Mask2Former's reference also exempts LayerNorms and the query / level embeddings (WEIGHT_DECAY_NORM and
# WEIGHT_DECAY_EMBED 0)
M2F_NO_DECAY_TYPES = NORM_TYPES + (torch.nn.LayerNorm, torch.nn.Embedding)


def param_groups(model, weight_decay, backbone_lr_mult=1.0, no_decay_types=NORM_TYPES):
    """Weight decay on conv weights, biases and FCOS scales; none on norm layers (the reference), nor on the
    parameters of modules of no_decay_types. backbone_lr_mult != 1: the backbone's parameters in groups of
    their own with that lr_mult (set_lr reads it). Mask2Former's level embeddings (bare nn.Parameters of
    its pixel decoder) count as embeddings."""
    no_decay_ids = {id(p) for m in model.modules() if isinstance(m, no_decay_types) for p in m.parameters()}
    if no_decay_types is not NORM_TYPES:
        no_decay_ids |= {id(p) for n, p in model.named_parameters() if n.endswith("level_embed")}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    split = backbone_lr_mult != 1
    parts = [(1.0, [p for n, p in trainable if not (split and n.startswith("backbone."))])]
    if split:
        parts.append((backbone_lr_mult, [p for n, p in trainable if n.startswith("backbone.")]))
    return [{"params": [p for p in params if (id(p) in no_decay_ids) == no_decay], "weight_decay": 0.0 if no_decay else weight_decay,
             "lr_mult": mult} for mult, params in parts for no_decay in (False, True)]


def build_optimizer(model, cfg):
    """cfg's solver over param_groups, at cfg's lr (get_lr sets it each iteration): "sgd" with momentum
    (the reference) or "adamw", fused: one kernel for all parameters instead of ~10 ops per tensor (3x
    faster on CPU, BENCHMARKS.md D4)."""
    groups = param_groups(model, cfg["weight_decay"], cfg["backbone_lr_mult"],
                          M2F_NO_DECAY_TYPES if cfg["arch"] == "mask2former" else NORM_TYPES)
    if cfg["solver"] == "adamw":
        return torch.optim.AdamW(groups, lr=cfg["lr"], fused=True)
    if cfg["solver"] == "sgd":
        return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"])
    raise SystemExit(f"step.py: --solver={cfg['solver']!r} is not a solver — fix: --solver=sgd or --solver=adamw")


# -----------------------------------------------------------------------------
# a training step


def all_finite(x):
    """x is finite on every process (under DDP all ranks must skip a step together, or they hang)."""
    ok = torch.isfinite(x).all().float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def train_step(model, raw_model, optimizer, scaler, sim_state, images, targets, it, cfg, dev, autocast, micro=(0, 1)):
    """One iteration (it is 0-based): SIM's copy-paste, the forward passes, the losses of
    Eq. (10) (Mask2Former's: mask2former.training_losses), backward, clip_grad, the optimizer's step,
    then SIM's prototype/bank/teacher updates. bench.py times it.
    micro = (m, n): micro-batch m of n (gradient accumulation): the loss is divided by n, the
    optimizer steps and the teacher's EMA moves after the last one only (DDP syncs only then).
    -> (loss, logs): the weighted loss terms, and for CondInst "mask_fill", (2,): the sum of the
    positives' losses.mask_fill_ratio and their count (not a loss: train.py's collapse guard)."""
    m, n = micro
    last = m == n - 1
    images, targets = data.to_device(images, targets, dev)
    if sim_state is not None and it >= cfg["sim_start_iter"] and cfg["paste_prob"] > 0:
        # online copy-paste on the training device: the bank stays on the CPU, the drawn crops move
        images, targets = copypaste.copy_paste_batch(images, targets, sim_state.bank, cfg["paste_prob"],
                                                     sim_state.generator, cfg["paste_max_objects"],
                                                     cfg["paste_replacement"], cfg["paste_fraction"],
                                                     cfg["paste_score_power"])
    teacher_on = sim_state is not None and it >= cfg["teacher_start_iter"]
    if teacher_on and sim_state.teacher is None:
        sim_state.start_teacher(raw_model)
    with autocast():
        out = model(images, targets)
        if teacher_on:
            t_out = sim.teacher_outputs(sim_state, images)  # folded, inference mode, bf16 where fast, fp32 out
    # losses and pseudo masks in fp32: the thresholds of M_hat need the precision
    extra, affinity, feats = {}, None, None
    if cfg["arch"] == "mask2former":  # matched queries instead of FCOS positives, the same SIM (mask2former.py)
        loss, logs, pm, obj, feats = mask2former.training_losses(out, t_out if teacher_on else None, sim_state,
                                                                 images, targets, it, cfg)
    else:
        if teacher_on:
            obj = sim.objects(targets, images.shape[-2:], cfg["mask_out_stride"], cfg["occlusion_aware"],
                              images if cfg["color_weight"] > 0 else None)  # the colours only for color_map
            pm = sim.pseudo_masks(out, t_out, sim_state.teacher_fwd, sim_state.protos, obj, cfg)
            if it + 1 > cfg["sim_start_iter"]:
                extra = sim.sim_losses(out, pm, obj, cfg)
            if cfg["pairwise_affinity"] == "color_feat":
                affinity = sim.feature_affinity(t_out)
        loss, logs = losses.compute_losses(out, images, targets, cfg, it + 1, extra, affinity)
        # train.py's "masks became boxes" guard: the positives' fill ratios summed, and their count, left on
        # the device (read when the log line prints)
        fill = losses.mask_fill_ratio(out["mask_logits"], torch.cat([t["boxes"] for t in targets])[out["inst"]["gt_inds"]],
                                      images.shape[-2:], cfg["mask_out_stride"])  # (K,)
        logs["mask_fill"] = torch.stack([fill.sum(), fill.new_full((), float(fill.shape[0]))])
    if not all_finite(loss):  # no backward, no step, no SIM update: the weights never see it
        bad = [k for k, v in logs.items() if not torch.isfinite(v).all()] or ["loss"]
        msg = f"iteration {it + 1}: non-finite {', '.join(bad)}"
        if not cfg["skip_nonfinite"]:
            raise FloatingPointError(msg + " — fix: lower --lr, or --skip_nonfinite=True to skip such steps")
        print(f"warning: {msg}; {'step' if n == 1 else f'micro-batch {m + 1}/{n}'} skipped", flush=True)
        if last:  # its backward would have been the synchronising one: the accumulated step is dropped too
            optimizer.zero_grad(set_to_none=True)
        return loss, logs
    with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
        scaler.scale(loss / n).backward()
    if last:
        if cfg["clip_grad"] > 0:  # the whole model's gradient norm (Mask2Former's reference: 0.01)
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg["clip_grad"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    if teacher_on:
        sim.after_step(sim_state, raw_model, out, pm, obj, images, targets, ema=last, feats=feats)
    return loss, logs


# -----------------------------------------------------------------------------
# the state a checkpoint keeps per process


def rank_state(sim_state, scaler, dev):
    """What this process needs to continue exactly: its random states (torch, CUDA, python, numpy),
    its SIM state (teacher, prototypes, its own memory bank, copy-paste generator) and the AMP scaler."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
            "python": random.getstate(), "numpy": _numpy_state_as_tensor(np.random.get_state()), "scaler": scaler.state_dict(),
            "sim": sim_state.state_dict() if sim_state is not None else None}


def _numpy_state_as_tensor(state):
    """numpy's RNG state with its key array as a tensor: checkpoints stay loadable with weights_only=True."""
    name, keys, pos, has_gauss, cached = state
    return (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def set_rank_state(state, scaler, dev):
    """rank_state's states put back (on resume): the run continues as if it had not stopped."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and dev.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], dev)
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
