"""
Refining the mask of a given box at prediction time (predict.py --boxes): the network's mask
probabilities in, a better mask out, from what the box and the image's colours say. Plain PyTorch on
any device, every step batched over the boxes of an image. Each step is a switch of predict.py's:

  flip     test-time horizontal flip: the network run on the mirrored image and boxes too, its
           probabilities mirrored back and averaged with the plain ones (average_flipped)
  colour   a colour model of the object against its surroundings (colormap.color_map: nearest
           colour samples of the box and of a ring around it) mixed into the probabilities, as
           GrabCut's colour models and nanoSIM's Eq. (7) M_C (colour_prior)
  crf      a few mean-field steps of a CRF on the box: the probabilities as the unary term, a Potts
           pairwise term on a local neighbourhood weighted by BoxInst's Lab colour affinity, every
           pixel outside the box fixed to background (crf_mean_field)
  score    the mask's score: detection score x the mask's mean confidence (SOLO's maskness), so that
           mask AP ranks sure masks before unsure ones (maskness)

Why at prediction time: the box is given, so everything outside it is background and the colours
just inside and outside it are evidence the network's low-resolution dynamic masks do not use.
"""

import torch
import torch.nn.functional as F

import colormap
from losses import rgb_to_lab, unfold_wo_center


def box_region(boxes, h, w):
    """Pixels whose centres lie strictly inside each box (the convention of predict.py's cut to the
    box): boxes (N, 4) xyxy in pixels -> (N, h, w) bool."""
    xs = torch.arange(w, device=boxes.device, dtype=boxes.dtype) + 0.5
    ys = torch.arange(h, device=boxes.device, dtype=boxes.dtype) + 0.5
    return ((xs[None, None] > boxes[:, 0, None, None]) & (xs[None, None] < boxes[:, 2, None, None])
            & (ys[None, :, None] > boxes[:, 1, None, None]) & (ys[None, :, None] < boxes[:, 3, None, None]))


def average_flipped(probs, probs_flipped):
    """Test-time flip averaging: probs (N, h, w) from the image, probs_flipped (N, h, w) from the
    horizontally mirrored image (and boxes), still in the mirrored frame -> their mean in the image's
    frame. The network is trained with random horizontal flips, so both are predictions of the same
    mask; their mean has less variance than either."""
    return 0.5 * (probs + probs_flipped.flip(-1))


def color_affinity(image, kernel_size=5, dilation=1, theta=2.0):
    """BoxInst's colour affinity, on every pixel: a_ij = exp(-||Lab_i - Lab_j||_2 / theta) between
    pixel i and each neighbour j on a dilated kernel_size x kernel_size grid (centre left out), 0 for
    neighbours off the image. image (3, h, w) RGB 0-255 -> (K, h, w), K = kernel_size^2 - 1, in the
    neighbour order of losses.unfold_wo_center. BoxInst's theta is 2 (its colour-similarity
    threshold 0.3 is 2.4 Lab units)."""
    lab = rgb_to_lab(image[None].float())                                                  # (1, 3, h, w)
    diff = lab[:, :, None] - unfold_wo_center(lab, kernel_size, dilation)                   # (1, 3, K, h, w)
    on_image = unfold_wo_center(torch.ones_like(lab[:, :1]), kernel_size, dilation)[:, 0]  # (1, K, h, w)
    return (torch.exp(-diff.pow(2).sum(1).sqrt() / theta) * on_image)[0]                   # (K, h, w)


