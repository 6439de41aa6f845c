# SIM, ResNet-101 with deformable convs (DCNv2) in res3-res5, 3x (paper Tab. 1, test-dev mask AP 37.4,
# there with BiFPN; nanoSIM has the plain FPN, so expect somewhat less).
exec(open("configs/coco_sim_r101_3x.py").read())
out_dir = "out/coco_sim_r101_dcn_3x"
backbone = "resnet101_dcn"
