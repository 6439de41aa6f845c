"""
Train SIM (the default), BoxInst (--method=boxinst: box supervision, SIM's baseline) or CondInst
(--method=full: GT masks, the upper bound); --arch=mask2former: the same SIM and BoxInst on Mask2Former
(mask2former.py, the paper's Tab. 1 dagger rows).

    python train.py                                   # SIM on the embedded synthetic dataset, on CPU, minutes
    python train.py --method=boxinst                  # BoxInst on the same data
    python train.py configs/coco_boxinst_r50_1x.py    # a config file reassigns the defaults (config.py)
    python train.py configs/demo_m2f.py               # SIM on Mask2Former, on the embedded data
    torchrun --nproc_per_node=8 train.py configs/coco_boxinst_r50_1x.py --max_iters=1000
    python train.py --data_root=DIR --init_from=out/demo/ckpt.pt   # fine-tune onto DIR's classes (another count)

Every setting in config.py can be overridden with --key=value (type-checked against the default).
The defaults are the embedded demo: a narrow ResNet-10 FPN trained from scratch on 160 px images.
The reference (COCO R50 1x) values are in configs/. Every progress line also prints the mean share of
its box that each positive's mask fills ("mask fill"); a run whose masks fill their boxes is warned about once
(collapse_warning).

A script, imported by nothing: the schedule, the optimizer, the training step and the state a
checkpoint keeps per process are in step.py, which bench.py and ablate.py run too.
"""

import datetime
import json
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import config
import configurator
import data
import eval as evaluation  # the module, not the builtin
import sim
import step
import viz
from model import build_model, copy_matching_weights, load_checkpoint


def barrier(dev):
    """dist.barrier on this rank's GPU under NCCL (without device_ids NCCL guesses the device)."""
    dist.barrier(device_ids=[dev.index]) if dev.type == "cuda" else dist.barrier()


def rank_ckpt_path(ckpt_path, rank):
    return ckpt_path.replace(".pt", f".rank{rank}.pt")


def load_rank_state(ckpt_path, rank):
    """Rank `rank`'s own state beside the master's checkpoint, or None where the run that wrote it had no
    such rank (resumed on more processes: not an exact continuation)."""
    path = rank_ckpt_path(ckpt_path, rank)
    if not os.path.isfile(path):
        return None
    return load_checkpoint(path)["rank_state"]


