"""
SIM's training step around the BoxInst network (paper Sec. 3, Fig. 2), wiring together
prototypes.py (Eq. 1-7), losses.py (Eq. 8-10) and copypaste.py (Eq. 9, 11):

  1. copy-paste onto the batch (once the memory bank is full)             copypaste.py
  2. student forward (step.py) and teacher forward (no grad)              model.py
  3. pseudo masks from the teacher: M_S (Eq. 1), M_I (Eq. 6),
     M_prob (Eq. 7), then M_hat and the ignore weight W                    pseudo_masks()
  4. L_pseudo (Eq. 8) on the positives, L_paste (Eq. 9) on pasted ones     sim_losses()
  5. after the step: prototype update (Eq. 2-5), bank push (Eq. 11),
     teacher EMA                                                            after_step()

Three presets (--sim_variant, PRESETS below): "paper" is Eq. 1-11 and Sec. 4.1 literally,
"official" the authors' code as docs/official_code.md describes it, "nanosim" (the default) the
paper's method with departures, each its own switch and function, each measured in BENCHMARKS.md:
  - supervise_outside: pixels outside the box (and pasted over the object) are background targets;
  - occlusion_aware: pixels pasted over an object leave its box in every loss;
  - semantic_map="calibrated": M_S against background sub-centres (calibrated_semantic_map);
  - proto_filter: the sub-centre update skips pixels the map calls background (prototype_pixels);
  - pseudo_thresh="area": the foreground never outgrows the teacher's confident area;
  - lambda1_ramp_iters: L_pseudo fades in instead of arriving at full strength;
  - bank_min_box_iou: only pseudo masks that fill their GT box enter the bank (box_quality_gate);
  - paste_loss="official": L_paste in the official code's form (losses.official_paste_loss: ~10x less
    weight per pasted positive); Eq. 9's form costs 6 box AP on the demo (ablate.py --probe).
  - color_weight: colour evidence from the box's surroundings mixed into Eq. 7 (colormap.color_map):
    where the teacher is unsure, the feature-based M_S is near chance, the colours are not.

Choices the paper leaves open (docs/official_code.md §12; see the comments where they are made):
  - M_I comes from the TEACHER's mask predictions at the student's selected positives.
  - pasted objects take part in the FCOS and BoxInst losses as ordinary GT boxes, and get
    L_paste (against the mask they were pasted with) instead of L_pseudo.
  - the teacher is copied from the student at teacher_start_iter (before the SIM losses start),
    and the prototypes learn from then on, so both are warm when L_pseudo is switched on.
"""

import copy

import torch

import colormap
import copypaste
import losses
import prototypes
from box_ops import box_iou_pairs, decode_boxes, host_to_device, masks_to_boxes, size_groups
from model import fold_batchnorm, refold


# -----------------------------------------------------------------------------
# presets: what --sim_variant sets (any key given explicitly, on the command line or in a config
# file, wins over the preset)

PRESETS = {
    # the paper, Eq. 1-11, Sec. 3 and 4.1 as written (the supplement where they are silent). Where the text
    # is ambiguous: tau = 0.1, Sec. 4.1's stated value (the supplement's Tab. 8 peaks at 1.0, the official
    # code's, with the headline 32.2; its text describes the parameter as Eq. 7's modulation, so it is not
    # clearly Eq. 1's tau); the teacher in float32 (the paper has no reduced precision)
    "paper": dict(tau=0.1, mu=5.0, alpha=0.5, semantic_map="paper", proto_filter=False, proto_assign="argmax",
                  proto_norm="D", centroid_norm=False, proto_pixels="pseudo", pseudo_region="image",
                  pseudo_thresh="fixed", tau_low=0.3, tau_high=0.7, supervise_outside=False, occlusion_aware=True,
                  pseudo_loss="bce_dice", paste_loss="bce_dice", paste_reduction="sum", lambda1=0.5,
                  lambda1_ramp_iters=0, lambda1_ramp_origin=-1, lambda2=1.0, bank_size=100, bank_masks="pseudo",
                  bank_score_plus_one=False, bank_min_box_iou=0.0, paste_prob=1.0, paste_fraction=0.25,
                  paste_score_power=1, paste_replacement=False, paste_detector=True, pairwise_affinity="color",
                  color_weight=0.0, teacher_momentum=0.9999, proto_momentum=0.999, teacher_bf16=False),
    # the authors' code (docs/official_code.md): no temperature, prototypes normalised over L, Gumbel
    # assignment, plain mean over positives, area-matched threshold with background below 0.4,
    # outside the box ignored, focal-style loss with 0.3 * min(it / T, 1) (T = 270k on COCO: 3x the
    # 1x schedule, iters_1x), bank 50, paste with replacement, colour x feature affinity.
    # Unlike the official code, L_pseudo skips pasted objects here (they have L_paste)
    "official": dict(tau=1.0, mu=0.0, alpha=0.5, semantic_map="paper", proto_filter=False, proto_assign="gumbel",
                     proto_norm="L", centroid_norm=True, proto_pixels="teacher", pseudo_region="box",
                     pseudo_thresh="area", tau_low=0.4, tau_high=0.7, area_t_max=0.8, supervise_outside=False,
                     occlusion_aware=True, pseudo_loss="official", paste_loss="official", paste_reduction="mean",
                     lambda1=0.3, lambda1_ramp_iters=lambda cfg: 3 * cfg["iters_1x"], lambda1_ramp_origin=0,
                     lambda2=1.0, bank_size=50, bank_masks="teacher", bank_score_plus_one=True, bank_min_box_iou=0.0,
                     paste_prob=0.5, paste_fraction=0.5, paste_score_power=3, paste_replacement=True,
                     paste_detector=True, pairwise_affinity="color_feat", color_weight=0.0, teacher_momentum=0.9999,
                     proto_momentum=0.999, teacher_bf16=False),
    # nanoSIM: the paper plus the measured fixes (module docstring, BENCHMARKS.md). Its values are the
    # defaults (config.py's [preset] keys): written there once, so this preset sets nothing
    "nanosim": dict(),
}


