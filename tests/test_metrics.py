import pytest
import torch

from util.config import defaults
from dataset.metrics import IoUAccumulator, intersection_union, score_episodes, to_original_size


def test_intersection_union_ignores_255():
    pred = torch.tensor([[[1, 1, 0, 0], [1, 0, 0, 1]]])
    target = torch.tensor([[[1, 0, 0, 255], [1, 1, 0, 0]]])
    inter, union = intersection_union(pred, target)
    # valid pixels: 7. fg: pred {0,1,4,7}, target {0,4,5}; bg: pred {2,5,6}, target {1,2,6,7}
    assert inter.tolist() == [[2.0, 2.0]]
    assert union.tolist() == [[5.0, 5.0]]


def test_class_miou_sums_over_episodes_then_averages_classes_and_fbiou_sums_everything():
    acc = IoUAccumulator([1, 2, 3])
    # episode (class, fg I, fg U, bg I, bg U)
    eps = [(1, 3, 4, 10, 12), (1, 1, 4, 5, 5), (2, 0, 5, 7, 9), (3, 6, 6, 2, 3)]
    acc.update(torch.tensor([e[0] for e in eps]),
               torch.tensor([[e[3], e[1]] for e in eps], dtype=torch.float64),
               torch.tensor([[e[4], e[2]] for e in eps], dtype=torch.float64))
    r = acc.result({1: "a", 2: "b", 3: "c"})
    # class 1: (3+1)/(4+4) = 0.5; class 2: 0/5 = 0; class 3: 6/6 = 1
    assert r.class_iou == pytest.approx({"a": 50.0, "b": 0.0, "c": 100.0})
    assert r.miou == pytest.approx(50.0)
    # fg: 10/19, bg: 24/29
    assert r.fbiou == pytest.approx(100 * (10 / 19 + 24 / 29) / 2)
    assert r.episodes == 4


def test_ori_resize_scores_on_the_original_label_padded_square():
    cfg = defaults()
    label = torch.zeros(2, 4, dtype=torch.long)
    label[:, :2] = 1                                     # left half foreground
    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 1, :, :2] = 5.0                            # predicts the left half of the canvas
    batch = {"query_mask_ori": [label], "query_mask": torch.zeros(1, 4, 4, dtype=torch.long)}
    inter, union, preds = score_episodes(logits, batch, cfg.ignore_label, cfg.ori_resize)
    assert inter.tolist() == [[4.0, 4.0]] and union.tolist() == [[4.0, 4.0]]
    assert preds[0].shape == (2, 4) and preds[0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    # cropping the upsampled square equals scoring the 255-padded square
    assert to_original_size(logits, 2, 4).shape == (1, 2, 2, 4)
    cfg.ori_resize = False                               # scored against the canvas label instead
    inter, union, _ = score_episodes(logits, batch, cfg.ignore_label, cfg.ori_resize)
    assert inter.tolist() == [[8.0, 0.0]] and union.tolist() == [[16.0, 8.0]]


def test_hsnet_scoring_is_on_the_resized_label_the_logits_already_match():
    """Under the hsnet protocol query_mask_ori is the square label of the input size, so the
    original-size path leaves the logits untouched: argmax, ignore left out."""
    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 1, :, :2] = 5.0
    label = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [255, 255, 1, 1]])
    inter, union, preds = score_episodes(logits, {"query_mask_ori": [label]}, 255, True)
    assert preds[0].tolist() == [[1, 1, 0, 0]] * 4
    # 14 scored pixels (two 255). fg: predicted 6, labelled 7, both 4 -> U 9; bg: 8, 7, both 5 -> U 10
    assert inter.tolist() == [[5.0, 4.0]] and union.tolist() == [[10.0, 9.0]]


def test_pooling_is_hsnets_class_iou_and_fb_iou():
    """HSNet's evaluator (kept by PATNet): per class, ΣI / max(ΣU, 1) of background and foreground
    rows; class mIoU the mean of the foreground row over the classes of interest (one with no
    episode counts 0); FB-IoU the mean over bg/fg of ΣI / ΣU summed over those classes. With
    integer pixel counts IoUAccumulator gives the same figures."""
    rng = torch.Generator().manual_seed(0)
    classes = [3, 5, 8, 9]                                   # 9 gets no episode
    ids = torch.tensor([3, 5, 8, 3, 5, 3, 8, 5, 3, 8])
    union = torch.randint(1, 400, (10, 2), generator=rng).double()
    inter = torch.floor(union * torch.rand(10, 2, generator=rng).double())
    inter[2, 1] = 0                                          # a missed target
    acc = IoUAccumulator(classes)
    acc.update(ids, inter, union)
    r = acc.result()
    i_buf, u_buf = torch.zeros(2, 10, dtype=torch.float64), torch.zeros(2, 10, dtype=torch.float64)
    i_buf.index_add_(1, ids, inter.T)
    u_buf.index_add_(1, ids, union.T)
    iou = (i_buf / torch.maximum(u_buf, torch.ones_like(u_buf)))[:, classes]
    miou = 100 * iou[1].mean().item()
    fbiou = 100 * (i_buf[:, classes].sum(1) / u_buf[:, classes].sum(1)).mean().item()
    assert r.class_iou["9"] == 0.0
    assert r.miou == pytest.approx(miou, rel=1e-12) and r.fbiou == pytest.approx(fbiou, rel=1e-12)
