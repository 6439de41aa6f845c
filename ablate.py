"""
The small-scale analogue of the paper's ablations, on the embedded dataset (or any dataset: extra
arguments go to every train.py run):

  Tab. 3: BoxInst baseline / + L_pseudo / + L_pseudo + L_paste
  Tab. 4: alpha (Eq. 7) in {0, 0.5, 1}
  the presets (--sim_variant=paper, official) and each of nanoSIM's fixes switched off

    python ablate.py                          # the demo schedule, 16 runs one after another
    python ablate.py --jobs=2                 # two at a time, one core each
    python ablate.py --runs=baseline,paper    # only these rows
    python ablate.py --seed=1 --root=out/ablation_s1   # extra arguments go to every run
    python ablate.py --ms_stats=out/demo/ckpt.pt   # every variant's pseudo labels against the GT masks
                                              # (--only=TEXT: the variants whose label contains TEXT)
    python ablate.py --probe=CKPT --iters=200 # one SIM ingredient at a time, continued from a BoxInst checkpoint
    python ablate.py --grid_oracle            # mask AP of perfect masks seen through a stride-s grid
    python ablate.py --pair_stats             # how many neighbour pairs BoxInst's colour affinity links
    python ablate.py --attr_ap=out/demo       # a finished run's AP on low-contrast / occluded objects
                                              # (--attr_ap=RUN1,RUN2; --val_json=J for older runs' data)

--grid_oracle: every val GT mask, average-pooled onto a stride-s grid and brought back by the model's
own up-sampling (aligned_bilinear) and the 0.5 threshold, scored as a detection with its GT box and
class: the mask AP a network whose mask logits live on that grid could reach at best.

--pair_stats: on the val images, the share of BoxInst's neighbour pairs (8 dilated neighbours on the
stride-s grid) whose colour similarity passes color_thresh = 0.3, split by where the pair lies: inside
one object, on background inside a GT box, on background outside every box, across an object edge.
The pairwise loss only acts on pairs that pass, so in-box background that is rarely linked is learnt
from the projection loss alone.

--attr_ap: box and mask AP of a finished run (its results_*.json) on subsets of the val objects, by
the tags the synthetic generator writes into the json: low-contrast or not, occluded or not. The
objects outside a subset are scored as crowd regions (ignored).

--ms_stats: the pseudo labels of every variant (paper, official, nanosim and nanosim with one piece
changed) scored against the GT masks on a network SIM has not touched: a BoxInst checkpoint, or a
SIM one stopped before L_pseudo starts. On a Mask2Former checkpoint (BoxInst-dagger) the rows are the
two forms of M_I (--m2f_instance_map: the matched query, iou_mix). See ms_stats.

Each run writes out/ablation/<name>/metrics.json; a run whose metrics.json exists is not repeated,
so an interrupted ablation resumes (--root=DIR: another tree, e.g. for a second seed). Prints the
tables (mask AP, box AP) at the end.
"""

import json
import os
import subprocess
import sys

import torch

import box_ops
import losses

RUNS = {  # name: train.py arguments (SIM runs use the default preset, nanosim, unless they say otherwise)
    "baseline": ["--method=boxinst"],
    "+pseudo": ["--method=sim", "--paste_prob=0.0"],
    "+pseudo+paste": ["--method=sim"],             # nanosim; also Tab. 4's alpha = 0.5
    "alpha=0": ["--method=sim", "--alpha=0.0"],
    "alpha=1": ["--method=sim", "--alpha=1.0"],
    "paper": ["--method=sim", "--sim_variant=paper"],
    "official": ["--method=sim", "--sim_variant=official"],
    "-supervise_outside": ["--method=sim", "--supervise_outside=False"],
    "-calibrated": ["--method=sim", "--semantic_map=paper"],
    "-proto_filter": ["--method=sim", "--proto_filter=False"],
    "-area_thresh": ["--method=sim", "--pseudo_thresh=fixed"],
    "-lambda1_ramp": ["--method=sim", "--lambda1_ramp_iters=0"],
    "-occlusion_aware": ["--method=sim", "--occlusion_aware=False"],
    "-box_gate": ["--method=sim", "--bank_min_box_iou=0.0"],
    "-official_paste_loss": ["--method=sim", "--paste_loss=bce_dice"],
    "-color_map": ["--method=sim", "--color_weight=0.0"],
}
TABLES = [
    ("Tab. 3 (paper, COCO R50 1x mask AP: 30.7 / 31.9 / 32.2)", ["baseline", "+pseudo", "+pseudo+paste"]),
    ("Tab. 4 (paper, COCO R50 1x mask AP: 30.5 / 32.2 / 31.4)", ["alpha=0", "+pseudo+paste", "alpha=1"]),
    ("Presets (--sim_variant; nanosim = +pseudo+paste)", ["+pseudo+paste", "paper", "official"]),
    ("nanoSIM's fixes, each switched off", ["+pseudo+paste", "-supervise_outside", "-calibrated", "-proto_filter",
                                            "-area_thresh", "-lambda1_ramp", "-occlusion_aware", "-box_gate",
                                            "-official_paste_loss", "-color_map"]),
]