CHOICES = dict(semantic_map=("paper", "calibrated"), pseudo_thresh=("fixed", "area"), pseudo_loss=("bce_dice", "official"),
               paste_loss=("bce_dice", "official"), proto_assign=("argmax", "gumbel"), proto_norm=("D", "L"),
               pairwise_affinity=("color", "color_feat"), bank_masks=("teacher", "pseudo", "rectified"),
               proto_pixels=("teacher", "pseudo"), pseudo_region=("box", "image"), paste_reduction=("mean", "sum"))


def apply_preset(cfg, explicit=()):
    """Set cfg's SIM knobs from PRESETS[cfg["sim_variant"]], except the keys named on the command line
    (explicit.command_line, configurator.configure's; a plain set: all of it), then check every switch
    with a fixed set of values (CHOICES). A config file's value for a preset key does not win: the file
    sets a schedule, the preset the method (--sim_variant=paper on a COCO config is the paper's SIM).
    Values may be functions of the config (evaluated on the final cfg). Returns what it set."""
    name = cfg["sim_variant"]
    if name not in PRESETS:
        raise SystemExit(f"sim.py: --sim_variant={name!r} is not a preset — fix: one of {', '.join(PRESETS)}")
    named = getattr(explicit, "command_line", explicit)
    chosen = {k: v for k, v in PRESETS[name].items() if k not in named}
    chosen = {k: v(cfg) if callable(v) else v for k, v in chosen.items()}
    cfg.update(chosen)
    for k, allowed in CHOICES.items():
        if cfg[k] not in allowed:
            raise SystemExit(f"sim.py: --{k}={cfg[k]!r} is not an option — fix: one of {', '.join(allowed)}")
    if cfg["pseudo_region"] == "image" and cfg["color_weight"] > 0:
        raise SystemExit("sim.py: --color_weight > 0 reads the colours around each box — fix: --pseudo_region=box, "
                         "or --color_weight=0")
    return chosen


class SIMState:
    """What SIM keeps across iterations: the momentum teacher, the prototypes and the memory bank.
    Not an nn.Module of the student: none of it is trained by the optimizer."""

    def __init__(self, cfg, device, rank=0):
        self.cfg = cfg
        self.teacher = None  # made at teacher_start_iter
        self.teacher_fwd, self.fold_pairs = None, []  # the teacher the forwards run (fold_batchnorm)
        # identical initial prototypes on every rank: a generator seeded with the run's seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg["seed"])
            self.protos = prototype_memory(cfg).to(device)
        self.bank = copypaste.MemoryBank(cfg["bank_size"])
        # copy-paste draws (CPU), different on every rank like the rest of the randomness
        self.generator = torch.Generator().manual_seed(cfg["seed"] + 1 + rank)

    def start_teacher(self, model):
        self.teacher = make_teacher(model)
        if self.cfg["teacher_fold_bn"]:
            self.teacher_fwd, self.fold_pairs = fold_batchnorm(self.teacher)
        else:
            self.teacher_fwd, self.fold_pairs = self.teacher, []

    def refold(self):
        """After the teacher's tensors changed (EMA, load): its folded twin follows."""
        refold(self.fold_pairs)

    def state_dict(self):
        return {"teacher": None if self.teacher is None else self.teacher.state_dict(),
                "prototypes": self.protos.state_dict(), "bank": self.bank.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, sd, model):
        if sd["teacher"] is not None:
            self.start_teacher(model)
            self.teacher.load_state_dict(sd["teacher"])
            self.refold()
        self.protos.load_state_dict(sd["prototypes"])
        self.bank.load_state_dict(sd["bank"])
        self.generator.set_state(sd["generator"])


