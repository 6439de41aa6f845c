"""export.py: the batched dynamic mask head against model.py's, the ONNX graph against PyTorch under
onnxruntime on embedded val images (both mask strides, full-resolution and stride masks), its output
contract, an image batch with no detection, and the CLI's --check. The onnx tests skip where onnx or
onnxruntime is missing."""

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

import data
import export
import synthetic
from model import build_model, dynamic_mask_head, num_dynamic_params
from test_model import tiny_cfg

HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason=f"onnx/onnxruntime not installed — {export.PIP_HINT}")

# two networks: the reference mask stride 4 (mask branch on P3-P5, full-resolution masks upsampled x4 in
# the graph) and the demo's stride 2 (P2, masks exported at the mask-out stride)
NETS = {"stride4_full_res": (dict(), True),
        "stride2_stride_masks": (dict(mask_out_stride=2, backbone="resnet10", channels_last=True), False)}


def untrained(seed=0, **kw):
    """A random tiny network with class bias 0, so every image has detections (up to max_dets), and
    boxes 1-3 strides from their location in each direction, so neighbours overlap with IoUs on both
    sides of nms_thresh and NMS decides which detections stay."""
    torch.manual_seed(seed)
    model = build_model(tiny_cfg(num_classes=5, **kw)).eval()
    torch.nn.init.zeros_(model.head.cls_logits.bias)
    torch.nn.init.normal_(model.head.bbox_pred.weight, std=0.1)
    torch.nn.init.constant_(model.head.bbox_pred.bias, 2.0)
    return model


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    """A 3-image embedded val split, its dataset at the demo's test size and one padded batch of it."""
    root = tmp_path_factory.mktemp("export")
    paths = synthetic.ensure_synthetic(str(root / "synthetic"), n_train=1, n_val=3)
    ds = data.CocoBoxDataset(paths["val_json"], paths["val_images"], train=False, min_sizes=(160,), max_size=320,
                             with_masks=False)
    images, targets = data.collate([ds[i] for i in range(len(ds))])
    return dict(root=root, ds=ds, images=images, targets=targets, **paths)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (model, ExportModule, onnxruntime session, full_res) for each of NETS."""
    if not HAVE_ONNX:
        pytest.skip(f"onnx/onnxruntime not installed — {export.PIP_HINT}")
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, (kw, full_res) in NETS.items():
        model = untrained(**kw)
        path = str(root / f"{name}.onnx")
        module = export.export_onnx(model, path, full_res=full_res)
        out[name] = (model, module, export.ort_session(path), full_res)
    return out


def test_batched_dynamic_mask_head_matches_model_py():
    """K instances per image in one batched call = model.dynamic_mask_head on the same instances listed
    image by image (its split by image, argsort and per-image matmuls)."""
    g = torch.Generator().manual_seed(0)
    B, K, D, H, W = 2, 3, 16, 6, 7
    feats = torch.randn(B, D, H, W, generator=g)
    params = torch.randn(B, K, num_dynamic_params(D), generator=g)
    locs = torch.rand(B, K, 2, generator=g) * 60
    levels = torch.randint(0, 5, (B, K), generator=g)
    soi = [16, 32, 64, 128, 256]
    got = export.batched_dynamic_mask_head(feats, params, locs, levels, soi, stride=8)               # (B, K, 2H, 2W)
    # model.py's head with the instances interleaved across images (its order must not matter)
    perm = torch.tensor([0, 3, 1, 4, 2, 5])
    im = torch.arange(B).repeat_interleave(K)[perm]
    ref = dynamic_mask_head(feats, params.flatten(0, 1)[perm], im, locs.flatten(0, 1)[perm],
                            levels.flatten()[perm], soi, stride=8)[:, 0]                             # (BK, 2H, 2W)
    assert got.shape == (B, K, 2 * H, 2 * W)
    torch.testing.assert_close(got.flatten(0, 1)[perm], ref, rtol=0, atol=1e-5)


def test_export_module_equals_model_predict(val):
    """In PyTorch, ExportModule's fixed-shape outputs through to_predictions are model.predict's
    detections: the same boxes, scores and labels, masks equal but for pixels within 1e-4 of the mask
    threshold (float rounding of the other summation order)."""
    model = untrained(mask_out_stride=2, backbone="resnet10", channels_last=True)
    module = export.ExportModule(model, full_res=True).eval()
    with torch.no_grad():
        outs = module(val["images"])
        ref = module.net.predict(val["images"], val["targets"])
    probs = export.to_predictions(outs, val["targets"], mask_thresh=None)
    preds = export.to_predictions(outs, val["targets"], mask_thresh=0.5)
    for p, q, r in zip(preds, probs, ref):
        assert len(r["boxes"]) > 10 and len(p["boxes"]) == len(r["boxes"])
        i, j = export.matched_slots(p["boxes"], p["labels"], r["boxes"], r["labels"], tol=1e-4)
        assert len(i) == len(r["boxes"]) and len(set(j.tolist())) == len(j)
        torch.testing.assert_close(p["scores"][i], r["scores"][j], rtol=0, atol=1e-6)
        differ = p["masks"][i] != r["masks"][j]
        assert ((q["masks"][i] - 0.5).abs()[differ] < 1e-4).all()


@needs_onnx
@pytest.mark.parametrize("name", list(NETS))
def test_onnxruntime_matches_pytorch(exported, val, name):
    """onnxruntime on the 3 val images: the same detections as PyTorch's ExportModule (boxes within
    1e-3 px, labels, scores within 1e-5), mask probabilities within 1e-4 everywhere, and after
    to_predictions model.predict's detections, masks equal but for pixels at the threshold."""
    model, module, sess, full_res = exported[name]
    upsample = 1 if full_res else model.mask_out_stride
    images, targets = val["images"], val["targets"]
    with torch.no_grad():
        out_t = module(images)
        ref = module.net.predict(images, targets)
    out_o = [torch.from_numpy(o) for o in sess.run(None, {"images": images.numpy()})]
    assert out_o[4].tolist() == out_t[4].tolist() and min(out_t[4].tolist()) > 10
    for b in range(len(images)):
        n = int(out_t[4][b])
        i, j = export.matched_slots(out_t[0][b, :n], out_t[2][b, :n], out_o[0][b, :n], out_o[2][b, :n], tol=1e-3)
        assert len(i) == n and len(set(j.tolist())) == n
        torch.testing.assert_close(out_o[1][b, j], out_t[1][b, i], rtol=0, atol=1e-5)
        assert (out_o[3][b, j] - out_t[3][b, i]).abs().max() <= 1e-4
    probs = export.to_predictions(out_o, targets, mask_thresh=None, upsample=upsample)
    for q, r in zip(probs, ref):
        i, j = export.matched_slots(q["boxes"], q["labels"], r["boxes"], r["labels"], tol=1e-3)
        assert len(i) == len(r["boxes"]) == len(q["boxes"])
        differ = (q["masks"][i] > 0.5) != r["masks"][j]
        assert ((q["masks"][i] - 0.5).abs()[differ] < 1e-4).all()


