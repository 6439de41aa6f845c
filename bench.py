"""
Step-time benchmark: BoxInst vs SIM training steps in ONE process, on the same batches, so the
ratio is meaningful on a noisy machine. Runs train.py's own train_step (nanoGPT's bench.py idea).

    python bench.py                          # the demo model on the embedded dataset, CPU
    python bench.py --device=cuda --steps=20 # any train.py setting can be overridden
    python bench.py --compare=scale          # BoxInst steps, one training scale per image vs per batch

Prints the median step time of each method over interleaved rounds and the SIM / BoxInst ratio.
SIM runs with everything its preset switches on from the first step (teacher, pseudo masks,
prototype update; with paste_prob > 0 also a full memory bank and copy-paste). The batches draw their training scales
as train.py's loader does (scale_per_batch); --compare=scale times BoxInst on batches drawn both
ways (the same images), the padding that a scale per image costs.
"""

import statistics
import sys
import time

import torch

import data
import sim
import train
from model import build_model

steps = 5       # timed steps per round and method
compare = "method"  # "method": BoxInst vs SIM; "scale": BoxInst with a scale per image vs per batch
rounds = 4      # rounds, alternating the methods
warmup = 2      # untimed steps per method first


def main(argv):
    cfg = dict(train.config, steps=steps, rounds=rounds, warmup=warmup, compare=compare)
    train.configure(argv, cfg)
    dev = torch.device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    paths = train.dataset_paths() if not cfg["train_json"] else cfg
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


if __name__ == "__main__":
    main(sys.argv[1:])