# -----------------------------------------------------------------------------
# SIM's momentum teacher: an EMA copy of the whole network (no hand-built twin)


def make_teacher(model):
    """A deep copy of the student; no gradients; eval mode, so its BN uses running statistics.
    (The paper does not say; the official code runs it in train mode, docs/official_code.md §3.1. Eval
    mode keeps the teacher's features independent of the batch, which is what a teacher is for.)"""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def update_teacher(teacher, model, momentum=0.9999):
    """theta_t <- m * theta_t + (1 - m) * theta_s for parameters; buffers copied from the student.
    One fused (foreach) kernel per group instead of ~200 small ones: the same arithmetic."""
    torch._foreach_lerp_(list(teacher.parameters()), [p.detach() for p in model.parameters()], 1 - momentum)
    torch._foreach_copy_(list(teacher.buffers()), list(model.buffers()))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        broadcast_buffers(teacher)


def bf16_kernels(device):
    """Whether `device` has native bfloat16 convolutions and matmuls: a CUDA GPU that supports bf16,
    or a CPU with AVX512-BF16 or AMX (oneDNN's check). Elsewhere bf16 is emulated, slower than fp32."""
    if device.type == "cuda":  # native only: V100/T4 report bf16 through emulation, slower than fp32 there
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a torch without the check: assume not
            return False
    return False


def teacher_autocast(device, enabled=True):
    """nanoSIM's departure (Decision D21 in BENCHMARKS.md): the teacher's forward under bfloat16 autocast
    where the device has bf16 kernels (bf16_kernels), float32 elsewhere or with --teacher_bf16=False.
    Why: the teacher's forward is most of what SIM adds to a BoxInst step (a whole network, every
    step), it never trains, and what it feeds (the pseudo masks) is thresholded; bf16's 8-bit mantissa
    moves few labels while its convolutions run ~2x faster. The student, its losses and the pseudo
    masks stay float32 (or whatever --amp sets): teacher_outputs casts the teacher's outputs back."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and bf16_kernels(device))


def float32_outputs(out):
    """A network's output dict with every floating tensor (and list of them) in float32."""
    f32 = lambda v: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
    return {k: [f32(t) for t in v] if isinstance(v, list) else f32(v) for k, v in out.items()}


def prototype_memory(cfg, momentum=None):
    """The prototype memory (Eq. 2-5) cfg's settings describe, its width that of the arch's per-pixel features
    (CondInst's mask_out_channels, Mask2Former's mask_dim); momentum: Eq. (4)'s gamma, cfg's proto_momentum
    unless given (ablate.ms_stats builds one in a single pass)."""
    D = cfg["mask_dim"] if cfg.get("arch", "condinst") == "mask2former" else cfg["mask_out_channels"]
    return prototypes.PrototypeMemory(cfg["num_classes"], cfg["num_subcenters"], D,
                                      cfg["proto_momentum"] if momentum is None else momentum, cfg["tau"],
                                      cfg["sinkhorn_eps"], cfg["sinkhorn_iters"], cfg["proto_assign"],
                                      cfg["proto_norm"], cfg["centroid_norm"])


def teacher_outputs(state, images):
    """The teacher's dense outputs on the (already pasted) batch: boxes and masks only, no classifier.
    It runs the BN-folded twin (D20) under torch.inference_mode (no autograd bookkeeping; what is
    computed from these outputs later is an ordinary tensor again) and teacher_autocast (D21); the
    outputs come back in float32, since the thresholds of M_hat need the precision."""
    with torch.inference_mode(), teacher_autocast(images.device, state.cfg["teacher_bf16"]):
        t_out = state.teacher_fwd.features(images, classify=False)
    return float32_outputs(t_out)


