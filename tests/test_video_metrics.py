"""J, F and their pooling (dataset/video_metrics.py) on hand-made masks with values worked out by hand,
and against DAVIS's own evaluation code (transcribed below in numpy) on varied masks."""
import math

import numpy as np
import pytest
import torch

from dataset.video_metrics import (FrameScores, VideoScoreAccumulator, boundary_f, boundary_radius, disk,
                                region_similarity, score_frames, seg2bmap)


def rows(n_rows, shape=(10, 10)):
    m = torch.zeros(shape, dtype=torch.bool)
    m[:n_rows] = True
    return m


def test_seg2bmap_of_a_square_is_offset_towards_the_origin():
    seg = torch.zeros(5, 5, dtype=torch.bool)
    seg[1:3, 1:3] = True
    expected = torch.tensor([[1, 1, 1, 0, 0],
                             [1, 0, 1, 0, 0],
                             [1, 1, 1, 0, 0],
                             [0, 0, 0, 0, 0],
                             [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(seg2bmap(seg), expected)
    assert torch.equal(seg2bmap(seg[None].repeat(3, 1, 1)), expected[None].repeat(3, 1, 1))


def test_seg2bmap_does_not_count_the_image_border():
    # DAVIS: the last row compares east only, the last column south only, the corner is 0
    assert not seg2bmap(torch.ones(4, 6, dtype=torch.bool)).any()
    assert torch.equal(seg2bmap(rows(5))[4], torch.ones(10, dtype=torch.bool))
    assert seg2bmap(rows(5)).sum() == 10


def test_radius_and_disk():
    assert boundary_radius(241, 425) == 4                  # ceil(0.008 * 488.58) = ceil(3.909)
    assert boundary_radius(20, 20) == 1
    assert boundary_radius(100, 100, bound_th=3) == 3
    assert torch.equal(disk(1), torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool))
    assert disk(2).sum() == 13 and disk(4).shape == (9, 9) and disk(4).sum() == 49


def test_j_is_iou_and_one_when_both_empty():
    a = torch.zeros(3, 4, 6, dtype=torch.bool)
    b = torch.zeros(3, 4, 6, dtype=torch.bool)
    a[0, :2, :2] = True          # 4 px inside b's 6
    b[0, :2, :3] = True
    b[2, 0, 0] = True            # frame 2: prediction empty, target not
    j = region_similarity(a, b)
    assert j.dtype == torch.float64
    assert j.tolist() == [4 / 6, 1.0, 0.0]


def test_f_precision_recall_worked_by_hand():
    # target: top 5 rows -> boundary row 4 (10 px). prediction: top 6 rows (boundary row 5,
    # 10 px) plus a 1x2 blob on row 8 (boundary (7,0) (7,1) (8,0) (8,1)): 14 boundary px.
    # radius 1: row 5 matches row 4, the blob matches nothing: precision 10/14, recall 10/10,
    # F = 2 * (5/7) * 1 / (5/7 + 1) = 5/6.
    target = rows(5)
    pred = rows(6)
    pred[8, :2] = True
    assert seg2bmap(pred).sum() == 14
    f = boundary_f(pred[None], target[None], bound_th=1)
    assert f.item() == pytest.approx(5 / 6, abs=1e-12)
    # two rows apart: no match within radius 1, everything within radius 2
    assert boundary_f(rows(7)[None], target[None], bound_th=1).item() == 0.0
    assert boundary_f(rows(7)[None], target[None], bound_th=2).item() == 1.0
    s = score_frames(pred[None], target[None])
    assert s.j.item() == pytest.approx(50 / 62) and (s.tp.item(), s.fp.item(), s.fn.item()) == (50, 12, 0)
    # the default tolerance at 10x10: ceil(0.008 * 14.14) = 1 pixel
    assert s.f.item() == pytest.approx(5 / 6, abs=1e-12)


def test_f_empty_cases_follow_davis():
    empty = torch.zeros(1, 10, 10, dtype=torch.bool)
    some = rows(5)[None]
    full = torch.ones(1, 10, 10, dtype=torch.bool)
    assert boundary_f(empty, empty).item() == 1.0     # both boundaries empty
    assert boundary_f(empty, some).item() == 0.0      # precision 1, recall 0
    assert boundary_f(some, empty).item() == 0.0      # precision 0, recall 1
    # a full mask has no boundary under seg2bmap: F is 1 against an empty one (J says 0)
    assert boundary_f(full, empty).item() == 1.0 and region_similarity(full, empty).item() == 0.0


def test_f_at_the_canvas_size_uses_the_four_pixel_disk():
    target = torch.zeros(1, 241, 425, dtype=torch.bool)
    target[0, 100:140, 100:200] = True
    for shift, expected in ((4, 1.0), (5, None)):
        pred = torch.roll(target, shifts=shift, dims=2)
        f = boundary_f(pred, target).item()
        if expected is not None:
            assert f == expected
        else:
            assert f < 1.0


def test_score_frames_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="N×H×W"):
        score_frames(torch.zeros(2, 4, 4), torch.zeros(2, 4, 5))


def fs(j, f, tp, fp, fn):
    d = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return FrameScores(d(j), d(f), d(tp), d(fp), d(fn))


def test_accumulator_pools_frames_per_class_then_averages_classes():
    acc = VideoScoreAccumulator([3, 7], num_episodes=4)
    # class 3: episode 0 (video 5) frames J 1, 0; episode 1 (video 6) one frame J 1
    acc.update(fs([1.0, 0.0], [0.5, 0.5], [2, 0], [0, 1], [0, 3]), torch.tensor([3, 3]), torch.tensor([0, 0]),
               torch.tensor([5, 5]))
    acc.update(fs([1.0], [1.0], [4], [0], [0]), torch.tensor([3]), torch.tensor([1]), torch.tensor([6]))
    # class 7: episode 3 (video 5 again) one frame
    acc.update(fs([0.25], [0.0], [1], [1], [2]), torch.tensor([7]), torch.tensor([3]), torch.tensor([5]))
    r = acc.result({3: "cat", 7: "dog"})
    # pooled over frames: (1 + 0 + 1) / 3, not the mean of the video means (0.75)
    assert r.per_class["cat"]["J"] == pytest.approx(100 * 2 / 3)
    assert r.per_class["cat"]["F"] == pytest.approx(100 * 2 / 3)
    assert r.per_class["cat"]["IoU"] == pytest.approx(100 * 6 / 10)       # (2+4) / (6 + 1 + 3)
    assert r.per_class["dog"] == {"J": 25.0, "F": 0.0, "IoU": pytest.approx(25.0), "frames": 1, "videos": 1}
    assert r.per_class["cat"]["frames"] == 3 and r.per_class["cat"]["videos"] == 2
    assert r.mean_j == pytest.approx((200 / 3 + 25) / 2)
    assert r.mean_f == pytest.approx((200 / 3 + 0) / 2)
    assert r.jf == pytest.approx((r.mean_j + r.mean_f) / 2)
    assert r.class_iou == pytest.approx((60 + 25) / 2)
    assert (r.frames, r.queries, r.videos) == (4, 3, 2)
    assert [e["episode_id"] for e in r.per_episode] == [0, 1, 3]
    assert r.per_episode[0] == {"episode_id": 0, "J": 50.0, "F": 50.0, "frames": 2}


def test_accumulator_sums_of_shards_equal_the_whole():
    torch.manual_seed(0)
    j, f = torch.rand(10, dtype=torch.float64), torch.rand(10, dtype=torch.float64)
    tp, fp, fn = (torch.randint(0, 50, (10,)).double() for _ in range(3))
    eps = torch.arange(10) // 2          # 5 queries of 2 frames, alternately of class 1 and 2
    cls = eps % 2 + 1
    whole = VideoScoreAccumulator([1, 2], 5)
    whole.update(FrameScores(j, f, tp, fp, fn), cls, eps)
    parts = [VideoScoreAccumulator([1, 2], 5) for _ in range(2)]
    for r, part in enumerate(parts):
        sel = slice(r, None, 2)
        part.update(FrameScores(j[sel], f[sel], tp[sel], fp[sel], fn[sel]), cls[sel], eps[sel])
    merged = VideoScoreAccumulator([1, 2], 5)
    merged.by_class = parts[0].by_class + parts[1].by_class
    merged.by_episode = parts[0].by_episode + parts[1].by_episode
    merged.episode_class = torch.maximum(parts[0].episode_class, parts[1].episode_class)
    a, b = whole.result(), merged.result()
    assert math.isclose(a.mean_j, b.mean_j, rel_tol=1e-12) and math.isclose(a.mean_f, b.mean_f, rel_tol=1e-12)
    for name, row in a.per_class.items():
        assert row == pytest.approx(b.per_class[name], rel=1e-12)
    assert a.per_class["1"]["videos"] == 3 and a.per_class["2"]["videos"] == 2 and a.per_class["1"]["frames"] == 6


# ---------------------------------------------------------------- DAVIS's code, as a second implementation
def davis_seg2bmap(seg):
    """seg2bmap of the DAVIS 2017 evaluation (davis2017/metrics.py, full size), in numpy."""
    seg = np.asarray(seg, bool)
    e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def davis_f(pred, gt, bound_th=0.008):
    """f_measure of the DAVIS 2017 evaluation: boundaries matched within a disk of radius
    ``bound_th`` (>= 1) or ceil(bound_th · diagonal), scipy's binary dilation for skimage's."""
    from scipy import ndimage
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    radius = bound_th if bound_th >= 1 else math.ceil(bound_th * np.linalg.norm(pred.shape))
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    disk_ = x * x + y * y <= radius * radius
    fg, gb = davis_seg2bmap(pred), davis_seg2bmap(gt)
    fg_dil, gt_dil = ndimage.binary_dilation(fg, disk_), ndimage.binary_dilation(gb, disk_)
    n_fg, n_gt = fg.sum(), gb.sum()
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision, recall = (fg & gt_dil).sum() / n_fg, (gb & fg_dil).sum() / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def davis_j(pred, gt):
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    union = (pred | gt).sum()
    return 1.0 if union == 0 else (pred & gt).sum() / union


def blobs(n, h, w, seed):
    """n random masks of a few rectangles each (some empty, some full)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), bool)
    for m in masks:
        for _ in range(rng.integers(0, 4)):
            y, x = rng.integers(0, h), rng.integers(0, w)
            m[y:y + rng.integers(1, h), x:x + rng.integers(1, w)] ^= True
    masks[0] = False
    masks[1] = True
    return masks


@pytest.mark.parametrize("bound_th", [0.008, 1, 2])
def test_a_batch_of_frames_scores_like_davis_frame_by_frame(bound_th):
    pred, gt = blobs(24, 12, 15, 0), blobs(24, 12, 15, 1)
    pred[2:5] = gt[2:5]                                   # some exact matches too
    s = score_frames(torch.from_numpy(pred), torch.from_numpy(gt), bound_th=bound_th)
    for i in range(24):
        assert torch.equal(seg2bmap(torch.from_numpy(pred[i])), torch.from_numpy(davis_seg2bmap(pred[i])))
        assert s.f[i].item() == pytest.approx(davis_f(pred[i], gt[i], bound_th), abs=1e-12), i
        assert s.j[i].item() == pytest.approx(davis_j(pred[i], gt[i]), abs=1e-12), i
        assert s.tp[i].item() == (pred[i] & gt[i]).sum() and s.fp[i].item() == (pred[i] & ~gt[i]).sum()
        assert s.fn[i].item() == (~pred[i] & gt[i]).sum()
    assert {round(v, 6) for v in s.f.tolist()} & {0.0, 1.0} and len(set(s.f.tolist())) > 5   # varied cases


def test_single_boundary_pixels_and_single_pixel_unions():
    """A lone foreground pixel at the top-left has exactly one boundary pixel (itself)."""
    one = torch.zeros(1, 10, 10, dtype=torch.bool)
    one[0, 0, 0] = True
    assert seg2bmap(one).sum() == 1
    assert boundary_f(one, one).item() == 1.0 and region_similarity(one, one).item() == 1.0
    shifted = torch.zeros(1, 10, 10, dtype=torch.bool)
    shifted[0, 5, 5] = True
    assert boundary_f(one, shifted).item() == 0.0 and region_similarity(one, shifted).item() == 0.0


def test_seg2bmap_last_column_compares_south_only():
    last = torch.zeros(4, 5, dtype=torch.bool)
    last[:, -1] = True
    expected = torch.zeros(4, 5, dtype=torch.bool)
    expected[:, -2] = True                                 # the column west of it differs from its east
    assert torch.equal(seg2bmap(last), expected)


def test_radius_uses_the_diagonal():
    assert boundary_radius(300, 10) == 3                   # ceil(0.008 * 300.17) = ceil(2.40)
    assert boundary_radius(10, 300) == 3
    assert boundary_radius(100, 100, bound_th=2.5) == 2


def test_score_frames_passes_the_tolerance_on():
    target = rows(5)[None]
    pred = rows(7)[None]                                   # boundaries two rows apart
    assert score_frames(pred, target).f.item() == 0.0      # default: 1 px at 10×10
    assert score_frames(pred, target, bound_th=2).f.item() == 1.0


def test_accumulator_edge_cases():
    acc = VideoScoreAccumulator([1, 2], num_episodes=3)
    r = acc.result()
    assert math.isnan(r.mean_j) and math.isnan(r.mean_f) and math.isnan(r.jf) and math.isnan(r.class_iou)
    assert (r.frames, r.queries, r.videos, r.per_class, r.per_episode) == (0, 0, 0, {}, [])
    # only the second class scored, no video ids given: one class in the means, no videos counted
    acc.update(fs([0.5, 0.25], [0.75, 1.0], [1, 2], [3, 0], [0, 1]), torch.tensor([2, 2]), torch.tensor([1, 1]))
    r = acc.result({1: "a", 2: "b"})
    assert list(r.per_class) == ["b"] and r.per_class["b"]["J"] == pytest.approx(37.5)
    assert r.mean_j == pytest.approx(37.5) and r.mean_f == pytest.approx(87.5)
    assert r.class_iou == pytest.approx(100 * 3 / 7)
    assert r.videos == 0 and r.queries == 1 and r.per_class["b"]["videos"] == 1
    assert r.per_episode == [{"episode_id": 1, "J": 37.5, "F": 87.5, "frames": 2}]
    with pytest.raises((IndexError, RuntimeError)):                      # not an evaluated class
        acc.update(fs([1.0], [1.0], [1], [0], [0]), torch.tensor([3]), torch.tensor([0]))
    gap = VideoScoreAccumulator([1, 3], num_episodes=1)
    with pytest.raises((IndexError, RuntimeError)):                      # nor one between them
        gap.update(fs([1.0], [1.0], [1], [0], [0]), torch.tensor([2]), torch.tensor([0]))


def _video_reduce_worker(rank, world, port, out_dir):
    from tests.test_trainer import _join_group
    _join_group(rank, world, port)
    torch.distributed.init_process_group("gloo")
    try:
        acc = VideoScoreAccumulator([1, 2], num_episodes=4)
        scores, classes, episodes, videos = SHARDED_FRAMES
        sel = slice(rank, None, world)
        acc.update(FrameScores(*(v[sel] for v in scores)), classes[sel], episodes[sel], videos[sel])
        acc.all_reduce()
        torch.save([acc.by_class, acc.by_episode, acc.episode_class, acc.episode_video], f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


# 6 frames: episode 0 (class 1, video 0) frames 0, 2; episode 1 (class 2, video 0) frame 1;
# episode 3 (class 1, video 4) frames 3, 4, 5 — each episode split over both processes or on one
SHARDED_FRAMES = ((torch.tensor([1.0, 0.5, 0.0, 0.25, 1.0, 0.5], dtype=torch.float64),
                   torch.tensor([0.5, 1.0, 0.0, 0.75, 1.0, 0.0], dtype=torch.float64),
                   torch.tensor([3.0, 1.0, 0.0, 2.0, 5.0, 0.0], dtype=torch.float64),
                   torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0, 3.0], dtype=torch.float64),
                   torch.tensor([1.0, 0.0, 4.0, 0.0, 0.0, 1.0], dtype=torch.float64)),
                  torch.tensor([1, 2, 1, 1, 1, 1]), torch.tensor([0, 1, 0, 3, 3, 3]), torch.tensor([0, 0, 0, 4, 4, 4]))


def test_the_sums_of_two_processes_reduce_to_the_whole(tmp_path):
    import torch.multiprocessing as mp
    from tests.test_trainer import _free_port
    scores, classes, episodes, videos = SHARDED_FRAMES
    whole = VideoScoreAccumulator([1, 2], num_episodes=4)
    whole.update(FrameScores(*scores), classes, episodes, videos)
    whole.all_reduce()                                   # no process group here: a no-op
    r = whole.result()
    assert (r.frames, r.queries, r.videos) == (6, 3, 2) and r.per_class["1"]["videos"] == 2
    mp.start_processes(_video_reduce_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    for rank in range(2):
        reduced = torch.load(tmp_path / f"rank{rank}.pt")
        for mine, theirs in zip(reduced, [whole.by_class, whole.by_episode, whole.episode_class, whole.episode_video]):
            assert mine.tolist() == theirs.tolist()


def test_frames_are_scored_and_pooled_on_their_device():
    """'meta' stands in for a GPU: the disk, the dilation and the sums follow the masks' device."""
    pred = torch.zeros(2, 10, 10, dtype=torch.bool, device="meta")
    s = score_frames(pred, pred.clone())
    assert all(v.device.type == "meta" for v in (s.j, s.f, s.tp, s.fp, s.fn))
    acc = VideoScoreAccumulator([1, 2], num_episodes=2, device="meta")
    assert all(t.device.type == "meta" for t in (acc.slot, acc.by_class, acc.by_episode, acc.episode_class,
                                                 acc.episode_video))
    acc.update(s, torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([0, 3]))     # ids from the CPU
    assert acc.by_class.device.type == "meta"