def crf_mean_field(probs, affinity, region, weight=1.0, iters=5, kernel_size=5, dilation=1, eps=1e-4):
    """Mean-field inference in a binary CRF restricted to the box (Kraehenbuehl & Koltun's update with a
    Potts compatibility, its dense Gaussian kernel replaced by a local neighbourhood weighted by
    BoxInst's colour affinity): energy sum_i -log P_i(x_i) + weight * sum_(i,j) a_ij [x_i != x_j], where
    P is the network's probability; each step sets
        Q_i = sigmoid( logit(P_i) + weight * sum_j a_ij (2 Q_j - 1) ),
    then Q = 0 outside the box (the box is the annotation: nothing outside it is the object; a
    neighbour outside the box votes for background).
    probs (N, h, w) in [0, 1], affinity (K, h, w) from color_affinity (same kernel_size, dilation),
    region (N, h, w) bool -> Q (N, h, w). Pixels of similar colour are pulled to the same label, so a
    wrong pixel among neighbours of its colour is outvoted and the mask's edges move to colour edges."""
    unary = torch.logit(probs.float().clamp(eps, 1 - eps))                                  # (N, h, w)
    region = region.to(unary.dtype)
    q = probs.float() * region
    h, w = q.shape[-2:]
    pad = dilation * (kernel_size // 2)
    taps = [(i * dilation, j * dilation) for i in range(kernel_size) for j in range(kernel_size)
            if i * kernel_size + j != kernel_size * kernel_size // 2]                     # unfold_wo_center's order
    for _ in range(iters):
        # one neighbour at a time (no (N, K, h, w) tensor: at 800 x 1333 px that is GBs for a few boxes);
        # off-image neighbours read 0 (the zero padding) and have affinity 0 anyway
        vote = F.pad(2 * q - 1, (pad, pad, pad, pad))                                      # (N, h+2p, w+2p)
        message = torch.zeros_like(q)
        for a, (dy, dx) in zip(affinity, taps):
            message += a * vote[:, dy:dy + h, dx:dx + w]
        q = torch.sigmoid(unary + weight * message) * region
    return q


def colour_prior(image, probs, region, weight=0.7, seeds="box", conf=0.7, ring=3, n_seeds=64, t=2.0,
                 min_contrast=6.0):
    """The network's probabilities mixed with a colour model of each object against its surroundings:
    P' = (1 - weight) P + weight M_C in the box, M_C = colormap.color_map: the distance of a pixel's Lab
    colour to the nearest of up to n_seeds object colour samples against that to the nearest background
    sample. Background samples: a ring of `ring` pixels around the box and the box's pixels the network
    is sure are background (P < 1 - conf), as colormap.color_seeds picks them. Object samples:
    seeds="box", every pixel in the box (GrabCut's initialisation: the box holds the object), or
    seeds="network", the network's confident pixels (P > conf; nanoSIM's Eq. (7) M_C); either way
    samples within min_contrast Lab units of a ring colour are dropped (background inside the box).
    Why "box": a network unsure of an object gives it no confident pixel, and a colour model without
    object samples says nothing (M_C = 0.5); the box's own colours that the ring lacks are the object's.
    image (3, h, w) RGB 0-255, probs (N, h, w), region (N, h, w) bool (the boxes) -> (N, h, w); outside
    the box the probabilities are kept (the CRF or the cut to the box zero them)."""
    if len(probs) == 0 or weight == 0:
        return probs
    if seeds not in ("box", "network"):
        raise ValueError(f"refine.colour_prior: seeds={seeds!r} — fix: 'box' or 'network'")
    lab = rgb_to_lab(image[None].float())                                                  # (1, 3, h, w)
    fg, bg, around = colormap.color_seeds(region, probs, torch.ones_like(probs), conf, ring)  # (N, h, w) each
    if seeds == "box":
        fg = region
    m_c = colormap.color_map(lab, fg, bg, region, n_seeds, t, around, min_contrast,
                             img=torch.zeros(len(probs), dtype=torch.long, device=probs.device))
    return torch.where(region, (1 - weight) * probs + weight * m_c, probs)


def maskness(probs, thresh=0.5):
    """SOLO's maskness: the mean probability over the pixels the mask keeps (P > thresh); 0 for an empty
    mask. probs (N, h, w) -> (N,). A box's detection score says how sure the network is of the class
    and the box, not of the mask; times maskness, mask AP ranks confident masks first."""
    keep = probs > thresh
    return (probs * keep).flatten(1).sum(1) / keep.flatten(1).sum(1).clamp(min=1)


def refine_box_probs(image, probs, boxes, crf=True, colour=True, crf_weight=1.0, crf_iters=5, crf_kernel=5,
                     crf_dilation=1, crf_theta=2.0, colour_weight=0.7, colour_seeds="box"):
    """One image's refinement: image (3, h, w) RGB 0-255, probs (N, h, w) the network's (flip-averaged)
    probabilities in the image's frame, boxes (N, 4) xyxy in that frame -> (N, h, w) probabilities, 0
    outside the boxes. colour_prior, then crf_mean_field, each where switched on."""
    region = box_region(boxes, *probs.shape[-2:])                                           # (N, h, w)
    if colour:
        probs = colour_prior(image, probs, region, colour_weight, colour_seeds)
    if crf and len(probs):
        probs = crf_mean_field(probs, color_affinity(image, crf_kernel, crf_dilation, crf_theta), region,
                               crf_weight, crf_iters, crf_kernel, crf_dilation)
    return probs * region