def broadcast_buffers(module, src=0):
    """Rank src's buffers on every rank, one broadcast per dtype. Under DDP the student's BN statistics
    differ between ranks after each forward (DDP re-broadcasts rank 0's at the start of the next), so the
    teacher copying them would drift apart across ranks."""
    by_dtype = {}
    for b in module.buffers():
        by_dtype.setdefault(b.dtype, []).append(b)
    for bufs in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in bufs])
        torch.distributed.broadcast(flat, src)
        torch._foreach_copy_(bufs, [t.view_as(b) for t, b in zip(flat.split([b.numel() for b in bufs]), bufs)])


# -----------------------------------------------------------------------------


def objects(targets, padded_hw, stride=4, occlusion_aware=True, images=None):
    """Every GT object of the batch, in the global order of gt_inds: boxes (G, 4), classes (G,),
    image (G,), pasted (G,) bool, and on the mask-out grid (stride s = mask_out_stride: 2 on the demo,
    4 in the reference): box masks (G, Hp/s, Wp/s) (occlusion_aware: minus the pixels pasted
    over the object, losses.object_box_masks), pasted pseudo masks (G, Hp/s, Wp/s) float, 0 for objects
    not pasted (losses.object_paste_masks; None unless every target has 'paste_masks'), the
    image-valid masks (B, Hp/s, Wp/s) (0 on padding), and with images (B, 3, Hp, Wp) (raw RGB) their
    CIE-Lab colours on the same grid, lab (B, 3, Hp/s, Wp/s) (averaged over each s x s cell, as the
    pairwise loss's), for color_map."""
    dev = targets[0]["boxes"].device
    boxes = torch.cat([t["boxes"] for t in targets])                                    # (G, 4)
    img = torch.cat([torch.full((len(t["boxes"]),), i, device=dev, dtype=torch.long) for i, t in enumerate(targets)])
    pasted = torch.cat([t.get("pasted", torch.zeros(len(t["boxes"]), dtype=torch.bool, device=dev)) for t in targets])
    paste = [losses.object_paste_masks(t, padded_hw, stride) for t in targets if "paste_masks" in t]
    valid = losses.image_valid_masks([t["size"] for t in targets], [t["orig_size"] for t in targets], padded_hw,
                                     stride, bottom_pixels_removed=0, device=dev)       # (B, Hp/s, Wp/s)
    lab = None if images is None else losses.rgb_to_lab(torch.nn.functional.avg_pool2d(images.float(), stride))
    with_gt = all("has_mask" in t for t in targets)  # some masks, many boxes (--mask_fraction): exact_labels
    return dict(valid=valid, lab=lab, boxes=boxes, cls=torch.cat([t["labels"] for t in targets]), img=img, pasted=pasted,
                has_mask=torch.cat([t["has_mask"] for t in targets]) if with_gt else None,  # (G,)
                gt_mask=torch.cat([losses.gt_mask_targets(t["masks"], padded_hw, stride) for t in targets])
                if with_gt else None,  # (G, Hp/s, Wp/s)
                box_mask=losses.object_box_masks(targets, padded_hw, stride, occlusion_aware),  # (G, Hp/s, Wp/s)
                paste_mask=torch.cat(paste).float() if len(paste) == len(targets) else None)


def positive_box_ious(out, im_inds, loc_inds, strides, gt_boxes):
    """Eq. (6)'s IoU: the box a network's dense output `out` predicts at each positive (image im_inds,
    location loc_inds (K,)) against its object's box gt_boxes (K, 4) -> (K,). Shared by the pseudo
    masks, predict.py's box-conditioned masks and viz.py."""
    stride = host_to_device(strides, out["locations"].device, out["locations"].dtype)[out["loc_level"][loc_inds]]  # (K,)
    ltrb = out["reg"][im_inds, loc_inds].float() * stride[:, None]                      # (K, 4)
    return box_iou_pairs(decode_boxes(out["locations"][loc_inds], ltrb), gt_boxes)


@torch.no_grad()
def pseudo_masks(out, t_out, teacher, protos, obj, cfg):
    """Eq. (1), (6), (7) and the two thresholds, for every GT object of the batch.

    out: the student's training output (its selected positives out['inst']); t_out: the
    teacher's dense outputs on the same images. Returns maps on the mask-out grid (G, Hp/s, Wp/s),
    written Hp/s below (s = mask_out_stride):
    M_S, M_I, M_prob, M_hat, W, and M_mean (plain mean of the teacher's masks over the object's
    positives, for the prototype update and the bank), has_pos (G,), and pos_weights (K,) (Eq. 6's
    weight of each positive, for viz.py).
    """
    inst = out["inst"]
    gi = inst["gt_inds"]                                                                # (K,)
    # Eq. (6)'s inputs: the teacher's mask at each positive, the IoU of the box it predicts there with the GT box
    probs = teacher.mask_logits(t_out, inst)[:, 0].float().sigmoid()                   # (K, Hp/s, Wp/s)
    ious = positive_box_ious(t_out, inst["im_inds"], inst["loc_inds"], teacher.strides, obj["boxes"][gi])  # (K,)
    return pseudo_masks_from(prototypes.normalize_features(t_out["mask_feats"]), probs, ious, gi, protos, obj, cfg)