STATS_VARIANTS = [  # (label, preset, overrides): the pseudo labels --ms_stats scores
    ("paper", "paper", {}),
    ("official", "official", {}),
    ("nanosim", "nanosim", {}),
    ("nanosim without the colour map (beta=0)", "nanosim", dict(color_weight=0.0)),
    ("nanosim, colour seeds not purified (min contrast 0)", "nanosim", dict(color_min_contrast=0.0)),
    ("nanosim, beta=0.75", "nanosim", dict(color_weight=0.75)),
    ("nanosim, alpha=1 (M_I and M_C)", "nanosim", dict(alpha=1.0)),
    ("nanosim, alpha=0 (M_S and M_C)", "nanosim", dict(alpha=0.0)),
    ("nanosim without the colour map, alpha=1 (M_I alone)", "nanosim", dict(color_weight=0.0, alpha=1.0)),
    ("nanosim, Eq. 1 map", "nanosim", dict(semantic_map="paper")),
    ("nanosim, no proto_filter", "nanosim", dict(proto_filter=False)),
    ("nanosim, fixed thresholds", "nanosim", dict(pseudo_thresh="fixed")),
    ("nanosim, the network in bf16 (teacher_bf16, D21)", "nanosim", dict(teacher_bf16=True)),
]
STATS_VARIANTS_M2F = [  # a Mask2Former checkpoint's rows: the two forms of M_I (Eq. 6 from the teacher's queries)
    ("nanosim, M_I the matched query", "nanosim", dict(m2f_instance_map="matched")),
    ("nanosim, M_I iou_mix", "nanosim", dict(m2f_instance_map="iou_mix")),
    ("M_I alone (alpha=1, beta=0), the matched query", "nanosim",
     dict(m2f_instance_map="matched", alpha=1.0, color_weight=0.0)),
    ("M_I alone (alpha=1, beta=0), iou_mix", "nanosim", dict(m2f_instance_map="iou_mix", alpha=1.0, color_weight=0.0)),
    ("paper", "paper", dict(m2f_instance_map="matched")),
]


def _auc(pos, neg):
    """P(a random pos value > a random neg value), from ranks (Mann-Whitney); ties count half-ish."""
    ranks = torch.cat([pos, neg]).double().argsort().argsort().double() + 1
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / max(len(pos) * len(neg), 1))


