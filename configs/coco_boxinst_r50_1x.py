# BoxInst, ResNet-50, 1x schedule on COCO 2017: AdelaiDet's configs/BoxInst/MS_R_50_1x.yaml.
# torchrun --nproc_per_node=8 train.py configs/coco_boxinst_r50_1x.py
# Batch 16 = 8 processes x 2 images. With fewer GPUs: --linear_scaling=True scales lr and every iteration
# count to your global batch (step.scale_schedule), or --accum_steps=N accumulates N micro-batches.
# Reference: box AP 39.4 / mask AP 30.7 on val2017.
out_dir = "out/coco_boxinst_r50_1x"
data_root = "datasets/coco"          # train2017/, val2017/, annotations/instances_{train,val}2017.json
min_size_train = (640, 672, 704, 736, 768, 800)
scale_per_batch = False             # the reference draws a scale per image
max_size_train = 1333
min_size_test = 800
max_size_test = 1333
batch_size = 2                      # per GPU
reference_batch = 16                # the recipe's global batch: --linear_scaling=True adapts lr and schedule to yours
num_workers = 4
bottom_pixels_removed = 10
method = "boxinst"
# model: the reference
backbone = "resnet50"
pretrained = "imagenet"
backbone_norm = "frozen"
freeze_at = 2
channels_last = False
sizes_of_interest = (64, 128, 256, 512)
fpn_channels = 256
head_convs = 4
mask_branch_channels = 128
mask_branch_convs = 4
mask_out_stride = 4                 # mask branch at stride 8 (P3-P5), logits and BoxInst losses at stride 4
# schedule: the reference's SGD
pairwise_warmup_iters = 10000
solver = "sgd"
lr = 0.01
momentum = 0.9
weight_decay = 1e-4
warmup_factor = 0.001
warmup_iters = 1000
lr_steps = (60000, 80000)
max_iters = 90000
iters_1x = 90000                    # the 1x schedule's length (3x configs keep it: the official SIM ramp is 3x it)
ckpt_interval = 5000
eval_interval = 0
viz_interval = 5000                 # rank 0 draws 2 val images while the others wait: rarely
log_interval = 20
