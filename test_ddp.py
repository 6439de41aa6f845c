"""The CPU stand-in for the multi-GPU run: train.py under torchrun on 2 gloo processes whose data differ.

What an 8-GPU NCCL run needs and a one-process test never sees:
- collective discipline: every rank makes the same collectives (op, shape, dtype) in the same order
  whatever its batch holds (no positive location, pastes or none, other object counts), or NCCL pairs
  them wrongly and the run hangs or aborts;
- device discipline: no tensor handed to a collective was made by a factory call without a device
  (on CPU that is the training device by accident; under NCCL it is the CPU, which NCCL rejects);
- checkpoints load onto the CPU first and a resumed DDP run continues exactly (RNG states,
  copy-paste generators, memory banks, the data position);
- every config's network runs DDP steps with find_unused_parameters=False (test_train.py).

The processes run train.py through a launcher (LAUNCHER below) that records each collective and
each tensor made by a torch factory function without a device argument (a TorchFunctionMode).
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))

LAUNCHER = r'''
import atexit, json, os, runpy, sys, weakref
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

sys.path.insert(0, os.environ["NANOSIM_DIR"])
RANK, OUT = int(os.environ["RANK"]), os.environ["RECORD_DIR"]
record = {"collectives": [], "no_device": [], "batches": []}
FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.as_tensor, torch.arange,
             torch.rand, torch.randn, torch.randint, torch.linspace, torch.eye}
made_without_device = {}  # id -> weakref of tensors a factory made on the default device


class Provenance(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FACTORIES and kwargs.get("device") is None and torch.is_tensor(out):
            made_without_device[id(out)] = weakref.ref(out)
        return out


depth = [0]


def tensors_in(x):
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in tensors_in(v)]
    return []


def recorded(name, fn):
    def call(*args, **kwargs):
        if depth[0]:  # a collective inside a collective (gather_object's own): not the caller's
            return fn(*args, **kwargs)
        depth[0] += 1
        try:
            ts = tensors_in(list(args) + list(kwargs.values())) if not name.endswith("_object") else []
            for t in ts:
                ref = made_without_device.get(id(t))
                if ref is not None and ref() is t:
                    import traceback
                    record["no_device"].append(f"{name}: {traceback.format_stack(limit=4)[-2].strip()}")
            record["collectives"].append([name, [[list(t.shape), str(t.dtype), t.device.type] for t in ts]])
            return fn(*args, **kwargs)
        finally:
            depth[0] -= 1
    return call


for name in ("all_reduce", "broadcast", "barrier", "all_gather", "all_gather_object", "gather_object", "gather",
             "reduce", "broadcast_object_list", "all_gather_into_tensor", "reduce_scatter", "scatter"):
    setattr(dist, name, recorded(name, getattr(dist, name)))

import losses, copypaste
_prj = losses.projection_loss


def projection_loss(mask_logits, box_masks):  # the batch's positives, per rank and step
    record["batches"].append({"positives": int(mask_logits.shape[0])})
    return _prj(mask_logits, box_masks)


losses.projection_loss = projection_loss
_paste = copypaste.copy_paste_batch


def copy_paste_batch(*args, **kwargs):
    images, targets = _paste(*args, **kwargs)
    record["batches"].append({"pasted": int(sum(int(t["pasted"].sum()) for t in targets)),
                              "objects": [len(t["boxes"]) for t in targets]})
    return images, targets


copypaste.copy_paste_batch = copy_paste_batch
_split = losses.split_by_mask


def split_by_mask(targets, gt_inds):  # --mask_fraction: positives whose object trains from its GT mask
    box_pos, mask_pos = _split(targets, gt_inds)
    record["batches"].append({"with_mask": len(mask_pos)})
    return box_pos, mask_pos


losses.split_by_mask = split_by_mask


def dump():
    with open(os.path.join(OUT, f"rank{RANK}.json"), "w") as f:
        json.dump(record, f)


atexit.register(dump)
sys.argv = sys.argv[1:]
with Provenance():
    runpy.run_path(sys.argv[0], run_name="__main__")
'''


def make_image(path, rng, size, boxes):
    """A textured background with a flat-coloured rectangle per box (x0, y0, x1, y1)."""
    im = rng.integers(60, 110, (size, size, 3)).astype(np.uint8)
    for x0, y0, x1, y1 in boxes:
        im[y0:y1, x0:x1] = rng.integers(150, 255, 3)
    Image.fromarray(im).save(path)


def uneven_dataset(root):
    """96 px images: 4 training images with 1-3 objects, 2 whose one object is a 3 x 3 px box with no
    FCOS location inside it (no positive: the mask losses see N = 0), and 3 val images (an odd
    number: DistributedSampler pads rank 1 with a repeat)."""
    rng = np.random.default_rng(0)
    splits = {"train": [[(10, 12, 50, 60)], [(8, 8, 40, 40), (50, 44, 90, 88)],
                        [(5, 50, 35, 90), (40, 10, 70, 40), (60, 55, 92, 92)], [(20, 20, 76, 70)],
                        [(5, 5, 8, 8)], [(5, 5, 8, 8)]],
              "val": [[(12, 14, 60, 70)], [(30, 30, 80, 80), (5, 5, 25, 30)], [(40, 8, 90, 50)]]}
    paths = {}
    for split, images in splits.items():
        folder = os.path.join(root, split)
        os.makedirs(folder)
        js = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "other"}]}
        for i, boxes in enumerate(images):
            name = f"{i}.png"
            make_image(os.path.join(folder, name), rng, 96, boxes)
            js["images"].append({"id": i + 1, "file_name": name, "width": 96, "height": 96})
            for j, (x0, y0, x1, y1) in enumerate(boxes):
                js["annotations"].append({"id": len(js["annotations"]) + 1, "image_id": i + 1, "category_id": 1 + j % 2,
                                          "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                          "iscrowd": 0})
                if split == "train":  # its mask, for --mask_fraction (the box-supervised runs never read it)
                    js["annotations"][-1]["segmentation"] = [[x0, y0, x1, y0, x1, y1, x0, y1]]
        with open(os.path.join(root, f"{split}.json"), "w") as f:
            json.dump(js, f)
        paths[f"{split}_json"], paths[f"{split}_images"] = os.path.join(root, f"{split}.json"), folder
    return paths


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path, record_dir, *args, timeout=300):
    """train.py on 2 gloo processes through LAUNCHER -> (CompletedProcess, [rank 0 record, rank 1 record]).
    A hang is a failure: the run must end within `timeout` seconds."""
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    os.makedirs(record_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", NANOSIM_DIR=HERE, RECORD_DIR=str(record_dir))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", str(launcher), os.path.join(HERE, "train.py"), *args],
                       cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=env)
    recs = []
    for k in range(2):
        p = os.path.join(record_dir, f"rank{k}.json")
        recs.append(json.load(open(p)) if os.path.isfile(p) else None)
    return r, recs


def common_args(paths, out, max_iters):
    return [f"--{k}={v}" for k, v in paths.items()] + [
        "--batch_size=1", "--num_workers=0", "--min_size_train=(96,)", "--max_size_train=96", "--min_size_test=96",
        "--max_size_test=96", "--n_overlays=0", "--viz_interval=0", "--device=cpu", "--log_interval=1",
        "--teacher_start_iter=1", "--sim_start_iter=2", "--bank_size=1", "--paste_prob=0.5", "--bank_thresh=0.01",
        "--bank_min_box_iou=0",
        "--dist_timeout_min=3",
        f"--max_iters={max_iters}", f"--out_dir={out}"]


@pytest.fixture(scope="module")
def uneven_run(tmp_path_factory):
    """One 8-iteration SIM run on 2 ranks with uneven data (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("uneven")
    paths = uneven_dataset(str(tmp / "data"))
    r, recs = torchrun(tmp, tmp / "rec", *common_args(paths, tmp / "out", 8), "--ckpt_interval=4")
    return dict(tmp=tmp, paths=paths, r=r, recs=recs)


def test_uneven_ranks_make_the_same_collectives_and_finish(uneven_run):
    r, recs = uneven_run["r"], uneven_run["recs"]
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    a, b = recs
    # the data did differ: a step where one rank had no positive and the other had, one where one pasted
    # and the other did not, and different object counts
    pos = [[x["positives"] for x in rec["batches"] if "positives" in x] for rec in recs]
    assert any((p == 0) != (q == 0) for p, q in zip(*pos)), pos
    pastes = [[x for x in rec["batches"] if "pasted" in x] for rec in recs]
    assert any((p["pasted"] > 0) != (q["pasted"] > 0) for p, q in zip(*pastes)), pastes
    assert any(p["objects"] != q["objects"] for p, q in zip(*pastes)), pastes
    # ... and yet both ranks made the same collectives, in the same order, on the training device
    assert len(a["collectives"]) > 50
    assert a["collectives"] == b["collectives"]
    assert {d for _, ts in a["collectives"] for _, _, d in ts} == {"cpu"}
    assert a["no_device"] == [] and b["no_device"] == [], a["no_device"] + b["no_device"]
    # the odd val set: each of the 3 images scored once, the scores gathered to rank 0
    assert "eval: 3 images" in r.stdout
    assert ["gather_object", []] in a["collectives"] and ["all_gather_object", []] not in a["collectives"]


def test_some_masks_many_boxes_on_uneven_ranks(tmp_path):
    """--mask_fraction: a step where one rank has positives of objects with a GT mask and the other has
    none still makes the same collectives on both ranks (the dice term's all-reduce runs on every rank)."""
    paths = uneven_dataset(str(tmp_path / "data"))
    r, recs = torchrun(tmp_path, tmp_path / "rec", *common_args(paths, tmp_path / "out", 6), "--mask_fraction=0.5",
                       "--ckpt_interval=100")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    a, b = recs
    n = [[x["with_mask"] for x in rec["batches"] if "with_mask" in x] for rec in recs]
    assert len(n[0]) == len(n[1]) == 6 and any((p == 0) != (q == 0) for p, q in zip(*n)), n
    assert a["collectives"] == b["collectives"] and a["no_device"] == b["no_device"] == []


def test_ddp_resume_continues_exactly(uneven_run):
    """Stopped at iteration 4 (the checkpoint the uninterrupted run wrote there, loaded onto the CPU)
    and resumed on the same 2 ranks: the same weights, teacher, prototypes and banks at iteration 8 as
    the run that never stopped."""
    tmp, paths = uneven_run["tmp"], uneven_run["paths"]
    assert uneven_run["r"].returncode == 0
    half = tmp / "half"
    r, _ = torchrun(tmp, tmp / "rec_half", *common_args(paths, half, 4))
    assert r.returncode == 0, r.stderr[-3000:]
    r, recs = torchrun(tmp, tmp / "rec_resume", *common_args(paths, half, 8), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "not an exact continuation" not in r.stdout
    assert recs[0]["collectives"] == recs[1]["collectives"]
    full = tmp / "out"
    for name in ("ckpt.pt", "ckpt.rank1.pt"):
        x = torch.load(full / name, map_location="cpu", weights_only=False)
        y = torch.load(half / name, map_location="cpu", weights_only=False)
        assert x["iter"] == y["iter"] == 8
        if "model" in x:
            for k in x["model"]:
                assert torch.allclose(x["model"][k].float(), y["model"][k].float(), atol=1e-6), k
        sa, sb = x["rank_state"]["sim"], y["rank_state"]["sim"]
        for part in ("teacher", "prototypes"):
            for k in sa[part]:
                assert torch.allclose(sa[part][k].float(), sb[part][k].float(), atol=1e-6), (name, part, k)
        ea, eb = sa["bank"]["entries"], sb["bank"]["entries"]
        assert len(ea) == len(eb) and all(torch.equal(u["image"], v["image"]) for u, v in zip(ea, eb))
        assert torch.equal(sa["generator"], sb["generator"])


def test_checkpoint_written_on_a_gpu_loads_on_the_cpu(tmp_path):
    """A checkpoint whose storages are tagged cuda:0 (as a GPU run writes them) loads on this CPU-only
    machine through model.load_checkpoint, and its RNG state restores; torch.load without a CPU
    map_location would try to put them on the GPU."""
    from model import load_checkpoint
    state = {"rng": torch.get_rng_state(), "w": torch.arange(4.0)}
    tag = lambda obj: "cuda:0" if isinstance(obj, torch.storage.TypedStorage) or torch.is_storage(obj) else None
    torch.serialization.register_package(0, tag, lambda obj, location: None)  # consulted before the CPU's
    try:
        torch.save(state, tmp_path / "gpu.pt")
    finally:
        registry = torch.serialization._package_registry
        registry[:] = [entry for entry in registry if entry[1] is not tag]
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(tmp_path / "gpu.pt", weights_only=False)
    loaded = load_checkpoint(str(tmp_path / "gpu.pt"))
    assert loaded["rng"].device.type == "cpu" and torch.equal(loaded["w"], torch.arange(4.0))
    torch.set_rng_state(loaded["rng"])