def main(cfg, preset):
    """The run of cfg (config.defaults() after configure_run; preset: what the SIM preset set)."""
    out_dir = cfg["out_dir"]
    # DDP: detected from torchrun's environment variables
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        local_rank = int(os.environ["LOCAL_RANK"])
        dev = f"cuda:{local_rank}" if cfg["device"].startswith("cuda") else "cpu"
        if dev.startswith("cuda"):
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(minutes=cfg["dist_timeout_min"]))
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        dev, rank, world_size = cfg["device"], 0, 1
    master = rank == 0
    if cfg["linear_scaling"]:  # the schedule written for reference_batch, moved to this run's global batch
        cfg.update(step.scale_schedule(cfg, world_size))
    dev = torch.device(dev)
    torch.manual_seed(cfg["seed"] + rank)
    random.seed(cfg["seed"] + rank)
    np.random.seed(cfg["seed"] + rank)
    device_type = dev.type
    use_amp = cfg["amp"] and device_type == "cuda"
    ptdtype = torch.bfloat16 if cfg["amp_dtype"] == "bfloat16" else torch.float16
    autocast = lambda: torch.autocast(device_type=device_type, dtype=ptdtype, enabled=use_amp)
    scaler = torch.amp.GradScaler(device_type, enabled=use_amp and ptdtype == torch.float16)

    # data (the master generates the synthetic dataset first, the others wait for it)
    if master:
        data.dataset_paths(cfg)  # generates the synthetic dataset on first use
    if ddp:
        barrier(dev)
    paths = data.dataset_paths(cfg)
    train_ds = data.CocoBoxDataset(paths["train_json"], paths["train_images"], train=True,
                                   min_sizes=cfg["min_size_train"], max_size=cfg["max_size_train"],
                                   with_masks=(cfg["method"] == "full"),
                                   mask_fraction=cfg["mask_fraction"] if cfg["method"] != "full" else 0.0,
                                   mask_seed=cfg["seed"])
    val_ds = data.CocoBoxDataset(paths["val_json"], paths["val_images"], train=False, min_sizes=(cfg["min_size_test"],),
                                 max_size=cfg["max_size_test"], with_masks=False)
    # a val image that cannot be opened stops the run now, not after training (every rank checks, so all stop)
    bad = val_ds.check_images()
    if bad:
        sys.exit(f"train.py: {len(bad)} val image(s) cannot be read, e.g. {bad[0]} — fix: replace the file(s) "
                 f"or remove them from {paths['val_json']}")
    no_mask = evaluation.masks_missing(val_ds.coco) if master else None
    if no_mask:  # said now, not after training: the run still trains and reports box AP
        print(f"train.py: mask AP will not be measured: {evaluation.no_mask_line(no_mask, paths['val_json'])}")
    if cfg["num_classes"] == 0:
        cfg["num_classes"] = train_ds.num_classes
    cfg.update(paths)  # the checkpoint's config names the data it was trained on (eval.py reads its val split)
    train_loader = data.make_loader(train_ds, cfg["batch_size"], train=True, num_workers=cfg["num_workers"],
                                    distributed=ddp, seed=cfg["seed"], scale_per_batch=cfg["scale_per_batch"],
                                    group_by_aspect=cfg["group_by_aspect"], pin_memory=device_type == "cuda")

    # model, optimizer
    model = build_model(cfg).to(dev)
    if cfg["init_from"] and not cfg["resume"]:  # fine-tuning (a resumed fine-tune continues from its own checkpoint)
        if not os.path.isfile(cfg["init_from"]):
            sys.exit(f"train.py: --init_from={cfg['init_from']} does not exist — fix: the path of a ckpt.pt written by train.py")
        init = load_checkpoint(cfg["init_from"])  # onto the CPU; load_state_dict copies onto dev
        if "model" not in init:
            sys.exit(f"train.py: {cfg['init_from']} holds no 'model' — fix: pass out_dir/ckpt.pt of a train.py run")
        copied, left = copy_matching_weights(model, init["model"])
        if master:
            shown = ", ".join(left[:6]) + (f" and {len(left) - 6} more" if len(left) > 6 else "")
            print(f"init_from {cfg['init_from']}: {len(copied)} of {len(copied) + len(left)} tensors copied, from "
                  f"iteration 0 with a fresh optimizer; left at their fresh init: {shown or 'none'}")
        del init
    optimizer = step.build_optimizer(model, cfg)
    sim_state = sim.SIMState(cfg, dev, rank) if cfg["method"] == "sim" else None  # teacher, prototypes, bank
    start_iter = 0
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if cfg["resume"]:
        if not os.path.isfile(ckpt_path):
            sys.exit(f"train.py: --resume given but {ckpt_path} does not exist — fix: drop --resume or set --out_dir")
        ckpt = load_checkpoint(ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_iter = ckpt["iter"]
        own = ckpt["rank_state"] if rank == 0 else load_rank_state(ckpt_path, rank)
        if sim_state is not None:
            sim_state.load_state_dict((own or ckpt)["sim"], model)
        if own is not None:
            step.set_rank_state(own, scaler, dev)
        if master:
            print(f"resumed from {ckpt_path} at iteration {start_iter}")
        if own is None:  # this run has more processes than the one that wrote the checkpoint
            print(f"warning: rank {rank}: no {rank_ckpt_path(ckpt_path, rank)}: rank 0's bank and a fresh random state; "
                  f"not an exact continuation", file=sys.stderr, flush=True)
    # the data from iteration start_iter on, as an uninterrupted run would have drawn it
    batches = data.infinite(train_loader, start_iter * cfg["accum_steps"])
    raw_model = model
    if ddp:
        # find_unused_parameters=False (the default, and the fast path): every trainable parameter must get a
        # gradient on every rank at every step, also on a rank whose batch has no positive (test_train.py
        # runs each config's network this way on 2 processes)
        model = DDP(model, device_ids=[dev.index] if device_type == "cuda" else None, find_unused_parameters=False)
    if master:
        os.makedirs(out_dir, exist_ok=True)
        print("config:", json.dumps(cfg))
        if cfg["method"] == "sim":
            print(f"sim_variant={cfg['sim_variant']} set: {json.dumps(preset)}")
        n_params = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
        print(f"{len(train_ds)} train / {len(val_ds)} val images, {cfg['num_classes']} classes, {n_params / 1e6:.2f}M "
              f"trainable parameters, method={cfg['method']}, device={dev}, world_size={world_size}")
        n, accum = cfg["batch_size"], cfg["accum_steps"]
        print(f"global batch {n * world_size * accum} ({n} x {world_size} processes"
              f"{f' x {accum} accumulated' if accum > 1 else ''}), lr {cfg['lr']}, {cfg['max_iters']} iterations, "
              f"lr steps {cfg['lr_steps']}"
              + (f" (linear scaling from the recipe's batch {cfg['reference_batch']})" if cfg["linear_scaling"] else ""))

    written = [start_iter]  # the iteration of the newest checkpoint on disk

    def checkpoint(it):
        if it == written[0]:  # already on disk (the last iteration is also a ckpt_interval multiple)
            return
        if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
            print(f"warning: iteration {it}: non-finite weights, checkpoint NOT written (the previous one is kept)",
                  flush=True)
            return
        own = step.rank_state(sim_state, scaler, dev)
        if master:
            data.save_atomic({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "iter": it,
                              "config": cfg, "sim": own["sim"], "rank_state": own,
                              "categories": train_ds.categories}, ckpt_path)  # for predict.py
        else:  # each rank's own bank and random states, beside the master's checkpoint
            data.save_atomic({"iter": it, "rank_state": own}, rank_ckpt_path(ckpt_path, rank))
        written[0] = it

    # training loop
    # SIGTERM (a cluster's pre-emption, torchrun passing on a kill): finish the step, checkpoint, exit
    # the flag lives on the training device: NCCL all-reduces CUDA tensors only
    stop = torch.zeros(1, device=dev)
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.fill_(1))
    n_unreadable, n_nonfinite, last_unreadable, warned = 0, 0, "", set()
    # the positives' mask fill ratios since the last log line (sum, count), on the device: read with the log
    fill = torch.zeros(2, device=dev)
    fill_warned = False
    viz_batch = None
    max_iters, accum_steps, log_interval = cfg["max_iters"], cfg["accum_steps"], cfg["log_interval"]

    model.train()
    t0 = t_log = time.time()
    for it in range(start_iter, max_iters):
        step.set_lr(optimizer, it, cfg)  # get_lr x each group's lr_mult
        for m in range(accum_steps):
            images, targets = next(batches)
            for t in targets:  # files the dataset could not read, replaced by the next image (data.py)
                for p in t.pop("skipped", ()):
                    n_unreadable, last_unreadable = n_unreadable + 1, p
                    if p not in warned:  # one warning per file; later skips are only counted
                        warned.add(p)
                        print(f"warning: rank {rank}: cannot read {p}; skipped (counted, not warned again), the "
                              f"next image stands in", file=sys.stderr, flush=True)
            loss, logs = step.train_step(model, raw_model, optimizer, scaler, sim_state, images, targets, it, cfg, dev,
                                         autocast, (m, accum_steps))
            n_nonfinite += not torch.isfinite(loss).all()
            step_fill = logs.pop("mask_fill", None)  # CondInst's (step.train_step); not a loss term
            if master and step_fill is not None:
                fill += step_fill

        if master and ((it + 1) % log_interval == 0 or it + 1 == max_iters):
            dt = time.time() - t_log
            n_iters = (it + 1 - start_iter) % log_interval or log_interval
            ips = n_iters * cfg["batch_size"] * world_size * accum_steps / dt
            eta = (max_iters - it - 1) * dt / n_iters
            parts = " ".join(f"{k} {v.item():.3f}" for k, v in logs.items())
            fill_sum, fill_n = fill.tolist()
            fill.zero_()
            warning = None
            if fill_n:  # the mean over every positive of the interval
                parts += f" | mask fill {fill_sum / fill_n:.2f}"
                warning = None if fill_warned else collapse_warning(fill_sum / fill_n, it + 2 - n_iters, it + 1, cfg)
            mem = f" | peak mem {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GB" if device_type == "cuda" else ""
            print(f"iter {it + 1}/{max_iters} | loss {loss.item():.3f} | {parts} | lr {step.get_lr(it, cfg):.2e} | "
                  f"{ips:.1f} img/s | ETA {eta / 60:.1f} min{mem}", flush=True)
            if warning:  # once per run
                print(warning, flush=True)
                fill_warned = True
            if n_unreadable or n_nonfinite:
                print(skip_summary(n_unreadable, last_unreadable, n_nonfinite), flush=True)
            t_log = time.time()
        if cfg["ckpt_interval"] and (it + 1) % cfg["ckpt_interval"] == 0:
            checkpoint(it + 1)
        if master and cfg["viz_interval"] and (it + 1) % cfg["viz_interval"] == 0:  # the maps co-evolving with the model
            viz_batch = viz_batch or data.to_device(*data.collate([val_ds[i] for i in range(min(2, len(val_ds)))]), dev)
            viz.object_grids(raw_model, sim_state, cfg, *viz_batch, os.path.join(out_dir, "viz"), 2, f"it{it + 1}")
        if ddp:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # every rank stops at the same iteration
        if stop.item():
            checkpoint(it + 1)
            if master:
                print(f"SIGTERM: checkpoint at iteration {it + 1} in {ckpt_path}; continue with --resume", flush=True)
            if ddp:
                dist.destroy_process_group()
            sys.exit(143)
        if cfg["eval_interval"] and (it + 1) % cfg["eval_interval"] == 0 and it + 1 < max_iters:
            run_eval(raw_model, val_ds, dev, master, ddp, cfg, ptdtype, final=False)
            model.train()
    checkpoint(max_iters)
    if master:
        print(f"training done in {(time.time() - t0) / 60:.1f} min; checkpoint {ckpt_path}")
        print(skip_summary(n_unreadable, last_unreadable, n_nonfinite, train_ds.skipped), flush=True)
    run_eval(raw_model, val_ds, dev, master, ddp, cfg, ptdtype, final=True)
    if master and sim_state is not None and sim_state.teacher is not None:
        images, targets = data.to_device(*data.collate([train_ds[i] for i in range(4)]), dev)
        paths = viz.object_grids(raw_model, sim_state, cfg, images, targets, out_dir, n=4, prefix="pseudo")
        print(f"{len(paths)} pseudo-mask grids (M_S, M_I, M_C, M_prob, M_hat, copy-paste) in {out_dir}/pseudo_*.png")
    if ddp:
        dist.destroy_process_group()


