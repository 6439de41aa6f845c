"""
The defaults of every setting, in one place: train.py starts from them, and so do bench.py, ablate.py,
eval.py, viz.py, predict.py and the tests (config.defaults()). A config file (configs/) reassigns them and
--key=value overrides them, type-checked against the default (configurator.py); a checkpoint stores the
settings its run used.

The defaults are the embedded demo: a narrow ResNet-10 FPN trained from scratch on 160 px images.
The reference (COCO R50 1x) values are in configs/.
"""

import torch

# -----------------------------------------------------------------------------
# default config: the embedded demo (see configs/ for COCO)
# I/O
out_dir = "out/demo"
log_interval = 20            # iterations between progress lines
eval_interval = 0            # iterations between evaluations (0: only at the end)
ckpt_interval = 500          # iterations between checkpoints (written atomically)
resume = False               # continue from out_dir/ckpt.pt
init_from = ""               # fine-tune: a checkpoint's weights where name and shape match (a new class count
                             # gets a fresh classifier), from iteration 0 with a fresh optimizer (not --resume)
skip_nonfinite = True        # a NaN/inf loss skips its step with a warning naming the term (False: stop)
n_overlays = 8               # PNG overlays of predictions written after the final evaluation
viz_interval = 400           # iterations between viz.py grids of val images 0-1 in out_dir/viz (0: never)
# data: data_root (a COCO or VOC tree, data.DATA_LAYOUTS), or the four paths, or neither: the
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
# model (model.py reads these; mask2former.py the backbone's four, channels_last and its own group below)
arch = "condinst"            # "condinst" (model.py: FCOS + dynamic mask head, the paper's main rows) or
                             # "mask2former" (mask2former.py: queries + Hungarian matching, Tab. 1's dagger rows)
backbone = "resnet10"         # torchvision ResNet, 1 block per stage (no ImageNet weights; COCO: resnet50)
channels_last = True         # NHWC memory format for the convolutions (faster on CPU and tensor cores)
pretrained = ""              # "" random init, "imagenet" torchvision weights, or a .pth path
backbone_norm = "bn"         # "frozen" (reference, needs pretrained) or "bn" (trainable, from scratch)
freeze_at = 0                # 2 = stem and res2 frozen (reference)
fpn_channels = 64
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
# Mask2Former (--arch=mask2former; mask2former.py reads these, and max_dets, mask_thresh, mask_out_stride:
# its box losses and SIM's maps on the stride-2 grid of the demo, its native stride 4 on COCO). The values
# here are the demo's widths; configs/coco_*_m2f_*.py set the reference's (in brackets)
conv_dim = 64                # pixel decoder width [256]
mask_dim = 64                # per-pixel embedding width D [256]: SIM's prototypes live in this space
enc_layers = 2               # deformable-attention encoder layers [6]
enc_dim_feedforward = 256    # the encoder's FFN [1024]
enc_n_points = 4             # sampling points per head per level [4]
hidden_dim = 64              # decoder width [256]
num_queries = 20             # [100]; the demo's images hold at most 9 objects, plus 3 pasted
nheads = 4                   # heads of the encoder and the decoder [8]
dim_feedforward = 256        # decoder FFN [2048]
dec_layers = 6               # masked-attention decoder layers, round-robin over 3 scales [9]
cost_class = 2.0             # matching cost: weight of -p(class) [2]
cost_projection = 5.0        # matching cost: weight of the projection dice, in place of the reference's
                             # BCE + dice on GT-mask points [5 + 5]: a box has no mask
class_weight = 2.0           # loss: class cross-entropy weight [2]
no_object_weight = 0.1       # loss: the no-object class's cross-entropy weight [0.1]
mask_weight = 5.0            # loss: weight of the mask terms (projection, pairwise, L_pseudo, L_paste), the
                             # reference's weight of its mask BCE and dice [5]; Eq. (10)'s ratios kept inside
m2f_instance_map = "matched" # SIM's M_I (Eq. 6) from the teacher's queries: "matched" (the query the matcher
                             # gives the object: one positive, weight 1) or "iou_mix" (also every query whose
                             # mask's box has IoU >= mix_iou with the object's box, weighted by Eq. 6)
mix_iou = 0.5                # iou_mix: the IoU a query's mask box needs to join an object's mix
# method and losses
method = "sim"               # sim (the main job) | boxinst (SIM's baseline: boxes alone) | full (GT masks)
mask_fraction = 0.0          # sim/boxinst: train these objects from their GT mask (a seeded draw per annotation;
                             # 1.0: every mask the json has, the other annotations from their box); 0: boxes only
gt_mask_weight = 4.0         # with mask_fraction: a positive with a GT mask weighs this many box-only positives in
                             # the shares of the mask loss (the total stays one mask loss; losses.mask_shares).
                             # 1: every positive the same; 4: +1.15 mask AP at 10% masks, 2 seeds (BENCHMARKS.md 12)
