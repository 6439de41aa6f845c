"""
Step-time benchmark: BoxInst vs SIM training steps in ONE process, on the same batches, so the
ratio is meaningful on a noisy machine. Runs train.py's own train_step (nanoGPT's bench.py idea).

    python bench.py                          # the demo model on the embedded dataset, CPU
    python bench.py --device=cuda --steps=20 # any train.py setting can be overridden

Prints the median step time of each method over interleaved rounds and the SIM / BoxInst ratio.
SIM runs with everything switched on from the first step (teacher, pseudo masks, prototype
update, memory bank full, copy-paste with p = paste_prob).
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
rounds = 4      # rounds, alternating the methods
warmup = 2      # untimed steps per method first


def main(argv):
    cfg = dict(train.config, steps=steps, rounds=rounds, warmup=warmup)
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
    batches = [data.collate([ds[i] for i in idx[k * n:(k + 1) * n]]) for k in range(cfg["steps"])]
    use_amp = cfg["amp"] and dev.type == "cuda"
    autocast = lambda: torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp)

    runners = {}
    for method in ("boxinst", "sim"):
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
        runners[method] = (model, opt, scaler, state, mcfg)

    def run(method, n_steps, it0):
        model, opt, scaler, state, mcfg = runners[method]
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

    for method in runners:  # warm-up; also fills SIM's bank
        run(method, max(cfg["warmup"], len(batches)), 0)
    assert runners["sim"][3].bank.full
    times = {m: [] for m in runners}
    for r in range(cfg["rounds"]):
        for method in (runners if r % 2 == 0 else reversed(list(runners))):
            times[method] += run(method, cfg["steps"], 100 + r * cfg["steps"])
    med = {m: statistics.median(t) for m, t in times.items()}
    print(f"device {dev} | batch {n} | {cfg['rounds']} rounds x {cfg['steps']} steps | torch {torch.__version__}")
    for m, t in med.items():
        print(f"{m:8s} median step {t * 1000:8.1f} ms")
    print(f"SIM / BoxInst step time: {med['sim'] / med['boxinst']:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
