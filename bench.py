"""
Step-time benchmark: BoxInst vs SIM training steps in ONE process, on the same batches, so the
ratio is meaningful on a noisy machine. Runs the step train.py runs, step.train_step (nanoGPT's
bench.py idea).

    python bench.py                          # the demo model on the embedded dataset, CPU
    python bench.py --device=cuda --steps=20 # any config.py setting can be overridden
    python bench.py --compare=scale          # BoxInst steps, one training scale per image vs per batch
    python bench.py --compare=arch           # SIM steps (--method=boxinst: BoxInst's) on CondInst vs Mask2Former
    python bench.py --compare=torchvision    # ResNet-50-FPN at 512 px: torchvision's FCOS vs nanoSIM
    python bench.py --compare=eval           # a COCO run's end: 5k val images x 100 detections, gather + COCOeval
    python bench.py --compare=syncs          # the host-device sync points of one SIM step, by source line
    python bench.py --compare=index          # data.py's index on a COCO-sized json: start-up, memory, workers
    python bench.py --compare=host           # the SIM step without its networks at COCO scale, vs commit 3983ddd
    python bench.py --profile=True           # and the top operators of a SIM step (torch.profiler)
                                             # (with --compare=torchvision: of every variant's step)

Prints the median step time of each method over interleaved rounds and the SIM / BoxInst ratio.
SIM runs with everything its preset switches on from the first step (teacher, pseudo masks,
prototype update; with paste_prob > 0 also a full memory bank and copy-paste). The batches draw their training scales
as train.py's loader does (scale_per_batch); --compare=scale times BoxInst on batches drawn both
ways (the same images), the padding that a scale per image costs.

--compare=torchvision: the framework a user would otherwise pick, on the same inputs in one process,
interleaved: batch 2 x 3 x 512 x 512, 3 boxes per image, 80 classes, ResNet-50-FPN from random init
(BatchNorm trainable, as torchvision builds it without weights), SGD. torchvision's fcos_resnet50_fpn
training step and 1-image inference against nanoSIM's BoxInst, SIM and full (CondInst, GT masks) steps
and inference (as eval.py runs it: BatchNorms folded, model.fold_batchnorm); each ratio is paired
per round (paired_ratio). torchvision's FCOS does less work (no mask branch, no controller, no
teacher; the table counts the convolutions' work, conv_gmacs, and the time each step spends in the
kernel, mostly faulting in the pages glibc gave back after the last step). Peak memory: CUDA's
allocator peak per variant; on the CPU the peak resident size of a child process that runs only that
variant (2 steps).
"""

import random
import resource
import statistics
import sys
import time

import torch

import config
import configurator
import data
import sim
import step
from model import build_model, fold_batchnorm, refold

steps = 5       # timed steps per round and method
profile = False  # also print torch.profiler's top ops of the SIM steps (--profile=True)
compare = "method"  # "method": BoxInst vs SIM; "scale": BoxInst with a scale per image vs per batch; "arch":
                    # CondInst vs Mask2Former (the --method's step; the Mask2Former of configs/demo_m2f.py)
rounds = 4      # rounds, alternating the methods
warmup = 2      # untimed steps per method first


# -----------------------------------------------------------------------------
# --compare=torchvision

TV_SIZE, TV_BATCH, TV_BOXES, TV_CLASSES = 512, 2, 3, 80


def tv_inputs(dev, seed=0):
    """The shared inputs: uint8 images (B, 3, S, S), targets in nanoSIM's format (boxes, labels, box masks)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (TV_BATCH, 3, TV_SIZE, TV_SIZE), generator=g, dtype=torch.uint8)
    targets = []
    for _ in range(TV_BATCH):
        xy = torch.rand(TV_BOXES, 2, generator=g) * TV_SIZE * 0.6
        wh = 32 + torch.rand(TV_BOXES, 2, generator=g) * TV_SIZE * 0.35
        boxes = torch.cat([xy, (xy + wh).clamp(max=TV_SIZE)], 1)
        masks = torch.zeros(TV_BOXES, TV_SIZE, TV_SIZE, dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            masks[k, y0:y1, x0:x1] = 1
        targets.append(dict(boxes=boxes, labels=torch.randint(TV_CLASSES, (TV_BOXES,), generator=g), masks=masks,
                            size=(TV_SIZE, TV_SIZE), orig_size=(TV_SIZE, TV_SIZE), image_id=len(targets)))
    return data.to_device(images, targets, dev)


def tv_variants(base, dev, only=None):
    """name -> (train step closure, inference closure) for torchvision FCOS and nanoSIM's methods (only: that one)."""
    import torchvision
    images, targets = tv_inputs(dev)
    out = {}
    if only not in (None, "torchvision FCOS"):
        return {only: _nanosim_variant(base, dev, only, images, targets)}
    tv = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=TV_CLASSES,
                                                        min_size=TV_SIZE, max_size=TV_SIZE, score_thresh=0.05).to(dev)
    tv_opt = torch.optim.SGD(tv.parameters(), lr=1e-4, momentum=0.9)
    tv_images = [im.float() / 255 for im in images]
    tv_targets = [dict(boxes=t["boxes"], labels=t["labels"]) for t in targets]

    def tv_step():
        tv.train()
        loss = sum(tv(tv_images, tv_targets).values())
        loss.backward()
        tv_opt.step()
        tv_opt.zero_grad(set_to_none=True)
        return loss

    def tv_infer():
        tv.eval()
        with torch.no_grad():
            return tv(tv_images[:1])
    out["torchvision FCOS"] = (tv_step, tv_infer)
    if only is None:
        for name in NANOSIM_VARIANTS:
            out[name] = _nanosim_variant(base, dev, name, images, targets)
    return out


NANOSIM_VARIANTS = {"nanoSIM BoxInst": "boxinst", "nanoSIM SIM": "sim", "nanoSIM full": "full"}


