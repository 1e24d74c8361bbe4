import pytest
import torch
import torch.nn.functional as F

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
    padded = torch.full((1, 4, 4), 255, dtype=torch.long)
    padded[0, :2] = label
    square = F.interpolate(logits, size=(4, 4), mode="bilinear", align_corners=True).argmax(1)
    assert [t.tolist() for t in intersection_union(square, padded)] == [inter.tolist(), union.tolist()]
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


# ---------------------------------------------------------------- intersection and union, exactly
def test_intersection_union_per_image_in_float64_with_the_default_ignore_label():
    pred = torch.tensor([[[1, 1], [0, 0]], [[0, 1], [1, 1]]])
    target = torch.tensor([[[1, 0], [0, 255]], [[7, 1], [1, 0]]])
    inter, union = intersection_union(pred, target)
    assert inter.dtype == union.dtype == torch.float64
    # image 0, valid px 0..2: bg I {2} U {1, 2}, fg I {0} U {0, 1}; image 1: label 7 is neither 0 nor 1
    assert inter.tolist() == [[1.0, 1.0], [0.0, 2.0]]
    assert union.tolist() == [[2.0, 2.0], [2.0, 3.0]]
    inter, union = intersection_union(pred, target, ignore_label=7)     # now 255 is scored, 7 is not
    assert inter.tolist() == [[1.0, 1.0], [0.0, 2.0]] and union.tolist() == [[3.0, 2.0], [1.0, 3.0]]


# ---------------------------------------------------------------- the three scoring modes, by hand
def test_to_original_size_upsamples_the_longer_sides_square_and_crops_top_left():
    maps = torch.tensor([[[[0.0, 2.0], [4.0, 6.0]]]])            # 1×1×2×2
    # align_corners bilinear to 3×3: corners kept, midpoints the means
    full = [[0.0, 1.0, 2.0], [2.0, 3.0, 4.0], [4.0, 5.0, 6.0]]
    assert to_original_size(maps, 3, 3).tolist() == [[full]]
    assert to_original_size(maps, 2, 3).tolist() == [[full[:2]]]                       # wide: rows cropped
    assert to_original_size(maps, 3, 2).tolist() == [[[row[:2] for row in full]]]     # tall: columns cropped
    # 2 -> 4 with align_corners: samples at 0, 1/3, 2/3, 1 (without it: 0, 1/4, 3/4, 1)
    assert to_original_size(maps, 4, 4)[0, 0, 0].tolist() == pytest.approx([0.0, 2 / 3, 4 / 3, 2.0])
    # nearest (no align_corners): 2 -> 4 repeats each value twice
    assert to_original_size(maps, 4, 4, mode="nearest")[0, 0, 0].tolist() == [0.0, 0.0, 2.0, 2.0]


def two_class_logits(fg):
    """B×2×H×W logits from a 0/1 foreground map: foreground where fg is 1."""
    fg = torch.as_tensor(fg, dtype=torch.float32)
    return torch.stack([1 - fg, fg], 1)


def test_ori_resize_scores_each_episode_at_its_own_label_size():
    logits = two_class_logits([[[1, 1], [0, 0]], [[1, 0], [1, 0]]])     # 2 episodes on a 2×2 canvas
    # episode 0: a 3×1 label (tall: square 3, column 0 kept); episode 1: a 1×3 label (row 0 kept)
    labels = [torch.tensor([[1], [1], [0]]), torch.tensor([[1, 255, 0]])]
    batch = {"query_mask_ori": labels, "query_mask": torch.zeros(2, 2, 2, dtype=torch.long)}
    inter, union, preds = score_episodes(logits, batch)
    # episode 0, canvas column 0 upsampled to 3 rows: logits (fg - bg) 1, 0, -1 -> argmax 1, 0 (tie), 0
    assert preds[0].tolist() == [[1], [0], [0]]
    # episode 1, canvas row 0 upsampled to 3 columns: 1, 0, -1 -> 1, 0, 0; the 255 pixel is not scored
    assert preds[1].tolist() == [[1, 0, 0]]
    assert inter.tolist() == [[1.0, 1.0], [1.0, 1.0]] and union.tolist() == [[2.0, 2.0], [1.0, 1.0]]
    # 0 ignored instead, and 255 scored (as neither class): episode 0 keeps rows 0-1, episode 1 pixels 0-1
    inter, union, _ = score_episodes(logits, batch, ignore=0)
    assert inter.tolist() == [[0.0, 1.0], [0.0, 1.0]] and union.tolist() == [[1.0, 2.0], [1.0, 1.0]]


def test_canvas_scoring_resizes_the_logits_to_the_label_when_they_differ():
    logits = two_class_logits([[[1, 0], [0, 0]]])                     # 1×2×2×2
    target = torch.tensor([[[1, 1, 0], [1, 255, 0], [0, 0, 0]]])      # 3×3 canvas label
    inter, union, preds = score_episodes(logits, {"query_mask": target}, ori_resize=False)
    # align_corners: fg - bg at (0,0) 1, (0,1) 0, (1,0) 0, (1,1) -0.5 ... -> only (0,0) is foreground
    assert preds[0].tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert inter.tolist() == [[5.0, 1.0]] and union.tolist() == [[7.0, 3.0]]
    inter, union, _ = score_episodes(logits, {"query_mask": target}, ignore=1, ori_resize=False)
    assert inter.tolist() == [[5.0, 0.0]] and union.tolist() == [[6.0, 0.0]]   # 255 scored (neither 0 nor 1)
    same = score_episodes(two_class_logits([[[1, 1, 0], [1, 1, 0], [0, 0, 0]]]), {"query_mask": target},
                          ori_resize=False)
    assert same[0].tolist() == [[5.0, 3.0]] and same[1].tolist() == [[5.0, 3.0]]   # a perfect prediction