@torch.no_grad()
def pseudo_masks_from(feats, probs, ious, gi, protos, obj, cfg):
    """pseudo_masks' maps from what any segmenter gives: the teacher's unit pixel features feats (B, D, Hp/s,
    Wp/s) (Eq. 1's z), and the positives of the objects: the teacher's mask probabilities probs (K, Hp/s, Wp/s),
    the IoU of each one's box with its object's box ious (K,) (Eq. 6), their objects gi (K,). CondInst's
    positives are FCOS locations (pseudo_masks), Mask2Former's the teacher's queries (mask2former.pseudo_masks)."""
    G = obj["boxes"].shape[0]
    # Eq. (1): the teacher's features against the prototypes of each object's class
    # pseudo_region "box": Eq. 1, 7 and the thresholds inside each box (0 / ignored or background outside);
    # "image": on every pixel of the image, as the paper writes them
    whole = cfg["pseudo_region"] == "image"
    inside = (obj["valid"][obj["img"]] if whole else obj["box_mask"]) > 0              # (G, Hp/s, Wp/s)
    m_s = protos.semantic_maps(feats, obj["img"], obj["cls"], cfg["semantic_map"] == "calibrated",
                               inside)                                                  # (G, Hp/s, Wp/s), 0 outside
    # Eq. (6): the teacher's mask at each positive, weighted by exp(mu * IoU(its box, the GT box))
    w = prototypes.positive_weights(ious, gi, G, cfg["mu"])                             # (K,)
    m_i = prototypes.instance_map(probs, w, gi, G)                                      # (G, Hp/s, Wp/s)
    m_mean = prototypes.instance_map(probs, prototypes.positive_weights(ious, gi, G, 0.0), gi, G)
    if whole:  # one call on the whole maps: the image plays the box's part
        m_prob, m_hat, weight, m_c = box_pseudo_labels(m_s, m_i, inside.float(), obj["valid"][obj["img"]], None, None,
                                                       cfg)
    else:  # Eq. (7) and the thresholds, in a window around each box (box_pseudo_labels: they are confined to it)
        color = cfg["color_weight"] > 0
        m_c = torch.full_like(m_i, 0.5) if color else None  # outside the boxes: no colour evidence
        m_prob, m_hat = torch.zeros_like(m_i), torch.zeros_like(m_i)
        # outside the boxes: background on the image (supervise_outside) or nothing
        weight = obj["valid"][obj["img"]] if cfg["supervise_outside"] else torch.zeros_like(m_i)  # (G, Hp/s, Wp/s)
        for g, ids, win in box_windows_of(inside, cfg["color_ring"] if color else 0):
            img = obj["img"][g]
            res = box_pseudo_labels(win(m_s, g), win(m_i, g), win(obj["box_mask"], g), win(obj["valid"], img),
                                    win(obj["lab"], img) if color else None, ids, cfg)
            for full, part in zip((m_prob, m_hat, weight, m_c), res):
                if full is not None:
                    full.view(G, -1)[g[:, None], ids.flatten(1)] = part.flatten(1)
    has_pos = torch.bincount(gi, minlength=G) > 0                                       # (G,)
    return exact_labels(dict(M_S=m_s, M_I=m_i, M_C=m_c, M_prob=m_prob, M_hat=m_hat, W=weight, M_mean=m_mean,
                             has_pos=has_pos, pos_weights=w), obj)


def exact_labels(pm, obj):
    """Some masks, many boxes (--mask_fraction): an object with a GT mask has an exact pseudo label. Its
    M_hat is the GT mask with weight W = 1 on its whole image (L_pseudo, Eq. 8), and its teacher's mean
    mask and rectified map are the GT mask too (the prototype pixels, Eq. 2-5, and the bank's masks).
    The other objects keep what SIM made from their box. pm as pseudo_masks' -> pm."""
    if obj.get("has_mask") is None:
        return pm
    h, gt = obj["has_mask"][:, None, None], obj["gt_mask"].to(pm["M_hat"].dtype)        # (G, 1, 1), (G, Hp/s, Wp/s)
    exact = {k: torch.where(h, gt, pm[k]) for k in ("M_hat", "M_mean", "M_prob")}
    return dict(pm, W=torch.where(h, obj["valid"][obj["img"]].to(pm["W"].dtype), pm["W"]), **exact)