def _nanosim_variant(base, dev, name, images, targets):
    """nanoSIM at torchvision FCOS's size: ResNet-50, 256-channel FPN and 4-conv head, masks at stride 4."""
    method = NANOSIM_VARIANTS[name]
    cfg = dict(base, method=method, backbone="resnet50", pretrained="", backbone_norm="bn", freeze_at=0,
               fpn_channels=256, head_convs=4, mask_branch_channels=128, mask_branch_convs=4,
               mask_out_stride=4, sizes_of_interest=(64, 128, 256, 512), num_classes=TV_CLASSES,
               channels_last=dev.type == "cpu", teacher_start_iter=0, sim_start_iter=0, bank_size=2,
               bank_thresh=-1.0, min_size_test=TV_SIZE, max_size_test=TV_SIZE)
    torch.manual_seed(0)
    model = build_model(cfg).to(dev).train()
    opt = torch.optim.SGD(step.param_groups(model, cfg["weight_decay"]), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(dev.type, enabled=False)
    state = sim.SIMState(cfg, dev) if method == "sim" else None
    autocast = lambda: torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cfg["amp"] and dev.type == "cuda")
    it = [0]

    def train_one():
        loss, _ = step.train_step(model, model, opt, scaler, state, images, targets, it[0], cfg, dev, autocast)
        it[0] += 1
        return loss

    twin, pairs = fold_batchnorm(model)  # what eval.py and predict.py run: the BatchNorms folded

    def infer():
        refold(pairs)  # the weights moved since the last inference: timed with it
        with torch.no_grad(), autocast():
            return twin.predict(images[:1], targets[:1])
    return train_one, infer


def conv_gmacs(fn):
    """Multiply-accumulates (x 1e9) of every nn.Conv2d forward that fn() runs, in whatever network (SIM's
    step: the student's forward and the teacher's): out.numel() * in_channels / groups * kh * kw each. The
    work the convolutions are asked to do, which no machine's mood changes; backward passes not counted."""
    total = [0]

    def count(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            total[0] += output.numel() * module.in_channels // module.groups * kh * kw
    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        fn()
    finally:
        handle.remove()
    return total[0] / 1e9


def op_profile(fns, steps, dev, rows=15):
    """torch.profiler's self time per call (ms) of the top operators of each fn (name -> fn), side by side,
    with the sum over the convolutions (forward and backward: every operator whose name says conv) and over
    all operators."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    cuda = dev.type == "cuda"
    per = {}
    for name, fn in fns.items():
        with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as p:
            for _ in range(steps):
                fn()
        per[name] = {e.key: (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1000 / steps
                     for e in p.key_averages()}
    top = sorted(set().union(*per.values()), key=lambda k: -max(v.get(k, 0.0) for v in per.values()))[:rows]
    conv = {n: sum(t for k, t in v.items() if "conv" in k.lower()) for n, v in per.items()}
    lines = ["| operator, self ms per call | " + " | ".join(per) + " |", "|---" * (len(per) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(f"{per[n].get(k, 0.0):.1f}" for n in per) + " |" for k in top]
    lines.append("| convolutions (every conv operator) | " + " | ".join(f"{conv[n]:.1f}" for n in per) + " |")
    lines.append("| all operators | " + " | ".join(f"{sum(per[n].values()):.1f}" for n in per) + " |")
    return "\n".join(lines)


def peak_memory_child(name, argv):
    """Peak resident memory (MB) of a child process running only variant `name` (CPU): its VmHWM (Linux;
    getrusage's maxrss would include the parent's pages at the fork)."""
    import subprocess
    code = ("import sys, bench, config, configurator; bench.TV_SIZE = int(sys.argv[2]); "
            "cfg = dict(config.defaults(), steps=1, rounds=1, warmup=1, compare='torchvision'); "
            "configurator.configure_run(sys.argv[3:], cfg, 'bench.py'); "
            "import torch; torch.manual_seed(0); v = bench.tv_variants(cfg, torch.device('cpu'), sys.argv[1])[sys.argv[1]]; "
            "[v[0]() for _ in range(2)]; v[1](); "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    r = subprocess.run([sys.executable, "-c", code, name, str(TV_SIZE), *argv], capture_output=True, text=True,
                       cwd=__import__("os").path.dirname(__import__("os").path.abspath(__file__)))
    return int(r.stdout.strip().splitlines()[-1]) / 1024 if r.returncode == 0 else float("nan")


def paired_ratio(rounds, ref_rounds):
    """Each round's median time against the reference's median in the same round, then the median over
    rounds: on a machine whose speed drifts (this CPU: +-30% within the hour) a slow round slows both
    sides alike, where a ratio of pooled medians would mix a fast round of one with a slow one of the other."""
    return statistics.median(statistics.median(a) / statistics.median(b) for a, b in zip(rounds, ref_rounds))


def compare_torchvision(cfg, argv):
    dev = torch.device(cfg["device"])
    variants = tv_variants(cfg, dev)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)

    def timed(fn, n, kernel=None):
        """n wall times of fn(); kernel (a list): also each call's system CPU time (s) and minor page faults."""
        ts = []
        for _ in range(n):
            sync()
            ru, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            r = fn()
            if torch.is_tensor(r):
                r.item()
            sync()
            ts.append(time.perf_counter() - t)
            if kernel is not None:
                ru2 = resource.getrusage(resource.RUSAGE_SELF)
                kernel.append((ru2.ru_stime - ru.ru_stime, ru2.ru_minflt - ru.ru_minflt))
        return ts
    gmacs = {}
    for name, (train_one, infer) in variants.items():  # warm-up (also fills SIM's bank), the first step counted
        gmacs[name] = (conv_gmacs(train_one), conv_gmacs(infer))
        timed(train_one, cfg["warmup"])
        timed(infer, 1)
    st = {n: [] for n in variants}  # per round: that round's step times
    it = {n: [] for n in variants}
    kern = {n: [] for n in variants}  # per step: (system CPU seconds, minor page faults)
    peak = {}
    for r in range(cfg["rounds"]):
        for name in (variants if r % 2 == 0 else list(reversed(list(variants)))):
            train_one, infer = variants[name]
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            st[name].append(timed(train_one, cfg["steps"], kern[name]))
            it[name].append(timed(infer, cfg["steps"]))
            if dev.type == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated(dev) / 2 ** 20)
    if dev.type != "cuda":
        peak = {n: peak_memory_child(n, argv) for n in variants}
    med = lambda rounds: statistics.median(sum(rounds, [])) * 1000
    print(f"device {dev} | batch {TV_BATCH} x 3 x {TV_SIZE} x {TV_SIZE}, {TV_BOXES} boxes per image, {TV_CLASSES} "
          f"classes, ResNet-50-FPN, random init | {cfg['rounds']} rounds x {cfg['steps']} | torch {torch.__version__}")
    print("| variant | train step (ms) | 1-image inference (ms) | peak memory (MB) | conv GMAC: step's forwards, "
          "inference | kernel CPU per step (ms), page faults (k) |")
    print("|---|---|---|---|---|---|")
    for n in variants:
        sys_ms, faults = (statistics.median(x) for x in zip(*kern[n]))
        print(f"| {n} | {med(st[n]):.0f} | {med(it[n]):.0f} | {peak[n]:.0f} | {gmacs[n][0]:.1f}, {gmacs[n][1]:.1f} | "
              f"{sys_ms * 1000:.0f}, {faults / 1000:.0f} |")
    for n in ("nanoSIM BoxInst", "nanoSIM SIM", "nanoSIM full"):
        print(f"{n} / torchvision FCOS: train step {paired_ratio(st[n], st['torchvision FCOS']):.2f}x, "
              f"inference {paired_ratio(it[n], it['torchvision FCOS']):.2f}x")
    if cfg["profile"]:  # where each training step's time goes, by operator
        print(op_profile({n: variants[n][0] for n in variants}, cfg["steps"], dev))


