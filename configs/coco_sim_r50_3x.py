# SIM, ResNet-50, 3x. The paper reports ResNet-50 at 1x only (Tab. 3, val2017 mask AP 32.2); BoxInst's
# R50 3x is 31.8 (configs/coco_boxinst_r50_3x.py): this row is SIM's counterpart of it.
# Not run here (no GPU): the paper's number is for --sim_variant=paper; the default nanosim preset was
# measured only on the 160-px synthetic demo (BENCHMARKS.md), not on this data.
exec(open("configs/coco_sim_r50_1x.py").read())
out_dir = "out/coco_sim_r50_3x"
lr_steps = (210000, 250000)
max_iters = 270000