def collapse_warning(mean_fill, first_it, last_it, cfg):
    """The "masks became boxes" guard: the line to print (once) when the positives' masks fill on average
    more than collapse_fill of their GT boxes (losses.mask_fill_ratio) over the log interval of iterations
    first_it..last_it (1-based), all after the pairwise loss reached its full weight; else None.
    Box-supervised runs only (BoxInst, SIM): with GT masks a box-shaped mask is the target's shape. Under DDP
    rank 0's positives alone (no collective: every rank draws from the same data)."""
    start = max(cfg["pairwise_warmup_iters"], cfg["warmup_iters"])
    if not (cfg["collapse_fill"] > 0 and cfg["method"] in ("boxinst", "sim") and first_it >= start
            and mean_fill > cfg["collapse_fill"]):
        return None
    return (f"warning: iterations {first_it}-{last_it}: the predicted masks fill {mean_fill:.0%} of their boxes "
            f"(more than collapse_fill={cfg['collapse_fill']}): the masks have become boxes. Likely cause: the "
            f"colour-pairwise loss, the only term that tells an object from the background of its box, links almost "
            f"no neighbour pairs (colour similarity >= color_thresh={cfg['color_thresh']}: too high for this data) or "
            f"links them across object edges (grey or low-contrast images). Fix: the threshold for your images "
            f"(README, 'Your own data': grey images --color_thresh=0.5), and a pairwise_warmup_iters "
            f"(now {cfg['pairwise_warmup_iters']}) well below max_iters")


