# SIM, ResNet-101 on PASCAL VOC 2012 + SBD: paper Tab. 2, mask AP 38.6.
# Not run here (no GPU): the paper's number is for --sim_variant=paper; the default nanosim preset was
# measured only on the 160-px synthetic demo (BENCHMARKS.md), not on this data.
exec(open("configs/voc_sim_r50.py").read())
out_dir = "out/voc_sim_r101"
backbone = "resnet101"
