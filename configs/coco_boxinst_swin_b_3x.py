# BoxInst, Swin-B with FPN, 3x (paper Tab. 1, test-dev mask AP 37.9). With Swin the paper uses AdamW at
# lr 1e-4 (Sec. 4.1); the weight decay 0.05 is Swin's usual one (not stated in the paper).
exec(open("configs/coco_boxinst_r101_3x.py").read())
out_dir = "out/coco_boxinst_swin_b_3x"
backbone = "swin_b"
freeze_at = 0
solver = "adamw"
lr = 1e-4
weight_decay = 0.05