def box_windows_of(box_mask, margin=0):
    """Windows of the mask-out grid around each box mask box_mask (G, H, W) bool (its bounding cells and
    `margin` more on each side, moved inside the grid where they would leave it), for pseudo_masks ->
    [(g, ids, win)], one per group of boxes of similar size (box_ops.size_groups): g (n,) the boxes,
    ids (n, hc, wc) long each window cell's index in the flattened grid, win(x, index) the windows of
    maps x (N, [C,] H, W) (map index[k] for box g[k]) -> (n, [C,] hc, wc). One host read."""
    H, W = box_mask.shape[-2:]
    dev = box_mask.device
    rects = []
    for c0, r0, c1, r1 in masks_to_boxes(box_mask).long().tolist():
        c0, r0 = min(max(c0 - margin, 0), W - 1), min(max(r0 - margin, 0), H - 1)
        c1, r1 = max(min(c1 + margin, W), c0 + 1), max(min(r1 + margin, H), r0 + 1)
        rects.append((c0, r0, c1, r1))
    out = []
    for group in size_groups([(r1 - r0, c1 - c0) for c0, r0, c1, r1 in rects]):
        hc = max(rects[k][3] - rects[k][1] for k in group)
        wc = max(rects[k][2] - rects[k][0] for k in group)
        g, top, left = host_to_device([group, [min(rects[k][1], H - hc) for k in group],  # (n,) each: inside the grid
                                       [min(rects[k][0], W - wc) for k in group]], dev)
        ids = ((top[:, None] + torch.arange(hc, device=dev))[:, :, None] * W
               + (left[:, None] + torch.arange(wc, device=dev))[:, None, :])  # (n, hc, wc)

        def win(x, index, top=top, left=left, hc=hc, wc=wc):
            y = x if x.dim() == 4 else x[:, None]
            y = losses.box_windows(y, top, left, hc, wc, index)  # (n, C, hc, wc)
            return y if x.dim() == 4 else y[:, 0]
        out.append((g, ids, win))
    return out


def box_pseudo_labels(m_s, m_i, box_mask, valid, lab, ids, cfg):
    """Eq. (7), nanoSIM's colour term and the thresholds on maps (n, h, w) that hold each object's box
    (pseudo_masks runs it on windows around the boxes, box_windows_of: every value outside a box is a
    constant, and the colour seeds lie within color_ring cells of it): M_S, M_I, box masks, the
    image-valid masks, the Lab colours (n, 3, h, w) (None: no colour term), ids (n, h, w) each cell's
    index in the full map (for the colour seeds' hash) -> M_prob, M_hat, W (times valid), M_C (or None)."""
    m_prob = prototypes.rectified_map(m_s, m_i, cfg["alpha"], box_mask)                  # (n, h, w)
    m_c = None
    if lab is not None:  # nanoSIM: colour evidence from the box's surroundings (colormap.color_map)
        fg_seed, bg_seed, ring = colormap.color_seeds(box_mask, m_i, valid, cfg["proto_conf_thresh"], cfg["color_ring"])
        m_c = colormap.color_map(lab, fg_seed, bg_seed, box_mask > 0, cfg["color_seeds"], cfg["color_temp"], ring,
                                 cfg["color_min_contrast"], ids=ids)
        # Eq. (7)'s mix once more: M_prob' = (1 - beta) M_prob + beta M_C (beta = 0: the paper)
        m_prob = prototypes.rectified_map(m_prob, m_c, cfg["color_weight"], box_mask)
    if cfg["pseudo_thresh"] == "fixed":
        m_hat, weight = prototypes.pseudo_labels(m_prob, box_mask, cfg["tau_low"], cfg["tau_high"],
                                                 cfg["supervise_outside"])
    else:  # "area": the foreground never outgrows the teacher's confident area
        m_hat, weight = prototypes.pseudo_labels_adaptive(m_prob, m_i, box_mask, cfg["proto_conf_thresh"],
                                                          cfg["tau_high"], cfg["area_t_max"], cfg["tau_low"],
                                                          cfg["supervise_outside"])
    return m_prob, m_hat, weight * valid, m_c                                           # never on the padding


