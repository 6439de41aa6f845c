"""
Train SIM (the default), BoxInst (--method=boxinst: box supervision, SIM's baseline) or CondInst
(--method=full: GT masks, the upper bound).

    python train.py                                   # SIM on the embedded synthetic dataset, on CPU, minutes
    python train.py --method=boxinst                  # BoxInst on the same data
    python train.py configs/coco_boxinst_r50_1x.py    # a config file reassigns the defaults below
    torchrun --nproc_per_node=8 train.py configs/coco_boxinst_r50_1x.py --max_iters=1000

Every default below can be overridden with --key=value (type-checked against the default).
The defaults are the embedded demo: a narrow ResNet-10 FPN trained from scratch on 160 px images.
The reference (COCO R50 1x) values are in configs/.
"""

import contextlib
import datetime
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import configurator
import copypaste
import data
import losses
import sim
import synthetic
import viz
from model import build_model

# -----------------------------------------------------------------------------
# default config: the embedded demo (see configs/ for COCO)
# I/O
out_dir = "out/demo"
log_interval = 20            # iterations between progress lines
eval_interval = 0            # iterations between evaluations (0: only at the end)
ckpt_interval = 500          # iterations between checkpoints (written atomically)
resume = False               # continue from out_dir/ckpt.pt
skip_nonfinite = True        # a NaN/inf loss skips its step with a warning naming the term (False: stop)
n_overlays = 8               # PNG overlays of predictions written after the final evaluation
viz_interval = 400           # iterations between viz.py grids of val images 0-1 in out_dir/viz (0: never)
# data: data_root (a COCO or VOC tree, DATA_LAYOUTS below), or the four paths, or neither: the
# embedded synthetic dataset, generated on first use. A path given explicitly wins over data_root's.
data_root = ""
dataset = "coco"             # data_root's layout: "coco" (COCO 2017) or "voc" (VOC 2012 + SBD, COCO-format json)
train_json = ""
train_images = ""
val_json = ""
val_images = ""
synthetic_root = "data/synthetic"
synthetic_min_visible = 0.3  # generator: objects keep >= this share of their outline visible (v6: 0)
synthetic_low_contrast = 0.6  # generator: low-contrast objects' colour share from the background (v6: 0.8)
min_size_train = (144, 160, 176)  # shorter side sampled from these
scale_per_batch = True       # one scale per batch, not per image (reference): less padding, 1.1x faster demo steps
group_by_aspect = True       # batches of landscape or of portrait images only (reference): less padding
max_size_train = 320
min_size_test = 160
max_size_test = 320
batch_size = 4               # per process (small batches learn more per image on the CPU demo)
accum_steps = 1              # gradient accumulation: micro-batches per step (global batch = batch_size x processes x this)
reference_batch = 4          # the global batch the schedule below is written for (COCO configs: 16)
linear_scaling = False       # True: lr x global/reference batch, iterations (and EMA momenta) x reference/global
num_workers = 1
bottom_pixels_removed = 0    # BoxInst's COCO trick (10): bottom rows not used as pairwise neighbours
# model (model.py reads these)
backbone = "resnet10"         # torchvision ResNet, 1 block per stage (no ImageNet weights; COCO: resnet50)
channels_last = True         # NHWC memory format for the convolutions (faster on CPU and tensor cores)
pretrained = ""              # "" random init, "imagenet" torchvision weights, or a .pth path
backbone_norm = "bn"         # "frozen" (reference, needs pretrained) or "bn" (trainable, from scratch)
freeze_at = 0                # 2 = stem and res2 frozen (reference)
fpn_channels = 64
head_channels = 64
head_convs = 2
num_classes = 0              # 0 = from the training json
mask_branch_channels = 32     # at stride 4 (mask_out_stride 2) its convs cost 4x those at stride 8
mask_branch_convs = 2
mask_out_channels = 16       # D: mask-feature channels (16 for BoxInst/SIM)
mask_out_stride = 2          # mask logits at stride 2 (reference 4, made for 800-px images): on the
                             # 160-px demo images a stride-4 mask has 4 cells across a 16-px object
mask_head_channels = 8
mask_head_layers = 3
sizes_of_interest = (16, 32, 64, 128)  # FPN size ranges; the reference's (64, 128, 256, 512) is for
                             # 800-px images, the demo's 160-px images get it scaled by 1/4