# -----------------------------------------------------------------------------
# --compare=eval: the end of a COCO run, 5k val images x 100 detections (gather and COCOeval)

EVAL_IMAGES, EVAL_DETS, EVAL_GT, EVAL_HW = 5000, 100, 7, (480, 640)


def _eval_inputs(n_images, n_dets, n_gt, hw, seed=0):
    """A COCO-like val set and its detections: n_images of size hw with n_gt boxes each (polygon masks)
    and n_dets detections per image (jittered GT boxes and random ones, RLE masks as eval.py writes them)
    -> (gt json dict, [(image_id, [result dicts])] per image)."""
    from pycocotools import mask as mask_util
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    rect = lambda x0, y0, x1, y1: [x0, y0, x1, y0, x1, y1, x0, y1]
    gt = {"images": [], "annotations": [], "categories": [{"id": c + 1, "name": f"c{c + 1}"} for c in range(80)]}
    per_image = []
    for i in range(1, n_images + 1):
        gt["images"].append({"id": i, "file_name": f"{i}.jpg", "height": h, "width": w})
        wh = torch.rand(n_gt, 2, generator=g) * torch.tensor([w / 3, h / 3]) + 8                # (n_gt, 2)
        xy = torch.rand(n_gt, 2, generator=g) * (torch.tensor([w, h]) - wh)
        cls = torch.randint(1, 81, (n_gt,), generator=g)
        for (x0, y0), (bw, bh), c in zip(xy.tolist(), wh.tolist(), cls.tolist()):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": c,
                                      "bbox": [x0, y0, bw, bh], "area": bw * bh, "iscrowd": 0,
                                      "segmentation": [rect(x0, y0, x0 + bw, y0 + bh)]})
        k = torch.randint(n_gt, (n_dets,), generator=g)                                           # (n_dets,)
        jit = 1 + 0.3 * (torch.rand(n_dets, 2, generator=g) - 0.5)
        dwh = (wh[k] * jit).clamp(min=2)
        dxy = (xy[k] + wh[k] * 0.2 * (torch.rand(n_dets, 2, generator=g) - 0.5)).clamp(min=0)
        boxes = torch.cat([dxy, (dxy + dwh).minimum(torch.tensor([w - 1.0, h - 1.0]))], 1).tolist()
        rles = mask_util.frPyObjects([rect(*b) for b in boxes], h, w)
        scores = torch.rand(n_dets, generator=g).tolist()
        labels = torch.where(torch.rand(n_dets, generator=g) < 0.7, cls[k], torch.randint(1, 81, (n_dets,), generator=g))
        per_image.append((i, [{"image_id": i, "category_id": int(c), "score": s,
                               "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                               "segmentation": {"size": r["size"], "counts": r["counts"].decode()}}
                              for b, s, c, r in zip(boxes, scores, labels.tolist(), rles)]))
    return gt, per_image


def _gather_worker(rank, world, init, parts, queue):
    import torch.distributed as dist
    import eval as evaluation
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    dist.barrier()
    t0 = time.time()
    got = evaluation.gather_to_rank0(parts[rank])
    if rank == 0:
        queue.put((time.time() - t0, len(got)))
    dist.destroy_process_group()


def eval_cost(n_images=None, n_dets=None, world=2):
    """Prints the time to gather n_images x n_dets results to rank 0 over `world` gloo processes
    (eval.gather_to_rank0, pickled sizes) and COCOeval's time for bbox and segm (eval.coco_evaluate),
    on one thread: what ranks 1..N-1 wait for at the end of a run (train.py's dist_timeout_min)."""
    import contextlib, io, json, os, pickle, tempfile
    import torch.multiprocessing as mp
    from pycocotools.coco import COCO
    import eval as evaluation
    n_images, n_dets = n_images or EVAL_IMAGES, n_dets or EVAL_DETS
    t0 = time.time()
    gt, per_image = _eval_inputs(n_images, n_dets, EVAL_GT, EVAL_HW)
    print(f"eval inputs: {n_images} images, {len(gt['annotations'])} GT objects, {n_images * n_dets} detections "
          f"({time.time() - t0:.1f}s to make)")
    parts = [per_image[r::world] for r in range(world)]
    mb = sum(len(pickle.dumps(p)) for p in parts) / 2 ** 20
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_gather_worker, args=(r, world, f"file://{tmp}/rdzv", parts, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        gather_s, n = queue.get(timeout=600)
        for p in procs:
            p.join()
        gt_path = os.path.join(tmp, "gt.json")
        with open(gt_path, "w") as f:
            json.dump(gt, f)
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO(gt_path)
    assert n == n_images
    results = [r for _, res in per_image for r in res]
    times = {}
    for iou_type in ("bbox", "segm"):
        t0 = time.time()
        with contextlib.redirect_stdout(io.StringIO()):
            evaluation.coco_evaluate(coco_gt, results, iou_type, [i for i, _ in per_image])
        times[iou_type] = time.time() - t0
    print(f"gather to rank 0 ({world} gloo processes, {mb:.0f} MB pickled): {gather_s:.1f}s")
    print(f"COCOeval bbox: {times['bbox']:.1f}s | segm: {times['segm']:.1f}s | "
          f"rank 0 alone in all: {gather_s + sum(times.values()):.1f}s")


# -----------------------------------------------------------------------------
# --compare=syncs: the host-device synchronisations of one SIM step

# on the CPU, the calls that would wait for a GPU: a value read on the host, a data-dependent shape, a
# host-to-device copy of host data
SYNC_CALLS = {torch.Tensor.item: "item", torch.Tensor.tolist: "tolist", torch.Tensor.__bool__: "bool",
              torch.Tensor.__int__: "int", torch.Tensor.__float__: "float", torch.nonzero: "nonzero",
              torch.Tensor.nonzero: "nonzero", torch.unique: "unique", torch.Tensor.unique: "unique",
              torch.masked_select: "masked_select", torch.repeat_interleave: "repeat_interleave"}


# functions that only ever read host tensors (the memory bank and the copy-paste generator live on the
# CPU, copypaste.BANK_DEVICE): on a GPU their reads wait for nothing, so the CPU proxy leaves them out
HOST_ONLY = {"MemoryBank.sample", "MemoryBank.push", "sample_objects", "copy_paste_batch", "drawn_crops",
             "host_windows"}


def sync_points(fn, cuda=False, top=100):
    """Counts the host-device sync points of fn() -> (total, [(count, 'kind file:line')] most frequent first).
    On CUDA torch's own sync detector counts them (torch.cuda.set_sync_debug_mode); on the CPU a
    TorchFunctionMode counts the calls in SYNC_CALLS, boolean-mask indexing and torch.tensor(...,
    device=...) / new_tensor, attributed to the innermost nanoSIM source line: a proxy for a GPU run's
    syncs. The proxy takes the forms a GPU takes (colormap's nearest colour without the per-object
    counts) and leaves out the HOST_ONLY functions; it does not see copies to the host (.cpu(), .to):
    the bank's push makes one per image."""
    import collections, functools, os, traceback, warnings
    from torch.overrides import TorchFunctionMode
    import colormap
    here = os.path.dirname(os.path.abspath(__file__))
    where = collections.Counter()

    def site(kind):
        frames = [f for f in traceback.extract_stack()[:-2] if f.filename.startswith(here)]
        if frames and frames[-1].name in {n.split(".")[-1] for n in HOST_ONLY}:
            return
        where[f"{kind} {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else kind] += 1

    if cuda:  # torch warns at each synchronising CUDA call: counted where it was made
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            shown, warnings.showwarning = warnings.showwarning, lambda *a, **k: site("cuda-sync")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
                warnings.showwarning = shown
        return sum(where.values()), where.most_common(top)

    class Counting(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            kind = SYNC_CALLS.get(func)
            if func is torch.Tensor.__getitem__:
                index = args[1] if isinstance(args[1], tuple) else (args[1],)
                kind = "bool-index" if any(torch.is_tensor(i) and i.dtype == torch.bool for i in index) else None
            if (func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None
                    or func is torch.Tensor.new_tensor):
                kind = "host-to-device"
            if kind:
                site(kind)
            return func(*args, **kwargs)
    nearest = colormap._nearest_colour
    colormap._nearest_colour = functools.partial(nearest, per_object=False)  # the GPU's form
    try:
        with Counting():
            fn()
    finally:
        colormap._nearest_colour = nearest
    return sum(where.values()), where.most_common(top)


def sync_cost(cfg):
    """Prints the sync points of one SIM step (teacher, pseudo masks, copy-paste from a full bank) of the
    configured network on 2 images of the embedded data."""
    dev = torch.device(cfg["device"])
    paths = data.dataset_paths(cfg, need=("train_json", "train_images"))
    ds = data.CocoBoxDataset(paths["train_json"], paths["train_images"], train=True,
                             min_sizes=cfg["min_size_train"], max_size=cfg["max_size_train"])
    cfg.update(num_classes=ds.num_classes, method="sim", teacher_start_iter=0, sim_start_iter=0, paste_prob=1.0,
               bank_size=1, bank_thresh=0.0, bank_min_box_iou=0.0)
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])  # the dataset's scale and flip draws
    model = build_model(cfg).to(dev).train()
    opt = step.build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(dev.type, enabled=False)
    state = sim.SIMState(cfg, dev)
    images, targets = data.collate([ds[i] for i in range(2)])
    autocast = lambda: torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cfg["amp"] and dev.type == "cuda")
    run = lambda it: step.train_step(model, model, opt, scaler, state, images, targets, it, cfg, dev, autocast)
    for it in range(2):  # the teacher made, the bank filled
        run(it)
    n, top = sync_points(lambda: run(2), dev.type == "cuda")
    print(f"host-device sync points in one SIM step ({dev}, {sum(len(t['boxes']) for t in targets)} objects): {n}")
    for where, count in top:
        print(f"  {count:4d}  {where}")
    return n


# -----------------------------------------------------------------------------
# --compare=host: the SIM step's work outside the network, this tree against an older commit

HOST_SIZE = (800, 1333)        # each image's size: a COCO image at the reference's training scale
HOST_OBJECTS = (7, 30, 60)     # objects per image (COCO: 7.3 on average, a crowded image 30-60)
HOST_BATCH = 2                 # images per process, as the COCO configs
HOST_REPS = 5                  # timed steps per setting (after one untimed step)
HOST_OLD = "3983ddd"           # the commit timed beside this tree
HOST_OLD_TREE = "/tmp/old3983"  # its git worktree (made with `git worktree add` when missing)


def _host_setup(n_obj, paste, size, batch, seed=0):
    """Everything a SIM step reads, at COCO scale, with the network's outputs as random tensors of the
    network's shapes (R50-FPN, 80 classes, D = 16, mask logits at stride 4): the networks are what the
    other modes time; here only what surrounds them counts. Only APIs that 3983ddd has too, since
    host_timings runs on both trees (the settings: this tree's config.defaults() on both, each tree's
    sim.apply_preset setting its own nanosim knobs). paste: a full bank (entries of this batch's size, an elliptic
    pseudo mask in each box) and paste_prob 1, so every image is pasted on; else paste_prob 0 (no bank)."""
    import math
    import types
    import copypaste
    import model as model_lib
    g = torch.Generator().manual_seed(seed)
    h, w = size
    hp, wp = (-(-v // 32) * 32 for v in size)
    # smooth random images: colour statistics closer to a photo than white noise
    low = torch.rand(batch, 3, hp // 32 + 1, wp // 32 + 1, generator=g) * 255
    images = torch.nn.functional.interpolate(low, size=(hp, wp), mode="bilinear", align_corners=False).to(torch.uint8)
    images[:, :, h:], images[:, :, :, w:] = 0, 0
    cfg = dict(config.defaults(), method="sim", sim_variant="nanosim", num_classes=80, mask_out_stride=4,
               sizes_of_interest=(64, 128, 256, 512), bottom_pixels_removed=10, num_subcenters=10,
               topk_proposals_per_im=64, sim_start_iter=10, teacher_start_iter=0, device="cpu")
    sim.apply_preset(cfg)
    cfg.update(paste_prob=1.0 if paste else 0.0, bank_size=4)

    def boxes_of(n):  # COCO-like: sides log-uniform in 16..600 px, inside the image
        wh = torch.exp(torch.empty(n, 2).uniform_(math.log(16), math.log(600), generator=g))
        wh = torch.minimum(wh, torch.tensor([w - 1.0, h - 1.0]))
        xy = torch.rand(n, 2, generator=g) * (torch.tensor([w, h]) - wh)
        return torch.cat([xy, xy + wh], 1)
    targets = [dict(boxes=boxes_of(n_obj), labels=torch.randint(80, (n_obj,), generator=g), image_id=i,
                    size=(h, w), orig_size=(480, 800)) for i in range(batch)]
    state = sim.SIMState(cfg, torch.device("cpu"))
    if paste:
        s = cfg["mask_out_stride"]
        ys = torch.arange(hp // s)[:, None] * s + s // 2
        xs = torch.arange(wp // s)[None, :] * s + s // 2
        while not state.bank.full:
            b = boxes_of(n_obj)
            c, r = (b[:, :2] + b[:, 2:]) / 2, (b[:, 2:] - b[:, :2]) / 2
            inside = ((xs[None] - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2 + \
                     ((ys[None] - c[:, 1, None, None]) / r[:, 1, None, None]) ** 2 <= 1
            entry = copypaste.bank_entry_from_teacher(images[len(state.bank) % batch, :, :h, :w], b,
                                                      torch.randint(80, (n_obj,), generator=g), inside.float(),
                                                      size, cfg["bank_thresh"], s, 0.0)
            state.bank.push(**entry)
    strides = model_lib.CondInst.strides
    feat_sizes = [(-(-hp // st), -(-wp // st)) for st in strides]
    locations, loc_level = model_lib.compute_locations(feat_sizes, strides, torch.device("cpu"))
    L, hm, wm = len(locations), hp // 8, wp // 8

    def dense():  # a network's dense outputs: cls (B, L, C), reg (B, L, 4) in stride units, ctr (B, L), feats
        return dict(cls_logits=torch.randn(batch, L, 80, generator=g) - 4,
                    reg=torch.rand(batch, L, 4, generator=g) * 4 + 0.5, ctr_logits=torch.randn(batch, L, generator=g),
                    mask_feats=torch.randn(batch, 16, hm, wm, generator=g), locations=locations, loc_level=loc_level)
    out, t_out = dense(), dense()
    for k in ("cls_logits", "reg", "ctr_logits", "mask_feats"):
        out[k].requires_grad_(True)
    k_max = 64 * batch  # at most topk_proposals_per_im positives per image
    logits = torch.randn(k_max, 1, 2 * hm, 2 * wm, generator=g) * 3  # the student's
    t_logits = torch.randn(k_max, 1, 2 * hm, 2 * wm, generator=g) * 3  # the teacher's
    teacher = types.SimpleNamespace(strides=strides, mask_logits=lambda o, inst: t_logits[:len(inst["gt_inds"])])
    selector = types.SimpleNamespace(cfg=cfg, num_classes=80)  # select_instances reads only these
    return types.SimpleNamespace(cfg=cfg, images=images, targets=targets, state=state, out=out, t_out=t_out,
                                 logits=logits, teacher=teacher, selector=selector,
                                 gen=torch.Generator().manual_seed(1))


def _host_step(st, it=100, marks=None):
    """One SIM step without its networks, in train_step's order: copy-paste, FCOS targets and the positives
    (model.forward's no-grad part), sim.objects, sim.pseudo_masks, sim.sim_losses, every loss of
    compute_losses with its backward down to the (random) network outputs, sim.after_step without the
    teacher's EMA (the prototype update and the bank push). marks (a list): gets (stage, process_time())
    after each stage (HOST_STAGES; process CPU time)."""
    import copypaste
    import losses
    import model as model_lib
    from box_ops import box_mask_centers
    mark = (lambda name: marks.append((name, time.process_time()))) if marks is not None else (lambda name: None)
    cfg, images, targets = st.cfg, st.images, st.targets
    if cfg["paste_prob"] > 0:
        images, targets = copypaste.copy_paste_batch(images, targets, st.state.bank, cfg["paste_prob"], st.gen,
                                                     cfg["paste_max_objects"], cfg["paste_replacement"])
    mark("paste")
    out = dict(st.out)
    gt_boxes = [t["boxes"] for t in targets]
    with torch.no_grad():
        centers = [box_mask_centers(b, images.shape[-2:]) for b in gt_boxes]
        out["targets"] = losses.fcos_targets(out["locations"], out["loc_level"], model_lib.CondInst.strides, gt_boxes,
                                             [t["labels"] for t in targets], cfg["num_classes"],
                                             cfg["sizes_of_interest"], cfg["center_radius"], centers)
        out["targets"]["num_gts"] = torch.tensor([len(b) for b in gt_boxes])
        out["inst"] = model_lib.CondInst.select_instances(st.selector, out)
    out["mask_logits"] = st.logits[:len(out["inst"]["gt_inds"])].detach().requires_grad_(True)  # a leaf: the net's
    mark("fcos targets")
    obj = sim.objects(targets, images.shape[-2:], cfg["mask_out_stride"], cfg["occlusion_aware"],
                      images if cfg["color_weight"] > 0 else None)
    mark("objects")
    pm = sim.pseudo_masks(out, st.t_out, st.teacher, st.state.protos, obj, cfg)
    mark("pseudo masks")
    extra = sim.sim_losses(out, pm, obj, cfg)
    mark("sim losses")
    loss, _ = losses.compute_losses(out, images, targets, cfg, it, extra)
    mark("other losses")
    loss.backward()
    mark("backward")
    sim.after_step(st.state, None, out, pm, obj, images, targets, ema=False)
    mark("after_step")
    return loss


HOST_STAGES = ("paste", "fcos targets", "objects", "pseudo masks", "sim losses", "other losses", "backward",
               "after_step")
# the stages besides the losses: what SIM adds around the network (the losses and their backward are sums over
# the positives' full maps, the same work in any layout; their rows are printed too)
HOST_CORE = ("paste", "fcos targets", "objects", "pseudo masks", "after_step")


def host_timings(objects, size, batch, reps):
    """{(objects per image, paste): [median ms of the step, then of each of HOST_STAGES]} of _host_step on
    one thread, with whatever tree is first on sys.path (host_cost runs it in a child process per tree).
    CPU time of the process (time.process_time, user + system: the page faults of fresh allocations
    count): on one thread the wall time of an idle machine, and less inflated by other jobs on a shared
    one (this 2-core machine's wall times drift +-30% within the hour)."""
    torch.set_num_threads(1)
    res = {}
    for n in objects:
        for paste in (True, False):
            st = _host_setup(n, paste, size, batch)
            _host_step(st)  # untimed: first-call costs
            rows = []
            for _ in range(reps):
                for v in st.out.values():
                    if torch.is_tensor(v):
                        v.grad = None
                marks = [("start", time.process_time())]
                _host_step(st, marks=marks)
                t = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
                rows.append([sum(t)] + t)
            res[(n, paste)] = [statistics.median(c) * 1000 for c in zip(*rows)]
    return res


def _host_child(tree, objects, size, batch, reps):
    """host_timings in a fresh `python` whose imports come from `tree` (this file's code, that tree's modules).
    The modules this file imports that `tree` lacks (config.py and step.py came after HOST_OLD) come from
    this file's tree, searched last."""
    import os
    import subprocess
    code = ("import sys, importlib.util; sys.path.insert(0, sys.argv[1]); sys.path.append(sys.argv[2]); "
            "spec = importlib.util.spec_from_file_location('bench_host', sys.argv[3]); "
            "b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b); "
            "print(repr(b.host_timings(*eval(sys.argv[4]))))")
    args = repr((tuple(objects), tuple(size), batch, reps))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", code, tree, here, os.path.abspath(__file__), args], capture_output=True,
                       text=True, cwd=tree, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"host timing on {tree} failed:\n{r.stderr[-3000:]}")
    return eval(r.stdout.strip().splitlines()[-1])


def host_cost(objects=None, size=None, batch=None, reps=None, old_tree=None):
    """The SIM step's non-network work (_host_step) at COCO scale, one thread, copy-paste on and off, for this
    tree and for commit HOST_OLD (a git worktree at old_tree, added when missing), each in its own child
    process. Prints median ms and the old / new ratios of the host work (HOST_CORE) and of the whole
    step without its networks, then per stage; returns {(n, paste): (old, new)}, each [all, *stages]."""
    import os
    import subprocess
    objects, size = objects or HOST_OBJECTS, size or HOST_SIZE
    batch, reps, old_tree = batch or HOST_BATCH, reps or HOST_REPS, old_tree or HOST_OLD_TREE
    here = os.path.dirname(os.path.abspath(__file__))
    if not os.path.isdir(old_tree):
        subprocess.run(["git", "worktree", "add", "--detach", old_tree, HOST_OLD], cwd=here, check=True,
                       capture_output=True)
    old = _host_child(old_tree, objects, size, batch, reps)
    new = _host_child(here, objects, size, batch, reps)
    core = [HOST_STAGES.index(k) + 1 for k in HOST_CORE]
    host = lambda row: sum(row[i] for i in core)  # the step's host work (HOST_CORE), from the stage medians
    print(f"SIM step outside the network | {batch} x {size[0]}x{size[1]} | one thread | median of {reps} (CPU time) | "
          f"torch {torch.__version__} | old = {HOST_OLD} ({old_tree})")
    print(f"host work = {', '.join(HOST_CORE)}; all = the whole step without its networks (with every loss and "
          f"its backward), ms")
    print("| objects per image | copy-paste | host work: old | new | old / new | all: old | new | old / new |")
    print("|---|---|---|---|---|---|---|---|")
    for n in objects:
        for paste in (True, False):
            o, nw = old[(n, paste)], new[(n, paste)]
            print(f"| {n} | {'on' if paste else 'off'} | {host(o):.0f} | {host(nw):.0f} | {host(o) / host(nw):.2f}x | "
                  f"{o[0]:.0f} | {nw[0]:.0f} | {o[0] / nw[0]:.2f}x |")
    print("\nper stage, old -> new (median ms)")
    print("| objects, paste | " + " | ".join(HOST_STAGES) + " |")
    print("|---" * (len(HOST_STAGES) + 1) + "|")
    for n in objects:
        for paste in (True, False):
            o, nw = old[(n, paste)][1:], new[(n, paste)][1:]
            cells = " | ".join(f"{a:.0f} -> {b:.0f}" for a, b in zip(o, nw))
            print(f"| {n}, {'on' if paste else 'off'} | {cells} |")
    return {k: (old[k], new[k]) for k in new}


# -----------------------------------------------------------------------------
# --compare=grabcut: box-conditioned masks (predict.py --boxes) against OpenCV's GrabCut on the GT boxes

GRABCUT_ITERS = 5    # cv2.grabCut iterations
GRABCUT_GROW = 0.5   # GrabCut runs in a crop: the box grown by this share of its width/height on each side


def box_inside(box, H, W):
    """(H, W) bool numpy: pixel centres strictly inside the xyxy box (predict.py's cut to the box)."""
    import numpy as np
    xs, ys = np.arange(W) + 0.5, np.arange(H) + 0.5
    return (xs[None] > box[0]) & (xs[None] < box[2]) & (ys[:, None] > box[1]) & (ys[:, None] < box[3])


def grabcut_mask(image, box, iters=GRABCUT_ITERS, grow=GRABCUT_GROW):
    """OpenCV's GrabCut (Rother, Kolmogorov, Blake 2004: colour GMMs of object and surroundings and a graph
    cut, iterated) for one box: image (H, W, 3) uint8 RGB, box xyxy in pixels -> (H, W) bool, cut to the
    box. It runs in a crop around the box (grown by `grow` x its size on each side, within the image),
    initialised from the box's rectangle; where GrabCut cannot run (no pixel of the crop outside the
    rectangle, or too few for its GMMs) the box itself is the mask."""
    import math
    import cv2  # compare_grabcut checked that it is there
    import numpy as np
    H, W = image.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    gw, gh = grow * (x1 - x0), grow * (y1 - y0)
    cx0, cy0 = max(0, int(math.floor(x0 - gw))), max(0, int(math.floor(y0 - gh)))
    cx1, cy1 = min(W, int(math.ceil(x1 + gw))), min(H, int(math.ceil(y1 + gh)))
    crop = np.ascontiguousarray(image[cy0:cy1, cx0:cx1, ::-1])                       # BGR, as OpenCV reads
    rx0, ry0 = int(math.floor(x0)) - cx0, int(math.floor(y0)) - cy0
    rect = (rx0, ry0, max(1, int(math.ceil(x1)) - cx0 - rx0), max(1, int(math.ceil(y1)) - cy0 - ry0))
    label = np.zeros(crop.shape[:2], np.uint8)
    inside = box_inside(box, H, W)
    try:
        cv2.grabCut(crop, label, rect, np.zeros((1, 65)), np.zeros((1, 65)), iters, cv2.GC_INIT_WITH_RECT)
    except cv2.error:
        return inside
    out = np.zeros((H, W), bool)
    out[cy0:cy1, cx0:cx1] = (label == cv2.GC_FGD) | (label == cv2.GC_PR_FGD)
    return out & inside


def compare_grabcut(argv):
    """python bench.py --compare=grabcut [--ckpt=out/demo/ckpt.pt]: one table on the val split (the embedded
    one, or --val_json/--val_images/--data_root as train.py reads them) with every GT box given: mIoU
    (each box's mask against its own GT mask) and box-conditioned mask AP of the box itself as the mask,
    OpenCV's GrabCut in a crop around each box, the network's masks as they are (predict.py with every
    refinement switch off), each switch alone, every switch (predict.py's defaults), every switch but
    one, and the EMA teacher's weights (SIM checkpoints). The box and GrabCut have no confidence: score 1
    for every mask (their AP is in the json's order). Also the seconds per image of each row (this
    process's threads, the network's forward included)."""
    try:
        import cv2
    except ImportError:
        raise SystemExit("bench.py --compare=grabcut needs OpenCV — fix: .venv/bin/pip install opencv-python-headless")
    import contextlib
    import io
    import predict
    switches = ("box_flip", "box_colour", "box_crf", "box_mask_score")
    cfg = dict(config.defaults(), compare="grabcut", ckpt="out/demo/ckpt.pt", grabcut_iters=GRABCUT_ITERS,
               grabcut_grow=GRABCUT_GROW)
    cfg.update({k: getattr(predict, k) for k in ("device", "batch_size", "combine", "mu") + tuple(predict.RAW)},
               n_overlays=0)
    configurator.configure(argv, cfg, "bench.py")
    paths = ({k: cfg[k] for k in ("val_json", "val_images")} if cfg["val_json"]
             else data.dataset_paths(cfg, need=("val_json", "val_images")))
    dev = torch.device(cfg["device"])
    cv2.setRNGSeed(0)
    model, mcfg, cats = predict.load_model(cfg["ckpt"], dev)
    ds = data.CocoBoxDataset(paths["val_json"], paths["val_images"], train=False, min_sizes=(mcfg["min_size_test"],),
                             max_size=mcfg["max_size_test"], with_masks=False)
    rows = []  # (name, seg {annotation id: (rle, area, score)}, seconds)

    def classical(name, mask_fn):
        seg, t0 = {}, time.perf_counter()
        for i in range(len(ds)):
            rec = ds.record(i)
            image = predict.read_rgb(rec["path"]).permute(1, 2, 0).numpy()               # (H, W, 3)
            for a, box in zip(ds.annotations(i), rec["boxes"]):
                m = mask_fn(image, box)
                seg[a["id"]] = (predict.to_rle(torch.from_numpy(m)), int(m.sum()), 1.0)
        rows.append((name, seg, time.perf_counter() - t0))

    def network(name, net, **sw):
        t0 = time.perf_counter()
        seg = predict.dataset_box_masks(net, ds, dev, dict(cfg, **sw))[0]
        rows.append((name, seg, time.perf_counter() - t0))

    classical("the box as the mask", lambda image, box: box_inside(box, *image.shape[:2]))
    classical(f"GrabCut ({cfg['grabcut_iters']} iterations, crop grown by {cfg['grabcut_grow']})",
              lambda image, box: grabcut_mask(image, box, cfg["grabcut_iters"], cfg["grabcut_grow"]))
    off = {k: False for k in switches}
    network("network (every switch off)", model, **off)
    for k in switches:
        network(f"network + {k}", model, **dict(off, **{k: True}))
    on = {k: True for k in switches}
    network("network + every switch", model, **on)
    for k in switches:
        network(f"every switch but {k}", model, **dict(on, **{k: False}))
    network("every switch, colour_seeds=network", model, **dict(on, colour_seeds="network"))
    if (predict.load_checkpoint(cfg["ckpt"]).get("sim") or {}).get("teacher") is not None:
        teacher = predict.load_model(cfg["ckpt"], dev, teacher=True)[0]
        network("EMA teacher (every switch off)", teacher, **off)
        network("EMA teacher + every switch", teacher, **on)
    print(f"box-conditioned masks on {paths['val_json']} ({len(ds)} images, GT boxes in) | {cfg['ckpt']} | "
          f"combine={cfg['combine']} | {torch.get_num_threads()} thread(s), {dev}")
    print("| masks from the GT boxes | mIoU | mask AP | AP50 | AP75 | s / image |")
    print("|---|---|---|---|---|---|")
    for name, seg, sec in rows:
        with contextlib.redirect_stdout(io.StringIO()):  # COCOeval's 12 lines per row
            stats, miou, _ = predict.score_box_masks(ds.coco, seg, ds.ids)
        print(f"| {name} | {miou:.1f} | {stats['AP']:.1f} | {stats['AP50']:.1f} | {stats['AP75']:.1f} | "
              f"{sec / len(ds):.3f} |")
    return 0


def main(argv):
    if "--compare=grabcut" in argv:
        return compare_grabcut(argv)
    cfg = dict(config.defaults(), steps=steps, rounds=rounds, warmup=warmup, compare=compare, profile=profile)
    configurator.configure_run(argv, cfg, "bench.py")
    if cfg["compare"] == "eval":
        return eval_cost()
    if cfg["compare"] == "syncs":
        return sync_cost(cfg)
    if cfg["compare"] == "index":
        return index_cost()
    if cfg["compare"] == "host":
        return host_cost()
    if cfg["compare"] == "torchvision":
        return compare_torchvision(cfg, [a for a in argv if not a.startswith(("--compare", "--profile"))])
    dev = torch.device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    paths = data.dataset_paths(cfg, need=("train_json", "train_images"))
    ds = data.CocoBoxDataset(paths["train_json"], paths["train_images"], train=True,
                             min_sizes=cfg["min_size_train"], max_size=cfg["max_size_train"])
    cfg.update(num_classes=ds.num_classes, teacher_start_iter=0, sim_start_iter=0)
    # the same fixed batches for both methods
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(ds), generator=g).tolist()
    n = cfg["batch_size"]
    scales = torch.randint(len(ds.min_sizes), (cfg["steps"], n), generator=g)  # (steps, n): scale per image

    def make_batches(per_batch):
        return [data.collate([ds[(i, ds.min_sizes[scales[k, 0 if per_batch else j]])]
                              for j, i in enumerate(idx[k * n:(k + 1) * n])]) for k in range(cfg["steps"])]
    use_amp = cfg["amp"] and dev.type == "cuda"
    autocast = lambda: torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp)

    # name: (config changes: the method, the architecture, batches); the model, optimizer and SIM state are
    # made below; ratio: (numerator, denominator, label) of the line printed at the end
    if cfg["compare"] == "scale":
        variants = {"scale per image": (dict(method="boxinst"), make_batches(False)),
                    "scale per batch": (dict(method="boxinst"), make_batches(True))}
        ratio = ("scale per image", "scale per batch", "per image / per batch")
    elif cfg["compare"] == "arch":  # the demo's widths of each (config.py's Mask2Former group is the demo's)
        batches = make_batches(cfg["scale_per_batch"])
        variants = {"condinst": (dict(arch="condinst"), batches),
                    "mask2former": (dict(arch="mask2former", clip_grad=0.01), batches)}  # clipped as demo_m2f.py
        ratio = ("mask2former", "condinst", f"Mask2Former / CondInst ({cfg['method']})")
    else:
        batches = make_batches(cfg["scale_per_batch"])
        variants = {"boxinst": (dict(method="boxinst"), batches), "sim": (dict(method="sim"), batches)}
        ratio = ("sim", "boxinst", "SIM / BoxInst")
    runners = {}
    for name, (changes, batches) in variants.items():
        mcfg = dict(cfg, **changes)
        method = mcfg["method"]
        torch.manual_seed(cfg["seed"])
        model = build_model(mcfg).to(dev).train()
        opt = torch.optim.SGD(step.param_groups(model, mcfg["weight_decay"]), lr=1e-4, momentum=0.9)
        scaler = torch.amp.GradScaler(dev.type, enabled=False)
        state = None
        if method == "sim":
            # bank_thresh -1: every in-box pixel is a pseudo-mask pixel, so the bank fills at once
            mcfg.update(bank_size=len(batches) * n, bank_thresh=-1.0)
            state = sim.SIMState(mcfg, dev)
        runners[name] = (model, opt, scaler, state, mcfg, batches)

    def run(name, n_steps, it0):
        model, opt, scaler, state, mcfg, batches = runners[name]
        times = []
        for k in range(n_steps):
            images, targets = batches[k % len(batches)]
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            loss, _ = step.train_step(model, model, opt, scaler, state, images, targets, it0 + k, mcfg, dev, autocast)
            loss.item()  # wait for the step to finish
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return times

    for name in runners:  # warm-up; also fills SIM's bank
        run(name, max(cfg["warmup"], cfg["steps"]), 0)
    assert all(r[3] is None or r[3].bank.full or r[4]["paste_prob"] == 0 for r in runners.values())
    times = {m: [] for m in runners}
    for r in range(cfg["rounds"]):
        for name in (runners if r % 2 == 0 else reversed(list(runners))):
            times[name] += run(name, cfg["steps"], 100 + r * cfg["steps"])
    med = {m: statistics.median(t) for m, t in times.items()}
    print(f"device {dev} | batch {n} | {cfg['rounds']} rounds x {cfg['steps']} steps | torch {torch.__version__}")
    for m, t in med.items():
        pixels = sum(b[0].shape[-2] * b[0].shape[-1] for b in runners[m][5]) / len(runners[m][5])
        print(f"{m:16s} median step {t * 1000:8.1f} ms | padded batch {pixels:.0f} pixels per image")
    num, den, label = ratio
    print(f"{label} step time: {med[num] / med[den]:.2f}x")
    if cfg["profile"] and "sim" in runners:  # where a SIM step's time goes, by operator (self time)
        from torch.profiler import ProfilerActivity, profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])) as p:
            run("sim", cfg["steps"], 1000)
        key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        print(p.key_averages().table(sort_by=key, row_limit=15))


if __name__ == "__main__":
    main(sys.argv[1:])
