# SIM, ResNet-101, 3x (paper, test-dev mask AP 35.3).
# Not run here (no GPU): the paper's number is for --sim_variant=paper; the default nanosim preset was
# measured only on the 160-px synthetic demo (BENCHMARKS.md), not on this data.
exec(open("configs/coco_sim_r50_1x.py").read())
out_dir = "out/coco_sim_r101_3x"
backbone = "resnet101"
lr_steps = (210000, 250000)
max_iters = 270000