@needs_onnx
def test_onnx_contract(exported, val):
    """The file's inputs and outputs: names, dtypes, shapes for another batch size and image size
    (dynamic axes), scores descending and 0 past num_dets, labels in range, probabilities in [0, 1]."""
    model, module, sess, _ = exported["stride4_full_res"]
    assert [i.name for i in sess.get_inputs()] == ["images"]
    assert [o.name for o in sess.get_outputs()] == list(export.OUTPUT_NAMES)
    images = torch.nn.functional.pad(val["images"][:2], (0, 32, 0, 64))                       # (2, 3, 224, 224 or 256)
    boxes, scores, labels, masks, num = sess.run(None, {"images": images.numpy()})
    B, K, (Hp, Wp) = 2, model.cfg["max_dets"], images.shape[-2:]
    assert (boxes.shape, scores.shape, labels.shape, masks.shape, num.shape) == ((B, K, 4), (B, K), (B, K),
                                                                                 (B, K, Hp, Wp), (B,))
    assert (boxes.dtype, scores.dtype, labels.dtype, masks.dtype, num.dtype) == (np.float32, np.float32, np.int64,
                                                                                 np.float32, np.int64)
    for b in range(B):
        n = int(num[b])
        assert 0 < n <= K
        assert (np.diff(scores[b, :n]) <= 0).all() and (scores[b, :n] > model.cfg["score_thresh"] ** 0.5).all()
        assert (scores[b, n:] == 0).all() and (boxes[b, n:] == 0).all() and (labels[b, n:] == 0).all()
        assert ((labels[b] >= 0) & (labels[b] < 5)).all() and (masks[b] >= 0).all() and (masks[b] <= 1).all()


@needs_onnx
def test_no_detection(tmp_path, val):
    """A network whose scores are all below score_thresh: num_dets 0, every slot empty, to_predictions
    gives each image empty results of its original size."""
    model = untrained()
    torch.nn.init.constant_(model.head.cls_logits.bias, -20.0)
    path = str(tmp_path / "none.onnx")
    export.export_onnx(model, path)
    outs = export.ort_session(path).run(None, {"images": val["images"].numpy()})
    assert outs[4].tolist() == [0, 0, 0] and (outs[1] == 0).all()
    preds = export.to_predictions(outs, val["targets"])
    assert [tuple(p["masks"].shape) for p in preds] == [(0, *t["orig_size"]) for t in val["targets"]]


@needs_onnx
def test_cli_check(val, tmp_path, capsys):
    """export.py --ckpt --out --check on a checkpoint whose config names the 3-image val split: writes the
    file, reports max |diff| <= 1e-4 and equal APs of PyTorch and onnxruntime, exits 0."""
    model = untrained(mask_out_stride=2, backbone="resnet10", channels_last=True)
    cfg = dict(model.cfg, val_json=val["val_json"], val_images=val["val_images"], min_size_test=160, max_size_test=320)
    with open(val["val_json"]) as f:
        cats = json.load(f)["categories"]
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "config": cfg, "categories": cats, "iter": 0}, ckpt)
    out = tmp_path / "m.onnx"
    assert export.main([f"--ckpt={ckpt}", f"--out={out}", "--check=True"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "check passed" in text
    diff = float(text.split("(onnxruntime vs PyTorch, same detections) ")[1].split(";")[0])
    assert diff <= 1e-4


def test_missing_onnxruntime_says_what_to_install(monkeypatch):
    """Without onnxruntime the CLI stops with one line naming the pip command."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(SystemExit, match="pip install onnx onnxruntime"):
        export.require_onnx()