def sim_losses(out, pm, obj, cfg):
    """L_pseudo (Eq. 8) on the positives of ordinary objects, L_paste (Eq. 9) on those of pasted
    objects (against the pseudo mask they were pasted with; padding excluded); cfg["pseudo_loss"]
    and cfg["paste_loss"]: "bce_dice" (the paper) or "official"."""
    inst = out["inst"]
    gi = inst["gt_inds"]                                                                # (K,)
    logits = out["mask_logits"].squeeze(1)                                              # (K, Hp/s, Wp/s), a view
    pasted = obj["pasted"][gi]                                                          # (K,)
    keep = sel = torch.arange(len(gi), device=gi.device)                                # no paste: every positive
    if obj["paste_mask"] is not None:  # ordinary positives first, then pasted ones, each in order: one host read
        order = torch.argsort(pasted.to(torch.uint8), stable=True)                      # (K,)
        n_ordinary = len(gi) - int(pasted.sum())
        keep, sel = order[:n_ordinary], order[n_ordinary:]                              # (K - P,), (P,)
    # "official": the official code's focal-style forms (docs/official_code.md §6.3-§6.4)
    pseudo = losses.official_focal_loss if cfg["pseudo_loss"] == "official" else losses.pseudo_mask_loss
    terms = {"loss_pseudo": pseudo(logits[keep], pm["M_hat"][gi[keep]], pm["W"][gi[keep]])}
    if obj["paste_mask"] is not None:
        # only the pasted positives are passed: the others weigh 0 in both forms (the official one's dice
        # mean still counts them, n_pos), and their (K, Hp/s, Wp/s) targets need not be gathered
        args = (logits[sel], obj["paste_mask"][gi[sel]], pasted[sel], obj["valid"][inst["im_inds"][sel]])
        terms["loss_paste"] = (losses.official_paste_loss(*args, n_pos=len(gi)) if cfg["paste_loss"] == "official"
                               else losses.paste_loss(*args, reduction=cfg["paste_reduction"]))
    return terms


def prototype_pixels(pm, obj, cfg, as_indices=False):
    """The pixels that update the class sub-centres (fg) and the background sub-centres (bg), (G, Hp/s, Wp/s) bool,
    or with as_indices the indices (k, y, x) of their True entries (what PrototypeMemory.update reads):
    then the tests run on the in-box cells alone, not on G whole maps.

    fg: inside the box where the teacher's mean mask over the positives > proto_conf_thresh (the
    official rule); bg: inside the box where it is < 1 - proto_conf_thresh (only with the calibrated
    map, the one reader of the background sub-centres; None otherwise).
    proto_filter (nanoSIM): a pixel joins fg only if the semantic map agrees (M_S > 0.5: closer to
    the class than to its background), and bg likewise (M_S < 0.5). Why: ~15% of the teacher's
    confident in-box pixels are real background; the equal-partition Sinkhorn hands them 1-2 of the
    10 sub-centres, and Eq. (1)'s max over sub-centres then scores background pixels by those
    (BENCHMARKS.md D16). The filter keeps a pixel the map already calls background out of the class.
    proto_pixels="pseudo" (the paper, Sec. 3.2.1: "given an image and its pseudo mask M_hat"): fg is
    where M_hat is foreground (W > 0), bg where it is background inside the box; proto_filter applies too.
    """
    if cfg["proto_pixels"] == "pseudo":
        return pseudo_label_pixels(pm, obj, cfg, as_indices)
    box = (obj["box_mask"] > 0) & pm["has_pos"][:, None, None]                          # (G, Hp/s, Wp/s)
    m_mean, m_s = pm["M_mean"], pm["M_S"]
    if as_indices:
        idx = box.nonzero(as_tuple=True)                                                # (M,) each: in-box cells
        box, m_mean, m_s = torch.ones_like(idx[0], dtype=torch.bool), m_mean[idx], m_s[idx]  # (M,) each
        pick = lambda sel: tuple(i.index_select(0, j) for j in [sel.nonzero().squeeze(1)] for i in idx)  # one host read
    fg = (m_mean > cfg["proto_conf_thresh"]) & box
    if cfg["semantic_map"] != "calibrated":
        return (pick(fg), None) if as_indices else (fg, None)
    bg = (m_mean < 1 - cfg["proto_conf_thresh"]) & box
    if cfg["proto_filter"]:
        fg, bg = fg & (m_s > 0.5), bg & (m_s < 0.5)
    return (pick(fg), pick(bg)) if as_indices else (fg, bg)