center_radius = 1.5
topk_proposals_per_im = 64   # BoxInst/SIM: positives per image for the mask losses
max_proposals = -1           # CondInst: random positives per process (500); -1 off
score_thresh = 0.05
pre_nms_topk = 1000
nms_thresh = 0.6
max_dets = 100
mask_thresh = 0.5
# method and losses
method = "sim"               # sim (the main job) | boxinst (SIM's baseline: boxes alone) | full (GT masks)
color_thresh = 0.3           # BoxInst: pairwise pixels need colour similarity >= this
pairwise_warmup_iters = 400  # the pairwise weight ramps 0 -> 1 (reference: 10000)
# SIM (--method=sim). sim_variant picks a preset (sim.PRESETS: nanosim | paper | official) that sets
# the knobs marked [preset] below; a knob given explicitly (--key=value or a config file) wins.
# The values written here are nanosim's. Schedule knobs are the short demo's (faster EMAs).
sim_variant = "nanosim"
sim_start_iter = 700         # Eq. (10): L_pseudo and L_paste from this iteration on (COCO: 10000)
teacher_start_iter = 400     # teacher copied from the student, prototypes and bank start (COCO: 5000)
teacher_momentum = 0.99      # momentum teacher EMA (paper: 0.9999)
teacher_fold_bn = True       # the teacher's forwards run with its BatchNorms folded into its convs (model.fold_batchnorm)
teacher_bf16 = True          # the teacher's forward in bfloat16 where the device has bf16 kernels (sim.teacher_autocast)
num_subcenters = 10          # L: sub-centres per class
proto_momentum = 0.99        # gamma, Eq. (4) (paper: 0.999)
tau = 0.1                    # [preset] Eq. (1) temperature (official: 1)
semantic_map = "calibrated"  # [preset] "paper" (Eq. 1) or "calibrated" (against background sub-centres)
proto_filter = True          # [preset] sub-centre updates skip pixels the semantic map disagrees on
proto_assign = "argmax"      # [preset] Sinkhorn's hard assignment: "argmax" (paper) or "gumbel" (official)
proto_norm = "D"             # [preset] prototypes unit over "D" (paper) or over "L" (official's normalisation)
sinkhorn_eps = 0.05          # Eq. (2)-(3)
sinkhorn_iters = 3
proto_conf_thresh = 0.7      # pixels updating the prototypes: teacher mask > this inside the box
mu = 5.0                     # [preset] Eq. (6) (official: 0, the plain mean)
alpha = 0.5                  # [preset] Eq. (7)
color_weight = 0.5           # [preset] beta: M_prob' = (1 - beta) M_prob + beta M_C, the colour map (0: off)
color_temp = 2.0             # M_C's temperature, in Lab units (BoxInst's colour threshold 0.3 is 2.4 units)
color_ring = 3               # M_C's background seeds: a ring of this many mask cells around the box
color_seeds = 64             # M_C: colour samples per seed set and object
color_min_contrast = 6.0     # M_C: object colour samples this close (Lab units) to a ring colour are dropped
pseudo_thresh = "area"       # [preset] "fixed" (tau_low/tau_high) or "area" (fg threshold matched to the
                             # teacher's confident area, clamped to [tau_high, area_t_max])
tau_low = 0.3                # [preset] M_hat = 0 below, ignored between, 1 above the fg threshold
tau_high = 0.7               # [preset]
area_t_max = 0.8             # [preset]
supervise_outside = True     # [preset] pixels outside the box are background targets (paper/official: ignored)
occlusion_aware = True       # [preset] pixels pasted over an object leave its box in every loss
pseudo_loss = "bce_dice"     # [preset] "bce_dice" (Eq. 8) or "official" (focal-style, docs/official_code.md §6.3)
paste_loss = "official"      # [preset] "bce_dice" (Eq. 9, over the pasted positives) or "official" (§6.4;
                             # nanosim: Eq. 9's form costs 6 box AP here, BENCHMARKS.md D15)
