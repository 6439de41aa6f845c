# BoxInst, ResNet-50, 3x schedule (reference: box AP 41.5 / mask AP 31.8 on val2017).
exec(open("configs/coco_boxinst_r50_1x.py").read())
out_dir = "out/coco_boxinst_r50_3x"
lr_steps = (210000, 250000)
max_iters = 270000
