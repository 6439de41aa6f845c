# CondInst (full mask supervision, the upper bound), ResNet-50, 1x (reference: 39.7 / 35.7).
exec(open("configs/coco_boxinst_r50_1x.py").read())
out_dir = "out/coco_condinst_r50_1x"
method = "full"
bottom_pixels_removed = 10
topk_proposals_per_im = -1          # CondInst samples 500 random positives per GPU instead
max_proposals = 500
mask_out_channels = 8