lambda1 = 0.5                # [preset] Eq. (10) weight of L_pseudo
lambda1_ramp_iters = 300     # [preset] lambda1 ramps linearly over this many iterations (0: a step)
lambda1_ramp_origin = -1     # [preset] where the ramp starts (-1: sim_start_iter; official: 0)
lambda2 = 1.0                # [preset] Eq. (10) weight of L_paste
bank_size = 100              # [preset] copy-paste memory bank (images per process)
bank_thresh = 0.7            # teacher mask > this = an object's pseudo mask in the bank
bank_masks = "teacher"       # [preset] the bank's pseudo masks: "teacher" (its mean mask, official) or "rectified" (M_prob)
bank_min_box_iou = 0.8       # [preset] pseudo masks whose tight box has IoU < this with the GT box stay out
paste_prob = 0.5              # [preset] copy-paste probability per image
paste_max_objects = 3
paste_replacement = False    # [preset] objects drawn with replacement (official)
paste_detector = True        # [preset] pasted images also train the detector (FCOS losses)
pairwise_affinity = "color"  # [preset] "color" (BoxInst) or "color_feat" (official: x teacher-feature affinity)
color_feat_thresh = 0.1      # the threshold of the colour x feature affinity
# optimizer (linear warm-up, step decay). The COCO configs use the reference's SGD; the from-scratch
# CPU demo learns about 1.2x more box AP per image seen with AdamW (BENCHMARKS.md D4)
solver = "adamw"             # "sgd" (the reference, with momentum) or "adamw"
lr = 2e-3                    # demo: 2e-3 beats 1e-3 and 3e-3 on generator v7 (BENCHMARKS.md D5)
momentum = 0.9               # SGD only
weight_decay = 0.05          # 0 on norm layers (reference SGD: 1e-4)
warmup_iters = 200
warmup_factor = 0.001
lr_steps = (1320, 1520)
max_iters = 1600
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
amp = True                   # autocast on CUDA (ignored on CPU)
amp_dtype = "bfloat16"       # or "float16" (with a GradScaler)
seed = 0
dist_timeout_min = 60        # how long a rank waits in a collective: covers rank 0 alone scoring COCO's val
                             # (COCOeval, json, pictures) while the others wait; NCCL's default is 10 min
# -----------------------------------------------------------------------------


def configure(argv, config):
    """configurator.configure (config files, then --key=value overrides), then the SIM preset of
    config["sim_variant"] fills the knobs nobody set explicitly. Returns what the preset set."""
    return sim.apply_preset(config, configurator.configure(argv, config, "train.py"))


config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple))]
_preset = {}  # what the SIM preset set (printed at start)
if __name__ == "__main__":
    _cfg = {k: globals()[k] for k in config_keys}
    _preset = configure(sys.argv[1:], _cfg)
    globals().update(_cfg)
config = {k: globals()[k] for k in config_keys}

# -----------------------------------------------------------------------------


def get_lr(it):
    """Linear warm-up from warmup_factor, then x0.1 at each of lr_steps (detectron2's WarmupMultiStep)."""
    factor = 1.0
    if it < warmup_iters:
        a = it / warmup_iters
        factor = warmup_factor * (1 - a) + a
    return lr * factor * 0.1 ** sum(it >= s for s in lr_steps)


def param_groups(model):
    """Weight decay on conv weights, biases and FCOS scales; none on norm layers (the reference)."""
    norm_types = (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.SyncBatchNorm)
    norm_params = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters()}
    decay = [p for p in model.parameters() if p.requires_grad and id(p) not in norm_params]
    no_decay = [p for p in model.parameters() if p.requires_grad and id(p) in norm_params]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def to_device(images, targets, device):
    images = images.to(device, non_blocking=True)
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return images, targets


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
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and dev.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], dev)
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])


def rank_ckpt_path(ckpt_path, rank):
    return ckpt_path.replace(".pt", f".rank{rank}.pt")


