# SIM-dagger on Mask2Former with a Swin-B backbone, 50 epochs on COCO 2017. The paper reports Mask2Former with
# ResNet-101 only (Tab. 1: SIM 37.4); this is that recipe with Swin-B. Not run here (no GPU).
exec(open("configs/coco_sim_m2f_r101_50e.py").read())
out_dir = "out/coco_sim_m2f_swin_b_50e"
backbone = "swin_b"
