"""
The small-scale analogue of the paper's ablations, on the embedded dataset (or any dataset: extra
arguments go to every train.py run):

  Tab. 3: BoxInst baseline / + L_pseudo / + L_pseudo + L_paste
  Tab. 4: alpha (Eq. 7) in {0, 0.5, 1}

    python ablate.py                          # the demo schedule, 5 runs one after another
    python ablate.py --max_iters=300          # shorter, e.g. for a quick look

Each run writes out/ablation/<name>/metrics.json; a run whose metrics.json exists is not repeated,
so an interrupted ablation resumes. Prints both tables (mask AP, box AP) at the end.
"""

import json
import os
import subprocess
import sys

RUNS = {  # name: train.py arguments
    "baseline": ["--method=boxinst"],
    "+pseudo": ["--method=sim", "--lambda2=0.0", "--paste_prob=0.0"],
    "+pseudo+paste": ["--method=sim"],             # also Tab. 4's alpha = 0.5
    "alpha=0": ["--method=sim", "--alpha=0.0"],
    "alpha=1": ["--method=sim", "--alpha=1.0"],
}
TABLES = [
    ("Tab. 3 (paper, COCO R50 1x mask AP: 30.7 / 31.9 / 32.2)", ["baseline", "+pseudo", "+pseudo+paste"]),
    ("Tab. 4 (paper, COCO R50 1x mask AP: 30.5 / 32.2 / 31.4)", ["alpha=0", "+pseudo+paste", "alpha=1"]),
]


def main(extra):
    root = "out/ablation"
    results = {}
    for name, args in RUNS.items():
        out_dir = os.path.join(root, name)
        path = os.path.join(out_dir, "metrics.json")
        if not os.path.isfile(path):
            cmd = [sys.executable, "train.py", *args, f"--out_dir={out_dir}", "--n_overlays=2", *extra]
            print(">>", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        with open(path) as f:
            results[name] = json.load(f)
    for title, names in TABLES:
        print(f"\n{title}\n| run | mask AP | box AP |\n|---|---|---|")
        for n in names:
            label = "alpha=0.5" if title.startswith("Tab. 4") and n == "+pseudo+paste" else n
            print(f"| {label} | {results[n]['segm']['AP']:.1f} | {results[n]['bbox']['AP']:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