def load_checkpoint(path):
    """A checkpoint onto the CPU, whatever device wrote it: RNG states must be CPU byte tensors
    (torch.set_rng_state, Generator.set_state), the memory bank lives on the CPU, and load_state_dict
    copies weights onto the model's own device. mmap: a rank reads only the tensors it uses (ranks
    1..N-1 never page in rank 0's bank stored in ckpt.pt)."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def load_rank_state(ckpt_path, rank):
    path = rank_ckpt_path(ckpt_path, rank)
    if not os.path.isfile(path):
        return None
    return load_checkpoint(path)["rank_state"]


def save_atomic(obj, path):
    """torch.save through data.write_atomic: a crash or kill -9 mid-write never loses the previous checkpoint."""
    data.write_atomic(path, lambda f: torch.save(obj, f))


# where data_root's files are, per dataset (relative to data_root). VOC: the SBD-augmented VOC 2012
# train split (10,582 images) and the VOC 2012 val split (1,449) in COCO format, as BoxInst and SIM
# train and test on it; README.md says how to make the two json files.
DATA_LAYOUTS = {
    "coco": dict(train_json="annotations/instances_train2017.json", train_images="train2017",
                 val_json="annotations/instances_val2017.json", val_images="val2017"),
    "voc": dict(train_json="annotations/voc_2012_train_aug_cocostyle.json", train_images="JPEGImages",
                val_json="annotations/voc_2012_val_cocostyle.json", val_images="JPEGImages"),
}


def dataset_paths(cfg=None, need=("train_json", "train_images", "val_json", "val_images")):
    """The json/image paths of cfg (default: train.py's): those given, else data_root's (DATA_LAYOUTS), else
    the embedded synthetic dataset's. Only the `need`ed paths are checked to exist."""
    c = config if cfg is None else cfg
    given = {k: c[k] for k in ("train_json", "train_images", "val_json", "val_images")}
    if c["data_root"]:
        if c["dataset"] not in DATA_LAYOUTS:
            sys.exit(f"train.py: --dataset={c['dataset']!r} is not a layout — fix: one of {', '.join(DATA_LAYOUTS)}")
        paths = {k: given[k] or os.path.join(c["data_root"], v) for k, v in DATA_LAYOUTS[c["dataset"]].items()}
        for k in need:
            p = paths[k]
            if not (os.path.isfile(p) if k.endswith("json") else os.path.isdir(p)):
                sys.exit(f"train.py: {p} not found (--data_root={c['data_root']}, --dataset={c['dataset']}) — fix: put "
                         f"the {c['dataset'].upper()} {k} there (layout: train.DATA_LAYOUTS), or pass --{k}=PATH")
        return paths
    if c["train_json"]:
        return given
    return synthetic.ensure_synthetic(c["synthetic_root"], low_contrast_bg=c["synthetic_low_contrast"],
                                      min_visible_frac=c["synthetic_min_visible"])


ITERATION_KEYS = ("max_iters", "warmup_iters", "lr_steps", "sim_start_iter", "teacher_start_iter",
                  "pairwise_warmup_iters", "lambda1_ramp_iters", "ckpt_interval", "eval_interval", "viz_interval")


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
        out[key] = tuple(int(round(x * k)) for x in v) if isinstance(v, tuple) else int(round(v * k))
    for key in ("teacher_momentum", "proto_momentum"):
        out[key] = cfg[key] ** (1 / k)
    return out


def barrier(dev):
    """dist.barrier on this rank's GPU under NCCL (without device_ids NCCL guesses the device)."""
    dist.barrier(device_ids=[dev.index]) if dev.type == "cuda" else dist.barrier()


def all_finite(x):
    """x is finite on every process (under DDP all ranks must skip a step together, or they hang)."""
    ok = torch.isfinite(x).all().float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def train_step(model, raw_model, optimizer, scaler, sim_state, images, targets, it, cfg, dev, autocast, micro=(0, 1)):
    """One iteration (it is 0-based): SIM's copy-paste, the forward passes, the losses of
    Eq. (10), backward and SGD step, then SIM's prototype/bank/teacher updates. bench.py times it.
    micro = (m, n): micro-batch m of n (gradient accumulation): the loss is divided by n, the
    optimizer steps and the teacher's EMA moves after the last one only (DDP syncs only then)."""
    m, n = micro
    last = m == n - 1
    images, targets = to_device(images, targets, dev)
    if sim_state is not None and it >= cfg["sim_start_iter"] and cfg["paste_prob"] > 0:
        # online copy-paste on the training device: the bank stays on the CPU, the drawn crops move
        images, targets = copypaste.copy_paste_batch(images, targets, sim_state.bank, cfg["paste_prob"],
                                                     sim_state.generator, cfg["paste_max_objects"],
                                                     cfg["paste_replacement"])
    teacher_on = sim_state is not None and it >= cfg["teacher_start_iter"]
    if teacher_on and sim_state.teacher is None:
        sim_state.start_teacher(raw_model)
    with autocast():
        out = model(images, targets)
        if teacher_on:
            t_out = sim.teacher_outputs(sim_state, images)  # folded, inference mode, bf16 where fast, fp32 out
    # losses and pseudo masks in fp32: the thresholds of M_hat need the precision
    extra, affinity = {}, None
    if teacher_on:
        obj = sim.objects(targets, images.shape[-2:], cfg["mask_out_stride"], cfg["occlusion_aware"],
                          images if cfg["color_weight"] > 0 else None)  # the colours only for color_map
        pm = sim.pseudo_masks(out, t_out, sim_state.teacher_fwd, sim_state.protos, obj, cfg)
        if it + 1 > cfg["sim_start_iter"]:
            extra = sim.sim_losses(out, pm, obj, cfg)
        if cfg["pairwise_affinity"] == "color_feat":
            affinity = sim.feature_affinity(t_out)
    loss, logs = losses.compute_losses(out, images, targets, cfg, it + 1, extra, affinity)
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
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    if teacher_on:
        sim.after_step(sim_state, raw_model, out, pm, obj, images, targets, ema=last)
    return loss, logs


def main():
    global num_classes
    # DDP: detected from torchrun's environment variables
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        local_rank = int(os.environ["LOCAL_RANK"])
        dev = f"cuda:{local_rank}" if device.startswith("cuda") else "cpu"
        if dev.startswith("cuda"):
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(minutes=dist_timeout_min))
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        dev, rank, world_size = device, 0, 1
    master = rank == 0
    if linear_scaling:  # the schedule written for reference_batch, moved to this run's global batch
        scaled = scale_schedule(config, world_size)
        config.update(scaled)
        globals().update(scaled)
    dev = torch.device(dev)
    torch.manual_seed(seed + rank)
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    device_type = dev.type
    use_amp = amp and device_type == "cuda"
    ptdtype = torch.bfloat16 if amp_dtype == "bfloat16" else torch.float16
    autocast = lambda: torch.autocast(device_type=device_type, dtype=ptdtype, enabled=use_amp)
    scaler = torch.amp.GradScaler(device_type, enabled=use_amp and ptdtype == torch.float16)

    # data (the master generates the synthetic dataset first, the others wait for it)
    if master:
        dataset_paths()  # generates the synthetic dataset on first use
    if ddp:
        barrier(dev)
    paths = dataset_paths()
    train_ds = data.CocoBoxDataset(paths["train_json"], paths["train_images"], train=True, min_sizes=min_size_train,
                                   max_size=max_size_train, with_masks=(method == "full"))
    val_ds = data.CocoBoxDataset(paths["val_json"], paths["val_images"], train=False, min_sizes=(min_size_test,),
                                 max_size=max_size_test, with_masks=False)
    # a val image that cannot be opened stops the run now, not after training (every rank checks, so all stop)
    bad = val_ds.check_images()
    if bad:
        sys.exit(f"train.py: {len(bad)} val image(s) cannot be read, e.g. {bad[0]} — fix: replace the file(s) "
                 f"or remove them from {paths['val_json']}")
    if num_classes == 0:
        num_classes = train_ds.num_classes
    config.update(num_classes=num_classes, **paths)
    train_loader = data.make_loader(train_ds, batch_size, train=True, num_workers=num_workers, distributed=ddp, seed=seed,
                                    scale_per_batch=scale_per_batch, group_by_aspect=group_by_aspect,
                                    pin_memory=device_type == "cuda")

    # model, optimizer
    model = build_model(config).to(dev)
    if solver == "adamw":
        # fused: one kernel for all parameters instead of ~10 ops per tensor (3x faster on CPU, BENCHMARKS.md D4)
        optimizer = torch.optim.AdamW(param_groups(model), lr=lr, fused=True)
    elif solver == "sgd":
        optimizer = torch.optim.SGD(param_groups(model), lr=lr, momentum=momentum)
    else:
        sys.exit(f"train.py: --solver={solver!r} is not a solver — fix: --solver=sgd or --solver=adamw")
    sim_state = sim.SIMState(config, dev, rank) if method == "sim" else None  # teacher, prototypes, bank
    start_iter = 0
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if resume:
        if not os.path.isfile(ckpt_path):
            sys.exit(f"train.py: --resume given but {ckpt_path} does not exist — fix: drop --resume or set --out_dir")
        ckpt = load_checkpoint(ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_iter = ckpt["iter"]
        own = ckpt.get("rank_state") if rank == 0 else load_rank_state(ckpt_path, rank)
        if sim_state is not None:
            sim_state.load_state_dict((own or ckpt)["sim"], model)
        if own is not None:
            set_rank_state(own, scaler, dev)
        if master:
            exact = "" if own is not None else " (a checkpoint without RNG states: not an exact continuation)"
            print(f"resumed from {ckpt_path} at iteration {start_iter}{exact}")
    # the data from iteration start_iter on, as an uninterrupted run would have drawn it
    batches = data.infinite(train_loader, start_iter * accum_steps)
    raw_model = model
    if ddp:
        # find_unused_parameters=False (the default, and the fast path): every trainable parameter must get a
        # gradient on every rank at every step, also on a rank whose batch has no positive (test_train.py
        # runs each config's network this way on 2 processes)
        model = DDP(model, device_ids=[dev.index] if device_type == "cuda" else None, find_unused_parameters=False)
    if master:
        os.makedirs(out_dir, exist_ok=True)
        print("config:", json.dumps(config))
        if method == "sim":
            print(f"sim_variant={sim_variant} set: {json.dumps(_preset)}")
        n_params = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
        print(f"{len(train_ds)} train / {len(val_ds)} val images, {num_classes} classes, {n_params / 1e6:.2f}M "
              f"trainable parameters, method={method}, device={dev}, world_size={world_size}")
        print(f"global batch {batch_size * world_size * accum_steps} ({batch_size} x {world_size} processes"
              f"{f' x {accum_steps} accumulated' if accum_steps > 1 else ''}), lr {lr}, {max_iters} iterations, "
              f"lr steps {lr_steps}" + (f" (linear scaling from the recipe's batch {reference_batch})" if linear_scaling else ""))

    written = [start_iter]  # the iteration of the newest checkpoint on disk

    def checkpoint(it):
        if it == written[0]:  # already on disk (the last iteration is also a ckpt_interval multiple)
            return
        if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
            print(f"warning: iteration {it}: non-finite weights, checkpoint NOT written (the previous one is kept)",
                  flush=True)
            return
        own = rank_state(sim_state, scaler, dev)
        if master:
            save_atomic({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "iter": it,
                         "config": config, "sim": own["sim"], "rank_state": own,
                         "categories": train_ds.categories}, ckpt_path)  # for predict.py
        else:  # each rank's own bank and random states, beside the master's checkpoint
            save_atomic({"iter": it, "rank_state": own}, rank_ckpt_path(ckpt_path, rank))
        written[0] = it

    # training loop
    # SIGTERM (a cluster's pre-emption, torchrun passing on a kill): finish the step, checkpoint, exit
    # the flag lives on the training device: NCCL all-reduces CUDA tensors only
    stop = torch.zeros(1, device=dev)
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.fill_(1))
    n_unreadable, n_nonfinite, last_unreadable, warned = 0, 0, "", set()
    viz_batch = None

    model.train()
    t0 = t_log = time.time()
    for it in range(start_iter, max_iters):
        for g in optimizer.param_groups:
            g["lr"] = get_lr(it)
        for m in range(accum_steps):
            images, targets = next(batches)
            for t in targets:  # files the dataset could not read, replaced by the next image (data.py)
                for p in t.pop("skipped", ()):
                    n_unreadable, last_unreadable = n_unreadable + 1, p
                    if p not in warned:  # one warning per file; later skips are only counted
                        warned.add(p)
                        print(f"warning: rank {rank}: cannot read {p}; skipped (counted, not warned again), the "
                              f"next image stands in", file=sys.stderr, flush=True)
            loss, logs = train_step(model, raw_model, optimizer, scaler, sim_state, images, targets, it, config, dev,
                                    autocast, (m, accum_steps))
            n_nonfinite += not torch.isfinite(loss).all()

        if master and ((it + 1) % log_interval == 0 or it + 1 == max_iters):
            dt = time.time() - t_log
            n_iters = (it + 1 - start_iter) % log_interval or log_interval
            ips = n_iters * batch_size * world_size * accum_steps / dt
            eta = (max_iters - it - 1) * dt / n_iters
            parts = " ".join(f"{k} {v.item():.3f}" for k, v in logs.items())
            mem = f" | peak mem {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GB" if device_type == "cuda" else ""
            print(f"iter {it + 1}/{max_iters} | loss {loss.item():.3f} | {parts} | lr {get_lr(it):.2e} | "
                  f"{ips:.1f} img/s | ETA {eta / 60:.1f} min{mem}", flush=True)
            if n_unreadable or n_nonfinite:
                print(skip_summary(n_unreadable, last_unreadable, n_nonfinite), flush=True)
            t_log = time.time()
        if ckpt_interval and (it + 1) % ckpt_interval == 0:
            checkpoint(it + 1)
        if master and viz_interval and (it + 1) % viz_interval == 0:  # the maps co-evolving with the model
            viz_batch = viz_batch or to_device(*data.collate([val_ds[i] for i in range(min(2, len(val_ds)))]), dev)
            viz.object_grids(raw_model, sim_state, config, *viz_batch, os.path.join(out_dir, "viz"), 2, f"it{it + 1}")
        if ddp:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # every rank stops at the same iteration
        if stop.item():
            checkpoint(it + 1)
            if master:
                print(f"SIGTERM: checkpoint at iteration {it + 1} in {ckpt_path}; continue with --resume", flush=True)
            if ddp:
                dist.destroy_process_group()
            sys.exit(143)
        if eval_interval and (it + 1) % eval_interval == 0 and it + 1 < max_iters:
            run_eval(raw_model, val_ds, dev, master, ddp, final=False)
            model.train()
    checkpoint(max_iters)
    if master:
        print(f"training done in {(time.time() - t0) / 60:.1f} min; checkpoint {ckpt_path}")
        print(skip_summary(n_unreadable, last_unreadable, n_nonfinite, train_ds.skipped), flush=True)
    run_eval(raw_model, val_ds, dev, master, ddp, final=True)
    if master and sim_state is not None and sim_state.teacher is not None:
        images, targets = to_device(*data.collate([train_ds[i] for i in range(4)]), dev)
        paths = viz.object_grids(raw_model, sim_state, config, images, targets, out_dir, n=4, prefix="pseudo")
        print(f"{len(paths)} pseudo-mask grids (M_S, M_I, M_C, M_prob, M_hat, copy-paste) in {out_dir}/pseudo_*.png")
    if ddp:
        dist.destroy_process_group()


