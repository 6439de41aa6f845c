# SIM, ResNet-101 with deformable convs (DCNv2) in res3-res5, 3x (paper Tab. 1, test-dev mask AP 37.4,
# there with BiFPN; nanoSIM has the plain FPN, so expect somewhat less).
# Not run here (no GPU): the paper's number is for --sim_variant=paper; the default nanosim preset was
# measured only on the 160-px synthetic demo (BENCHMARKS.md), not on this data.
exec(open("configs/coco_sim_r101_3x.py").read())
out_dir = "out/coco_sim_r101_dcn_3x"
backbone = "resnet101_dcn"
