# BoxInst, ResNet-101 on PASCAL VOC 2012 + SBD: paper Tab. 2, mask AP 36.5.
exec(open("configs/voc_boxinst_r50.py").read())
out_dir = "out/voc_boxinst_r101"
backbone = "resnet101"