def skip_summary(n_unreadable, last_unreadable, n_nonfinite, at_load=None):
    """One line: what training skipped so far (and, at the end, what the dataset dropped at load)."""
    parts = [f"{n_unreadable} unreadable images replaced" + (f" (last: {last_unreadable})" if n_unreadable else ""),
             f"{n_nonfinite} non-finite steps skipped"]
    if at_load is not None:
        parts += [f"at load: {at_load['missing_files']} missing files, {at_load['no_box_images']} images without a "
                  f"valid box, {at_load['bad_boxes']} empty or out-of-image boxes, {at_load['crowd']} crowd annotations"]
    return "skipped: " + "; ".join(parts)


def run_eval(raw_model, val_ds, dev, master, ddp, final):
    """COCO box and mask AP on the val split: every process predicts its shard, the master
    gathers and scores them; at the end also metrics.json and PNG overlays."""
    import eval as evaluation  # the module, not the builtin
    loader = data.make_loader(val_ds, batch_size, train=False, num_workers=num_workers, distributed=ddp,
                              pin_memory=dev.type == "cuda")
    # the training's autocast dtype: predictions as the network was trained
    metrics = evaluation.evaluate(raw_model, loader, val_ds, dev, out_dir=out_dir if final and master else None,
                                  amp=amp and dev.type == "cuda", distributed=ddp,
                                  amp_dtype=torch.bfloat16 if amp_dtype == "bfloat16" else torch.float16)
    if master and final:
        data.write_json_atomic(metrics, os.path.join(out_dir, "metrics.json"), indent=1)
        paths = viz.save_overlays(raw_model, val_ds, dev, out_dir, n=n_overlays)
        print(f"box AP {metrics['bbox']['AP']:.1f} | mask AP {metrics['segm']['AP']:.1f} | "
              f"{len(paths)} pictures in {out_dir}/ | metrics in {out_dir}/metrics.json")
    # no barrier: the other ranks go on (to their next step's collectives, or to exit after the final
    # evaluation) and wait there while rank 0 scores; dist_timeout_min covers that wait


if __name__ == "__main__":
    try:
        main()
    except data.DataError as e:  # bad input: one clear line, not a traceback from a worker process
        sys.exit(f"train.py: {str(e).strip().splitlines()[-1].removeprefix('data.DataError: ')}")