color_thresh = 0.3           # BoxInst: pairwise pixels need colour similarity >= this
pairwise_warmup_iters = 400  # the pairwise weight ramps 0 -> 1 (reference: 10000)
collapse_fill = 0.9          # warn once when the positives' masks fill more than this share of their boxes (mean
                             # over a log interval after the pairwise ramp: the masks became boxes); 0: never
# SIM (--method=sim). sim_variant picks a preset (sim.PRESETS: nanosim | paper | official) that sets
# the knobs marked [preset] below; a knob named on the command line wins, a config file's value does not
# (a config sets its schedule, the preset its method). The values written here are nanosim's.
sim_variant = "nanosim"
sim_start_iter = 700         # Eq. (10): L_pseudo and L_paste from this iteration on (COCO: 10000)
teacher_start_iter = 400     # teacher copied from the student, prototypes and bank start (COCO: 5000)
iters_1x = 1600              # this recipe's 1x schedule (COCO: 90000): the official ramp spans 3x it
teacher_momentum = 0.99      # momentum teacher EMA (paper and official presets: 0.9999; COCO configs: 0.9999)
teacher_fold_bn = True       # the teacher's forwards run with its BatchNorms folded into its convs (model.fold_batchnorm)
teacher_bf16 = True          # [preset] the teacher's forward in bfloat16 where the device has bf16 kernels
                             # (sim.teacher_autocast; paper/official: float32)
num_subcenters = 10          # L: sub-centres per class
proto_momentum = 0.99        # gamma, Eq. (4) (paper and official presets: 0.999; COCO configs: 0.999)
centroid_norm = True         # [preset] Eq. (5)'s centroid l2-normalised before Eq. (4) (official; the paper: the plain mean)
proto_pixels = "teacher"     # [preset] pixels that update the prototypes: "teacher" (teacher's mean mask >
                             # proto_conf_thresh in the box, official) or "pseudo" (M_hat = 1: the paper's Sec. 3.2.1)
pseudo_region = "box"        # [preset] Eq. (1)/(7) and the thresholds "box": inside the box (official, nanosim) or
                             # "image": on every pixel, as the paper writes them
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
lambda1_ramp_iters = -1      # [preset] lambda1 ramps linearly over this many iterations (0: a step; -1: over
                             # sim_start_iter - teacher_start_iter, the teacher's head start: 300 here, 5000 on COCO)
lambda1_ramp_origin = -1     # [preset] where the ramp starts (-1: sim_start_iter; official: 0)
lambda2 = 1.0                # [preset] Eq. (10) weight of L_paste
bank_size = 100              # [preset] copy-paste memory bank (images per process)
bank_thresh = 0.7            # teacher mask > this = an object's pseudo mask in the bank
bank_masks = "teacher"       # [preset] the bank's pseudo masks: "teacher" (its mean mask > bank_thresh, official),
                             # "pseudo" (M_hat, Fig. 4's M-hat') or "rectified" (M_prob > bank_thresh)
bank_score_plus_one = True   # [preset] Eq. (11)'s score divides by sum(M_hat) + 1 (official) or sum(M_hat) (the paper's mean)
bank_min_box_iou = 0.8       # [preset] pseudo masks whose tight box has IoU < this with the GT box stay out
paste_prob = 0.5              # [preset] copy-paste probability per image (the paper: every iteration, 1.0)
paste_max_objects = 3
paste_fraction = 0.5         # [preset] objects pasted per image: clamp(floor(fraction x N), 1, paste_max_objects)
                             # (official: half; the paper's Sec. 4.1: a quarter)
paste_score_power = 3        # [preset] objects drawn with probability ~ score^power (official: 3; the paper: 1)
paste_reduction = "mean"     # [preset] Eq. (9) in its bce_dice form: "mean" over pasted positives or "sum" (as written)
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
lr_schedule = "step"         # "step": x0.1 at each of lr_steps (detectron2's WarmupMultiStep, the CondInst
                             # reference) or "poly": lr (1 - it / max_iters)^poly_power after the warm-up
                             # (detectron2's WarmupPolyLR: the SIM supplement's schedule for Mask2Former)
poly_power = 0.9
backbone_lr_mult = 1.0       # the backbone's lr factor (Mask2Former reference, ImageNet weights: 0.1)
clip_grad = 0.0              # clip the whole model's gradient L2 norm to this (0: off; Mask2Former reference: 0.01)
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
amp = True                   # autocast on CUDA (ignored on CPU)
amp_dtype = "bfloat16"       # or "float16" (with a GradScaler)
seed = 0
dist_timeout_min = 60        # how long a rank waits in a collective: covers rank 0 alone scoring COCO's val
                             # (COCOeval, json, pictures) while the others wait; NCCL's default is 10 min
# -----------------------------------------------------------------------------


def defaults():
    """The settings above as a fresh dict, in their order: each script changes its own copy (config files,
    --key=value, what the run finds out such as num_classes), never these."""
    return {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple))}