def skip_summary(n_unreadable, last_unreadable, n_nonfinite, at_load=None):
    """One line: what training skipped so far (and, at the end, what the dataset dropped at load)."""
    parts = [f"{n_unreadable} unreadable images replaced" + (f" (last: {last_unreadable})" if n_unreadable else ""),
             f"{n_nonfinite} non-finite steps skipped"]
    if at_load is not None:
        parts += [f"at load: {at_load['missing_files']} missing files, {at_load['no_box_images']} images without a "
                  f"valid box, {at_load['bad_boxes']} empty or out-of-image boxes, {at_load['crowd']} crowd annotations"]
    return "skipped: " + "; ".join(parts)


def run_eval(raw_model, val_ds, dev, master, ddp, cfg, amp_dtype, final):
    """COCO box and mask AP on the val split: every process predicts its shard, the master
    gathers and scores them; at the end also metrics.json and PNG overlays. amp_dtype: the training's
    autocast dtype (predictions as the network was trained)."""
    out_dir = cfg["out_dir"]
    loader = data.make_loader(val_ds, cfg["batch_size"], train=False, num_workers=cfg["num_workers"], distributed=ddp,
                              pin_memory=dev.type == "cuda")
    metrics = evaluation.evaluate(raw_model, loader, val_ds, dev, out_dir=out_dir if final and master else None,
                                  amp=cfg["amp"] and dev.type == "cuda", distributed=ddp, amp_dtype=amp_dtype)
    if master and final:
        data.write_json_atomic(metrics, os.path.join(out_dir, "metrics.json"), indent=1)
        paths = viz.save_overlays(raw_model, val_ds, dev, out_dir, n=cfg["n_overlays"])
        print(f"box AP {metrics['bbox']['AP']:.1f} | mask AP {metrics['segm']['AP']:.1f} | "
              f"{len(paths)} pictures in {out_dir}/ | metrics in {out_dir}/metrics.json")
    # no barrier: the other ranks go on (to their next step's collectives, or to exit after the final
    # evaluation) and wait there while rank 0 scores; dist_timeout_min covers that wait


if __name__ == "__main__":
    cfg = config.defaults()
    preset = configurator.configure_run(sys.argv[1:], cfg, "train.py")  # what the SIM preset set (printed at start)
    try:
        main(cfg, preset)
    except data.DataError as e:  # bad input: one clear line, not a traceback from a worker process
        sys.exit(f"train.py: {str(e).strip().splitlines()[-1].removeprefix('data.DataError: ')}")
