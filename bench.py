"""
Step-time benchmark: BoxInst vs SIM training steps in ONE process, on the same batches, so the
ratio is meaningful on a noisy machine. Runs train.py's own train_step (nanoGPT's bench.py idea).

    python bench.py                          # the demo model on the embedded dataset, CPU
    python bench.py --device=cuda --steps=20 # any train.py setting can be overridden
    python bench.py --compare=scale          # BoxInst steps, one training scale per image vs per batch
    python bench.py --compare=torchvision    # ResNet-50-FPN at 512 px: torchvision's FCOS vs nanoSIM
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

import resource
import statistics
import sys
import time

import torch

import data
import sim
import train
from model import build_model, fold_batchnorm, refold

steps = 5       # timed steps per round and method
profile = False  # also print torch.profiler's top ops of the SIM steps (--profile=True)
compare = "method"  # "method": BoxInst vs SIM; "scale": BoxInst with a scale per image vs per batch
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
    return train.to_device(images, targets, dev)


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
               fpn_channels=256, head_channels=256, head_convs=4, mask_branch_channels=128, mask_branch_convs=4,
               mask_out_stride=4, sizes_of_interest=(64, 128, 256, 512), num_classes=TV_CLASSES,
               channels_last=dev.type == "cpu", teacher_start_iter=0, sim_start_iter=0, bank_size=2,
               bank_thresh=-1.0, min_size_test=TV_SIZE, max_size_test=TV_SIZE)
    torch.manual_seed(0)
    model = build_model(cfg).to(dev).train()
    opt = torch.optim.SGD(train.param_groups(model), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(dev.type, enabled=False)
    state = sim.SIMState(cfg, dev) if method == "sim" else None
    autocast = lambda: torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cfg["amp"] and dev.type == "cuda")
    it = [0]

    def step():
        loss, _ = train.train_step(model, model, opt, scaler, state, images, targets, it[0], cfg, dev, autocast)
        it[0] += 1
        return loss

    twin, pairs = fold_batchnorm(model)  # what eval.py and predict.py run: the BatchNorms folded

    def infer():
        refold(pairs)  # the weights moved since the last inference: timed with it
        with torch.no_grad(), autocast():
            return twin.predict(images[:1], targets[:1])
    return step, infer


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
    code = ("import sys, bench, train; bench.TV_SIZE = int(sys.argv[2]); "
            "cfg = dict(train.config, steps=1, rounds=1, warmup=1, compare='torchvision'); "
            "train.configure(sys.argv[3:], cfg); "
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
    for name, (step, infer) in variants.items():  # warm-up (also fills SIM's bank), the first step counted
        gmacs[name] = (conv_gmacs(step), conv_gmacs(infer))
        timed(step, cfg["warmup"])
        timed(infer, 1)
    st = {n: [] for n in variants}  # per round: that round's step times
    it = {n: [] for n in variants}
    kern = {n: [] for n in variants}  # per step: (system CPU seconds, minor page faults)
    peak = {}
    for r in range(cfg["rounds"]):
        for name in (variants if r % 2 == 0 else list(reversed(list(variants)))):
            step, infer = variants[name]
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            st[name].append(timed(step, cfg["steps"], kern[name]))
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


def main(argv):
    cfg = dict(train.config, steps=steps, rounds=rounds, warmup=warmup, compare=compare, profile=profile)
    train.configure(argv, cfg)
    if cfg["compare"] == "torchvision":
        return compare_torchvision(cfg, [a for a in argv if not a.startswith(("--compare", "--profile"))])
    dev = torch.device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    paths = train.dataset_paths(cfg, need=("train_json", "train_images"))
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

    # name: (train.py method, batches); the model, optimizer and SIM state are made below
    # ratio: (numerator, denominator, label) of the line printed at the end
    if cfg["compare"] == "scale":
        variants = {"scale per image": ("boxinst", make_batches(False)), "scale per batch": ("boxinst", make_batches(True))}
        ratio = ("scale per image", "scale per batch", "per image / per batch")
    else:
        batches = make_batches(cfg["scale_per_batch"])
        variants = {"boxinst": ("boxinst", batches), "sim": ("sim", batches)}
        ratio = ("sim", "boxinst", "SIM / BoxInst")
    runners = {}
    for name, (method, batches) in variants.items():
        mcfg = dict(cfg, method=method)
        torch.manual_seed(cfg["seed"])
        model = build_model(mcfg).to(dev).train()
        opt = torch.optim.SGD(train.param_groups(model), lr=1e-4, momentum=0.9)
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
            loss, _ = train.train_step(model, model, opt, scaler, state, images, targets, it0 + k, mcfg, dev, autocast)
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