def pseudo_label_pixels(pm, obj, cfg, as_indices=False):
    """prototype_pixels for proto_pixels="pseudo": the pseudo labels' confident pixels of objects with
    positives: fg where M_hat = 1, bg (calibrated map only) where M_hat = 0 inside the box; W > 0 for both."""
    known = (pm["W"] > 0) & pm["has_pos"][:, None, None]                                # (G, Hp/s, Wp/s)
    fg = known & (pm["M_hat"] > 0.5)
    bg = known & (pm["M_hat"] < 0.5) & (obj["box_mask"] > 0) if cfg["semantic_map"] == "calibrated" else None
    if bg is not None and cfg["proto_filter"]:
        fg, bg = fg & (pm["M_S"] > 0.5), bg & (pm["M_S"] < 0.5)
    if not as_indices:
        return fg, bg
    return fg.nonzero(as_tuple=True), None if bg is None else bg.nonzero(as_tuple=True)


def feature_similarity(feats, kernel_size=3, dilation=2):
    """The official code's feature affinity (not a paper equation): S_feat(i, j) = exp(-||f_i - f_j||_2)
    between each pixel and its 8 dilated neighbours, 0 for neighbours off the map (docs/official_code.md §6.2).
    feats (B, D, H, W) -> (B, k*k-1, H, W)."""
    f = feats.float()
    diff = f[:, :, None] - losses.unfold_wo_center(f, kernel_size, dilation)            # (B, D, 8, H, W)
    on_map = losses.unfold_wo_center(torch.ones_like(f[:, :1]), kernel_size, dilation)[:, 0]  # (B, 8, H, W)
    return torch.exp(-diff.pow(2).sum(1).sqrt()) * on_map


@torch.no_grad()
def feature_affinity(t_out):
    """The official preset's pairwise factor (times BoxInst's colour similarity, threshold 0.1):
    feature_similarity of the teacher's mask features on the mask-out grid (bilinear x2, not
    normalised) -> (B, 8, Hp/s, Wp/s)."""
    f = torch.nn.functional.interpolate(t_out["mask_feats"].float(), scale_factor=2, mode="bilinear",
                                        align_corners=False)                            # (B, D, Hp/s, Wp/s)
    return feature_similarity(f)


@torch.no_grad()
def after_step(state, model, out, pm, obj, images, targets, ema=True, feats=None):
    """Prototype update (Eq. 2-5) from the student's features at confident in-box pixels, the
    memory-bank push (Eq. 11) of this batch's ordinary objects, and (ema) the teacher's EMA: once per
    optimizer step, not per accumulated micro-batch. feats: the student's unit features on the mask-out
    grid (default: from CondInst's out['mask_feats']; Mask2Former passes its own)."""
    cfg = state.cfg
    if feats is None:
        feats = prototypes.normalize_features(out["mask_feats"].detach())               # (B, D, Hp/s, Wp/s)
    fg, bg = prototype_pixels(pm, obj, cfg, as_indices=True)
    state.protos.update(feats, obj["img"], obj["cls"], fg, bg)
    # the bank's masks: the teacher's mean mask > bank_thresh (the official code), the pseudo label M_hat
    # (the paper's Fig. 4: M-hat', scored by Eq. 11 over the instance map M_I), or nanoSIM's rectified
    # map (Eq. 7, with the colour term when on) > bank_thresh
    bank_map, score_map, thresh = {"teacher": ("M_mean", None, cfg["bank_thresh"]),
                                   "pseudo": ("M_hat", "M_I", 0.5),
                                   "rectified": ("M_prob", None, cfg["bank_thresh"])}[cfg["bank_masks"]]
    if cfg["paste_prob"] > 0:  # no copy-paste: no bank
        # the ordinary objects with positives and their boxes (the windows need them): one host read
        ok = pm["has_pos"] & ~obj["pasted"]                                             # (G,)
        rows = torch.cat([ok[:, None].to(obj["boxes"].dtype), obj["boxes"]], 1).tolist()  # (G, 5)
        img = [b for b, t in enumerate(targets) for _ in range(len(t["boxes"]))]        # (G,) as obj["img"]
    for b, t in enumerate(targets if cfg["paste_prob"] > 0 else []):
        sel = [k for k, r in enumerate(rows) if r[0] and img[k] == b]                   # this image's
        sel_t = host_to_device(sel, obj["boxes"].device, torch.long)                    # (n,)
        h, w = t["size"]
        entry = copypaste.bank_entry_from_teacher(images[b, :, :h, :w], obj["boxes"][sel_t], obj["cls"][sel_t],
                                                  pm[bank_map][sel_t], (h, w), thresh, cfg["mask_out_stride"],
                                                  cfg["bank_min_box_iou"],
                                                  None if score_map is None else pm[score_map][sel_t],
                                                  cfg["bank_score_plus_one"], [rows[k][1:] for k in sel])
        state.bank.push(**entry)
    if ema:
        update_teacher(state.teacher, model, cfg["teacher_momentum"])
        state.refold()
