# SIM, ResNet-101 on PASCAL VOC 2012 + SBD: paper Tab. 2, mask AP 38.6.
exec(open("configs/voc_sim_r50.py").read())
out_dir = "out/voc_sim_r101"
backbone = "resnet101"
