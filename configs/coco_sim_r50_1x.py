# SIM, ResNet-50, 1x schedule on COCO 2017: BoxInst R50 1x plus SIM with the paper's constants.
# torchrun --nproc_per_node=8 train.py configs/coco_sim_r50_1x.py
# Paper (Tab. 3, val2017 mask AP): BoxInst 30.7 -> + L_pseudo 31.9 -> + L_paste 32.2.
exec(open("configs/coco_boxinst_r50_1x.py").read())
out_dir = "out/coco_sim_r50_1x"
method = "sim"
sim_start_iter = 10000       # 10k iterations of BoxInst losses only, then all of Eq. (10)
teacher_start_iter = 5000    # teacher copied from the student; prototypes and bank warm up before 10k
teacher_momentum = 0.9999
num_subcenters = 10          # L
proto_momentum = 0.999       # gamma, Eq. (4)
tau = 0.1                    # Eq. (1)
mu = 5.0                     # Eq. (6)
alpha = 0.5                  # Eq. (7)
tau_low = 0.3
tau_high = 0.7
lambda1 = 0.5
lambda2 = 1.0
bank_size = 100              # images per process
paste_prob = 0.5