def test_upsampled_scoring_aligns_corners():
    """A foreground margin of 1 and -2.5 across two columns, upsampled to four: with
    align_corners the second column samples 1/3 of the way (margin -1/6: background), without
    it 1/4 of the way (+1/8: foreground). Both the original-size and the canvas modes align corners."""
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1] = torch.tensor([1.0, -2.5])
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[:, :, :2] = 1
    for kwargs, batch in (({"ori_resize": False}, {"query_mask": target}), ({}, {"query_mask_ori": [target[0]]})):
        inter, union, preds = score_episodes(logits, batch, **kwargs)
        assert preds[0].tolist() == [[1, 0, 0, 0]] * 4, kwargs
        assert inter.tolist() == [[8.0, 4.0]] and union.tolist() == [[12.0, 8.0]]


# ---------------------------------------------------------------- pooling
def test_accumulator_slots_classes_by_id_and_sums_over_updates_exactly():
    acc = IoUAccumulator([9, 2, 5])
    acc.update(torch.tensor([5, 9]), torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64),
               torch.tensor([[2.0, 4.0], [4.0, 5.0]], dtype=torch.float64))
    acc.update(torch.tensor([5]), torch.tensor([[0.0, 1.0]], dtype=torch.float64),
               torch.tensor([[1.0, 4.0]], dtype=torch.float64))
    r = acc.result()
    assert list(r.class_iou) == ["9", "2", "5"]                    # default names, in the order given
    assert r.class_iou == pytest.approx({"9": 80.0, "2": 0.0, "5": 37.5})   # 2: no episode -> 0, not NaN
    assert r.miou == pytest.approx((80.0 + 0.0 + 37.5) / 3)
    assert r.fbiou == pytest.approx(100 * (4 / 7 + 7 / 13) / 2)   # bg 4/7, fg 7/13 over all three episodes
    assert r.episodes == 3
    acc.all_reduce()                                               # no process group: nothing changes
    assert acc.result() == r
    with pytest.raises((IndexError, RuntimeError)):
        acc.update(torch.tensor([3]), torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64))


def test_accumulator_counts_exactly_beyond_float32():
    """COCO: 4000 episodes × 473² pixels pass 2^24; the sums stay exact integers."""
    acc = IoUAccumulator([1])
    big = float(2 ** 24 + 1)                     # odd sums past 2^24 have no float32 value
    acc.update(torch.tensor([1, 1]), torch.tensor([[big, big], [2.0, 2.0]], dtype=torch.float64),
               torch.tensor([[big, big], [2.0, 2.0]], dtype=torch.float64))
    odd = 2 ** 24 + 3
    assert [t.tolist() for t in acc.tensors()] == [[odd], [odd], [odd, odd], [odd, odd], 2.0]
    assert acc.result().miou == 100.0


def _reduce_worker(rank, world, port, out_dir):
    """Each process pools its shard of the episodes below, then the sums are all-reduced."""
    from tests.test_trainer import _join_group
    _join_group(rank, world, port)
    torch.distributed.init_process_group("gloo")
    try:
        acc = IoUAccumulator([1, 2])
        ids, inter, union = SHARDED
        acc.update(ids[rank::world], inter[rank::world], union[rank::world])
        acc.all_reduce()
        torch.save([t.clone() for t in acc.tensors()], f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


SHARDED = (torch.tensor([1, 2, 2, 1, 2]),
           torch.tensor([[5.0, 1.0], [2.0, 0.0], [3.0, 3.0], [0.0, 4.0], [1.0, 1.0]], dtype=torch.float64),
           torch.tensor([[6.0, 2.0], [4.0, 3.0], [3.0, 3.0], [2.0, 5.0], [2.0, 2.0]], dtype=torch.float64))


def test_the_sums_of_two_processes_reduce_to_the_whole(tmp_path):
    import torch.multiprocessing as mp
    from tests.test_trainer import _free_port
    whole = IoUAccumulator([1, 2])
    whole.update(*SHARDED)
    whole.all_reduce()                                   # no process group here: a no-op
    assert whole.class_inter.tolist() == [5.0, 4.0] and whole.episodes.item() == 5
    mp.start_processes(_reduce_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    for rank in range(2):
        reduced = torch.load(tmp_path / f"rank{rank}.pt")
        assert [t.tolist() for t in reduced] == [t.tolist() for t in whole.tensors()]


def test_scoring_runs_on_the_logits_device_and_sums_stay_on_the_accumulators():
    """'meta' stands in for a GPU: labels come from the CPU loader, logits and sums live on the
    device given (a label left on the CPU would meet the logits in one operation and fail)."""
    acc = IoUAccumulator([1, 2], device="meta")
    assert acc.slot.device.type == "meta" and all(t.device.type == "meta" for t in acc.tensors())
    logits = torch.zeros(2, 2, 4, 4, device="meta")
    batch = {"query_mask": torch.zeros(2, 4, 4, dtype=torch.long),
             "query_mask_ori": [torch.zeros(3, 5, dtype=torch.long), torch.zeros(4, 4, dtype=torch.long)]}
    for kwargs in ({}, {"ori_resize": False}):
        inter, union, preds = score_episodes(logits, batch, **kwargs)
        assert inter.device.type == union.device.type == "meta" and all(p.device.type == "meta" for p in preds)
        acc.update(torch.tensor([1, 2]), inter, union)
