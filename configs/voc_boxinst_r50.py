# BoxInst, ResNet-50 on PASCAL VOC 2012 (+ SBD train_aug, 10,582 images; val 1,449): paper Tab. 2, mask
# AP 34.3 (BoxInst's own number). Layout: --data_root=datasets/voc (data.DATA_LAYOUTS["voc"], README).
# The schedule is not given in either paper: ~30 epochs of batch 16, the COCO recipe's steps at the same
# fractions (not verified here: no GPU).
exec(open("configs/coco_boxinst_r50_1x.py").read())
out_dir = "out/voc_boxinst_r50"
data_root = "datasets/voc"
dataset = "voc"
num_classes = 20
max_iters = 20000
iters_1x = 20000
lr_steps = (13300, 17800)
ckpt_interval = 2000
pairwise_warmup_iters = 2200       # the COCO recipe's share (10k of 90k)
