# SIM, ResNet-50 on PASCAL VOC 2012 + SBD: paper Tab. 2, mask AP 36.7. configs/voc_boxinst_r50.py's data
# and schedule; the BoxInst-only warm-up and the teacher start keep the COCO recipe's share of it.
# Not run here (no GPU): the paper's number is for --sim_variant=paper; the default nanosim preset was
# measured only on the 160-px synthetic demo (BENCHMARKS.md), not on this data.
exec(open("configs/coco_sim_r50_1x.py").read())
out_dir = "out/voc_sim_r50"
data_root = "datasets/voc"
dataset = "voc"
num_classes = 20
max_iters = 20000
iters_1x = 20000
lr_steps = (13300, 17800)
ckpt_interval = 2000
pairwise_warmup_iters = 2200
sim_start_iter = 2200
teacher_start_iter = 1100
