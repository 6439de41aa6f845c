# BoxInst, ResNet-101, 3x (paper Tab. 1, test-dev mask AP 33.2; AdelaiDet MS_R_101_3x).
exec(open("configs/coco_boxinst_r50_1x.py").read())
out_dir = "out/coco_boxinst_r101_3x"
backbone = "resnet101"
lr_steps = (210000, 250000)
max_iters = 270000