@torch.no_grad()
def ms_stats(ckpt_path, n_build=200, n_images=100, batch=4, momentum=0.9, only=""):
    """Pseudo labels of every variant scored against the GT masks, on a network SIM has not touched.

    The network is the checkpoint's teacher (a SIM checkpoint) or its model (a BoxInst run); use a
    SIM checkpoint taken before L_pseudo starts (--max_iters=sim_start_iter) or a BoxInst one, so the
    measurement cannot be circular; it runs in float32, or in bf16 for a teacher_bf16 row (D21, where the
    CPU has bf16 kernels). For each variant (STATS_VARIANTS) a fresh prototype memory is
    built from this network's own confident pixels on the first n_build training images (no GT
    masks; EMA momentum `momentum` so the random start is forgotten within the pass), then the
    variant's M_S, M_prob and (M_hat, W) are computed on the val images and compared, inside the GT
    boxes, with the GT masks (never used before this point). Prints per variant: AUC of M_S and of
    M_prob (object vs in-box background), AUC of M_S on the pixels where M_I is unsure (0.3 < M_I <
    0.7: where the semantic map has something to add), precision and coverage of the foreground and background
    labels, the share of in-box pixels ignored, and the foreground growth (labelled foreground over
    the teacher's confident area, M_I > 0.7).
    A Mask2Former checkpoint (--arch=mask2former) is scored the same way on STATS_VARIANTS_M2F, its M_I from
    the teacher's queries (mask2former.pseudo_masks): the matched query or iou_mix, each also alone (alpha=1,
    no colour map), where the M_prob columns score M_I itself."""
    import data
    import mask2former
    import prototypes
    import sim
    from model import load_checkpoint, model_from_checkpoint
    ckpt = load_checkpoint(ckpt_path)
    base = ckpt["config"]
    m2f = base.get("arch", "condinst") == "mask2former"
    teacher = ckpt["sim"]["teacher"] if ckpt["sim"] is not None else None  # None: BoxInst, or before teacher_start_iter
    net = model_from_checkpoint(ckpt, teacher).eval()
    s = base["mask_out_stride"]
    kw = dict(train=False, min_sizes=(base["min_size_test"],), max_size=base["max_size_test"])
    build_ds = data.CocoBoxDataset(base["train_json"], base["train_images"], with_masks=False, **kw)
    val_ds = data.CocoBoxDataset(base["val_json"], base["val_images"], with_masks=True, **kw)

    def batches(ds, n):
        for i in range(0, min(n, len(ds)), batch):
            images, targets = data.collate([ds[j] for j in range(i, min(i + batch, n, len(ds)))])
            if sum(len(t["boxes"]) for t in targets):
                yield images, targets

    # the network's outputs depend only on its precision (float32, or bf16 for the teacher_bf16 rows): once each
    cpu, outputs = torch.device("cpu"), {}

    def network_outputs(bf16):
        if bf16 not in outputs:
            def run(im, t):
                with sim.teacher_autocast(cpu, bf16):
                    out = net.features(im, classify=False) if m2f else net(im, t)
                return sim.float32_outputs(out), sim.objects(t, im.shape[-2:], s, images=im), t
            outputs[bf16] = ([run(im, t) for im, t in batches(build_ds, n_build)],
                             [run(im, t) + (im.shape[-2:],) for im, t in batches(val_ds, n_images)])
        return outputs[bf16]

    def pseudo(out, obj, targets, protos, cfg):  # each network's own path to sim.pseudo_masks_from
        if m2f:
            return mask2former.pseudo_masks(out, targets, protos, obj, cfg)
        return sim.pseudo_masks(out, out, net, protos, obj, cfg)

    def unit_features(out):  # the per-pixel features the prototypes learn from, on the loss grid
        if m2f:
            return prototypes.normalize_features(out["mask_features"], mask2former.STRIDE // s)
        return prototypes.normalize_features(out["mask_feats"])
    print(f"{ckpt_path} ({'teacher' if teacher is not None else 'model'}): prototypes from {n_build} train images, "
          f"scored on {n_images} val images inside the GT boxes (stride {s})")
    print("| variant | AUC M_S | AUC M_S where 0.3 < M_I < 0.7 | AUC M_C there | AUC M_prob | label accuracy | fg precision | fg coverage | bg precision | "
          "bg coverage | ignored | fg growth |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, preset, over in STATS_VARIANTS_M2F if m2f else STATS_VARIANTS:
        if only and only not in label:
            continue
        cfg = dict(base, sim_variant=preset)
        sim.apply_preset(cfg)
        cfg.update(over)
        build, val = network_outputs(over.get("teacher_bf16", False) and sim.bf16_kernels(cpu))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            protos = sim.prototype_memory(cfg, momentum)
            for out, obj, targets in build:
                pm = pseudo(out, obj, targets, protos, cfg)
                fg, bg = sim.prototype_pixels(pm, obj, cfg)
                protos.update(unit_features(out), obj["img"], obj["cls"], fg, bg)
        acc = {k: [] for k in ("ms_fg", "ms_bg", "mp_fg", "mp_bg", "amb_fg", "amb_bg", "mc_fg", "mc_bg")}
        n = dict(lab_fg=0, lab_fg_ok=0, gt_fg=0, lab_bg=0, lab_bg_ok=0, gt_bg=0, ign=0, inbox=0, conf=0)
        for out, obj, targets, hw in val:
            pm = pseudo(out, obj, targets, protos, cfg)
            gt = torch.cat([losses.gt_mask_targets(t["masks"], hw, s) for t in targets]) > 0  # (G, Hp/s, Wp/s)
            inbox = (obj["box_mask"] > 0) & pm["has_pos"][:, None, None]
            is_fg, is_bg = inbox & gt, inbox & ~gt
            acc["ms_fg"].append(pm["M_S"][is_fg]), acc["ms_bg"].append(pm["M_S"][is_bg])
            acc["mp_fg"].append(pm["M_prob"][is_fg]), acc["mp_bg"].append(pm["M_prob"][is_bg])
            amb = (pm["M_I"] > 0.3) & (pm["M_I"] < 0.7)                                  # where M_I is unsure
            acc["amb_fg"].append(pm["M_S"][is_fg & amb]), acc["amb_bg"].append(pm["M_S"][is_bg & amb])
            if pm["M_C"] is not None:
                acc["mc_fg"].append(pm["M_C"][is_fg & amb]), acc["mc_bg"].append(pm["M_C"][is_bg & amb])
            lab_fg = inbox & (pm["W"] > 0) & (pm["M_hat"] > 0)
            lab_bg = inbox & (pm["W"] > 0) & (pm["M_hat"] == 0)
            n["lab_fg"] += int(lab_fg.sum()); n["lab_fg_ok"] += int((lab_fg & gt).sum()); n["gt_fg"] += int(is_fg.sum())
            n["lab_bg"] += int(lab_bg.sum()); n["lab_bg_ok"] += int((lab_bg & ~gt).sum()); n["gt_bg"] += int(is_bg.sum())
            n["ign"] += int((inbox & (pm["W"] == 0)).sum()); n["inbox"] += int(inbox.sum())
            n["conf"] += int((inbox & (pm["M_I"] > cfg["proto_conf_thresh"])).sum())
        cat = {k: torch.cat(v) if v else None for k, v in acc.items()}
        auc_mc = "-" if cat["mc_fg"] is None else f"{_auc(cat['mc_fg'], cat['mc_bg']):.3f}"
        r = lambda a, b: a / max(b, 1)
        growth = f"{n['lab_fg'] / n['conf']:.2f}" if n["conf"] else "- (no confident pixel)"
        print(f"| {label} | {_auc(cat['ms_fg'], cat['ms_bg']):.3f} | {_auc(cat['amb_fg'], cat['amb_bg']):.3f} "
              f"({len(cat['amb_fg']) + len(cat['amb_bg'])} px) | {auc_mc} | {_auc(cat['mp_fg'], cat['mp_bg']):.3f} | "
              f"{r(n['lab_fg_ok'] + n['lab_bg_ok'], n['lab_fg'] + n['lab_bg']):.1%} | "
              f"{r(n['lab_fg_ok'], n['lab_fg']):.1%} | {r(n['lab_fg_ok'], n['gt_fg']):.1%} | "
              f"{r(n['lab_bg_ok'], n['lab_bg']):.1%} | {r(n['lab_bg_ok'], n['gt_bg']):.1%} | "
              f"{r(n['ign'], n['inbox']):.1%} | {growth} |", flush=True)


PROBES = [  # (label, train.py arguments): one SIM ingredient at a time, continued from a BoxInst checkpoint
    ("BoxInst continued", ["--method=boxinst"]),
    ("+ L_pseudo", ["--method=sim", "--paste_prob=0.0"]),
    ("+ paste images, no L_paste", ["--method=sim", "--lambda1=0.0", "--lambda2=0.0"]),
    ("+ paste images + L_paste, Eq. 9 form (lambda2 1)", ["--method=sim", "--lambda1=0.0", "--paste_loss=bce_dice"]),
    ("+ paste images + L_paste, Eq. 9 form (lambda2 0.1)", ["--method=sim", "--lambda1=0.0", "--paste_loss=bce_dice",
                                                            "--lambda2=0.1"]),
    ("+ paste images + the official L_paste form", ["--method=sim", "--lambda1=0.0"]),
    ("+ L_pseudo + paste images, no L_paste", ["--method=sim", "--lambda2=0.0"]),
]


def probe(ckpt_path, n_iters=200):
    """Which SIM ingredient moves the AP, measured without a full training per row: every PROBES row
    continues the same BoxInst checkpoint (model and optimizer, at the checkpoint's iteration and
    lr) for n_iters iterations with that ingredient, on the same batches (loader seed 1), then
    evaluates on the val split. SIM rows start their teacher (a copy of the checkpoint), prototypes
    and a 20-image bank at the checkpoint's iteration, with L_pseudo at full weight from the first
    probe iteration (no ramp). A row that loses AP against "BoxInst continued" names the culprit."""
    import contextlib
    import io
    import configurator
    import data
    import eval as evaluation
    import sim
    import step
    from model import build_model, load_checkpoint
    ckpt = load_checkpoint(ckpt_path)
    it0 = ckpt["iter"]
    print(f"{ckpt_path} at iteration {it0}, {n_iters} probe iterations per row")
    print("| row | box AP | mask AP |\n|---|---|---|")
    for label, args in PROBES:
        cfg = dict(ckpt["config"])  # the run's settings (its data paths and num_classes too), then the row's
        configurator.configure_run(args, cfg, "ablate.py")
        cfg.update(teacher_start_iter=it0, sim_start_iter=it0, bank_size=20, lambda1_ramp_iters=0)
        torch.manual_seed(0)
        model = build_model(cfg)
        model.load_state_dict(ckpt["model"])
        model.train()
        opt = step.build_optimizer(model, cfg)
        opt.load_state_dict(ckpt["optimizer"])
        state = sim.SIMState(cfg, torch.device("cpu")) if cfg["method"] == "sim" else None
        ds = data.CocoBoxDataset(cfg["train_json"], cfg["train_images"], train=True, min_sizes=cfg["min_size_train"],
                                 max_size=cfg["max_size_train"])
        batches = data.infinite(data.make_loader(ds, cfg["batch_size"], train=True, num_workers=1, seed=1,
                                                 scale_per_batch=cfg["scale_per_batch"]))
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        for it in range(it0, it0 + n_iters):
            for g in opt.param_groups:
                g["lr"] = step.get_lr(it, cfg)
            step.train_step(model, model, opt, scaler, state, *next(batches), it, cfg, torch.device("cpu"),
                            lambda: torch.autocast("cpu", enabled=False))
        val = data.CocoBoxDataset(cfg["val_json"], cfg["val_images"], train=False, min_sizes=(cfg["min_size_test"],),
                                  max_size=cfg["max_size_test"])
        with contextlib.redirect_stdout(io.StringIO()):
            m = evaluation.evaluate(model, data.make_loader(val, 4, train=False, num_workers=1), val, torch.device("cpu"))
        print(f"| {label} | {m['bbox']['AP']:.1f} | {m['segm']['AP']:.1f} |", flush=True)


def grid_oracle(strides=(8, 4, 2)):
    """Mask AP ceiling of stride-s mask logits on the val split (see the module doc)."""
    import contextlib
    import io
    import numpy as np
    import torch.nn.functional as F
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    import synthetic
    from model import aligned_bilinear
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(synthetic.ensure_synthetic()["val_json"])
    print("| mask-logit stride | mask AP | AP75 | APs | APm |\n|---|---|---|---|---|")
    for s in strides:
        results = []
        for ann in gt.loadAnns(gt.getAnnIds()):
            m = torch.from_numpy(gt.annToMask(ann)).float()[None, None]            # (1, 1, H, W)
            H, W = m.shape[-2:]
            m = F.pad(m, (0, -W % s, 0, -H % s))                                    # to a multiple of s
            up = aligned_bilinear(F.avg_pool2d(m, s), s)[0, 0, :H, :W]              # (H, W) in [0, 1]
            rle = mask_util.encode(np.asfortranarray((up >= 0.5).numpy().astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            results.append(dict(image_id=ann["image_id"], category_id=ann["category_id"], segmentation=rle, score=1.0))
        with contextlib.redirect_stdout(io.StringIO()):
            E = COCOeval(gt, gt.loadRes(results), "segm")
            E.evaluate(), E.accumulate(), E.summarize()
        print(f"| {s} | {E.stats[0] * 100:.1f} | {E.stats[2] * 100:.1f} | {E.stats[3] * 100:.1f} | {E.stats[4] * 100:.1f} |")


def pair_stats(strides=(4, 2), color_thresh=0.3):
    """Share of colour-linked neighbour pairs by region, on the val split (see the module doc)."""
    import data
    import synthetic
    paths = synthetic.ensure_synthetic()
    ds = data.CocoBoxDataset(paths["val_json"], paths["val_images"], train=False, min_sizes=(160,), max_size=320,
                             with_masks=True)
    names = ("inside one object", "background in a box", "background outside boxes", "across an object edge")
    print("| stride | " + " | ".join(names) + " |\n" + "|---" * (len(names) + 1) + "|")
    for s in strides:
        counts = torch.zeros(len(names), 2)  # (pairs, linked pairs) per region
        for i in range(len(ds)):
            images, (t,) = data.collate([ds[i]])
            hw = images.shape[-2:]
            valid = losses.image_valid_masks([t["size"]], [t["orig_size"]], hw, s, bottom_pixels_removed=0)
            linked = losses.color_similarity(images, valid, s)[0] >= color_thresh          # (8, h, w)
            gt = losses.gt_mask_targets(t["masks"], hw, s) > 0.5                            # (G, h, w)
            owner = (gt * torch.arange(1, len(gt) + 1)[:, None, None]).amax(0)             # (h, w), 0 = background
            nb_owner = losses.unfold_wo_center(owner[None, None].float(), 3, 2)[0, 0]       # (8, h, w)
            nb_valid = losses.unfold_wo_center(valid[:, None].float(), 3, 2)[0, 0] > 0      # (8, h, w)
            in_box = (box_ops.box_masks_inclusive(t["boxes"], hw, s).amax(0) > 0).expand_as(linked)  # (8, h, w)
            o = owner.expand_as(linked)
            regions = ((o > 0) & (o == nb_owner), (o == 0) & (nb_owner == 0) & in_box,
                       (o == 0) & (nb_owner == 0) & ~in_box, o != nb_owner)
            for r, m in enumerate(regions):
                m = m & nb_valid
                counts[r] += torch.tensor([m.sum(), (m & linked).sum()])
        print(f"| {s} | " + " | ".join(f"{l / n:.0%}" for n, l in counts.tolist()) + " |")


def subset_ap(gt, results, keep, iou_type):
    """COCO AP (percent) on the GT objects for which keep(annotation) holds: the others become crowd
    regions, so detections on them are neither true nor false positives (COCO's way of not caring).
    No detections -> 0.0, as eval.coco_evaluate (pycocotools' loadRes cannot take [])."""
    if not results:
        return 0.0
    import contextlib
    import copy
    import io
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    d = copy.deepcopy(gt)
    for a in d["annotations"]:
        a["iscrowd"] = int(a.get("iscrowd", 0) or not keep(a))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO()
        coco.dataset = d
        coco.createIndex()
        E = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), iou_type)  # loadRes changes its input
        E.evaluate()
        E.accumulate()
        E.summarize()
    return 100.0 * E.stats[0]


def attr_ap(run_dir, val_json=""):
    """Box and mask AP of a finished run by object attribute: the synthetic val json (the run's own, or
    val_json: the same images) tags each object with low_contrast and visible_frac (the share of its
    in-image outline not occluded)."""
    if not val_json:
        from model import load_checkpoint
        val_json = load_checkpoint(os.path.join(run_dir, "ckpt.pt"))["config"]["val_json"]
    with open(val_json) as f:
        gt = json.load(f)
    if not all("low_contrast" in a for a in gt["annotations"]):
        sys.exit(f"ablate.py: {val_json} has no attribute tags (written by the synthetic generator since version 7) "
                 "— fix: regenerate it with the current data.py and pass --val_json=<it>")
    results = {}
    for t in ("bbox", "segm"):
        with open(os.path.join(run_dir, f"results_{t}.json")) as f:
            results[t] = json.load(f)
    subsets = {"all": lambda a: True,
               "low-contrast": lambda a: a["low_contrast"], "not low-contrast": lambda a: not a["low_contrast"],
               "occluded (visible < 0.9)": lambda a: a["visible_frac"] < 0.9,
               "not occluded": lambda a: a["visible_frac"] >= 0.9}
    print(f"{run_dir}\n| objects | n | box AP | mask AP |\n|---|---|---|---|")
    for name, keep in subsets.items():
        n = sum(map(keep, gt["annotations"]))
        print(f"| {name} | {n} | {subset_ap(gt, results['bbox'], keep, 'bbox'):.1f} | "
              f"{subset_ap(gt, results['segm'], keep, 'segm'):.1f} |")


def main(extra, jobs=1, only=None, root="out/ablation"):
    """Train the missing runs (`jobs` at a time, the cores split between them), then print the tables."""
    names = [n for n in RUNS if only is None or n in only]
    todo = [n for n in names if not os.path.isfile(os.path.join(root, n, "metrics.json"))]
    env = dict(os.environ, OMP_NUM_THREADS=str(max((os.cpu_count() or 1) // jobs, 1))) if jobs > 1 else None
    running = []
    while todo or running:
        while todo and len(running) < jobs:
            name = todo.pop(0)
            out_dir = os.path.join(root, name)
            os.makedirs(out_dir, exist_ok=True)
            cmd = [sys.executable, "train.py", *RUNS[name], f"--out_dir={out_dir}", "--n_overlays=2", *extra]
            print(">>", " ".join(cmd), flush=True)
            log = open(os.path.join(out_dir, "train.log"), "w") if jobs > 1 else None
            running.append((name, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT if log else None)))
        name, proc = running.pop(0)
        if proc.wait() != 0:
            sys.exit(f"ablate.py: run {name} failed (exit {proc.returncode}) — see {root}/{name}/train.log")
    results = {}
    for name in names:
        with open(os.path.join(root, name, "metrics.json")) as f:
            results[name] = json.load(f)
    for title, rows in TABLES:
        rows = [n for n in rows if n in results]
        if not rows:
            continue
        print(f"\n{title}\n| run | mask AP | box AP |\n|---|---|---|")
        for n in rows:
            label = "alpha=0.5" if title.startswith("Tab. 4") and n == "+pseudo+paste" else n
            print(f"| {label} | {results[n]['segm']['AP']:.1f} | {results[n]['bbox']['AP']:.1f} |")


OPTIONS = dict(  # ablate.py's own options; every other --key=value goes to each train.py run
    ms_stats="",       # CKPT: every variant's pseudo labels against the GT masks
    only="",           # with ms_stats: the variants whose label contains this text
    probe="",          # CKPT: one SIM ingredient at a time, continued from a BoxInst checkpoint
    iters=200,         # with probe
    grid_oracle=False,
    pair_stats=False,
    attr_ap="",        # RUN[,RUN...]: finished runs' AP on object subsets
    val_json="",       # with attr_ap: the val json of older runs' data
    jobs=1,            # runs at a time (the cores split between them)
    runs="",           # NAME[,NAME...]: only these rows (default: all of RUNS)
    root="out/ablation",
)


def cli(argv):
    import config
    import configurator
    own = [a for a in argv if a.startswith("--") and a[2:].partition("=")[0] in OPTIONS]
    extra = [a for a in argv if a not in own]
    opt = dict(OPTIONS)
    configurator.configure(own, opt, "ablate.py")
    # a typo in a train.py option stops here, not in 16 runs
    configurator.configure_run(extra, config.defaults(), "train.py")
    if opt["ms_stats"]:
        ms_stats(opt["ms_stats"], only=opt["only"])
    elif opt["attr_ap"]:
        for run in opt["attr_ap"].split(","):
            attr_ap(run, opt["val_json"])
    elif opt["probe"]:
        probe(opt["probe"], opt["iters"])
    elif opt["grid_oracle"]:
        grid_oracle()
    elif opt["pair_stats"]:
        pair_stats()
    else:
        unknown = [n for n in opt["runs"].split(",") if n and n not in RUNS]
        if unknown:
            raise SystemExit(f"ablate.py: --runs={opt['runs']}: {unknown} not a row — fix: names from {', '.join(RUNS)}")
        main(extra, opt["jobs"], opt["runs"].split(",") if opt["runs"] else None, opt["root"])


if __name__ == "__main__":
    cli(sys.argv[1:])
