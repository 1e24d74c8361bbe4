"""The video network under DDP and with the reference's train-mode BatchNorm: two processes
train exactly as one with the same global batch, and ``fix_bn False`` makes the reference's
separate backbone passes (query frames, then supports); two processes evaluate exactly as one."""
import copy
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from engine.trainer import Trainer
from engine.networks import build_model
from model.modules import prior_mask
from model.ops import resize
from tests.conftest import assert_ranks_equal_one_process
from tests.test_trainer import _free_port, _join_group, no_dropout, weights
from tests.test_video_model import clip_episode, video_cfg
from tests.video_fixtures import synthetic_video_tree  # noqa: F401 (fixture)
from util.distributed import DistInfo


def tiny_video_cfg(root, save_path, **over):
    """Two training iterations of the video network on the tiny synthetic video tree."""
    cfg = video_cfg(data_root=root, save_path=str(save_path), workers=0, clip_len=2, video_h=17, video_w=29,
                    samples_per_class=2, shot=2, batch_size=4, epochs=1, epoch_size=8, base_lr=0.005,
                    power=0.0, manual_seed=11, print_freq=1, evaluate=False, tb_images=0,
                    freeze_backbone=False, fix_bn=True, video_bg_dim=8, reduce_dim=8)
    cfg.update(over)
    return cfg


def _ddp_worker(rank, world, port, root, out_dir):
    _join_group(rank, world, port)
    from util.distributed import cleanup, init_distributed
    info = init_distributed("cpu")
    try:
        t = Trainer.from_cfg(tiny_video_cfg(root, os.path.join(out_dir, "ddp")), info)
        no_dropout(t.model)
        t.train()
        torch.save({"weights": weights(t.model), "optimizer": t.optimizer.state_dict()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        cleanup()


def test_two_video_processes_match_one_with_the_same_global_batch(synthetic_video_tree, tmp_path):  # noqa: F811
    """SGD for the head and Adam for the attention blocks, both on DDP's averaged gradients: the
    weights and both optimisers' states after two steps equal one process's."""
    _, root = synthetic_video_tree
    torch.set_num_threads(1)
    single = Trainer.from_cfg(tiny_video_cfg(root, tmp_path / "single"), DistInfo())
    assert single.iters_per_epoch == 2
    no_dropout(single.model)
    single.train()
    mp.start_processes(_ddp_worker, args=(2, _free_port(), root, str(tmp_path)), nprocs=2, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    ws = weights(single.model)
    assert any("agent" in k for k in ws), "the cross-frame attention should be trained here"
    assert_ranks_equal_one_process(r0["weights"], r1["weights"], ws)
    one = single.optimizer.state_dict()
    for part in ("sgd", "adam"):
        mine, theirs = r0["optimizer"][part]["state"], one[part]["state"]
        assert mine.keys() == theirs.keys() and mine
        for i in theirs:
            for name, value in theirs[i].items():
                if torch.is_tensor(value) and value.is_floating_point():
                    torch.testing.assert_close(mine[i][name], value, rtol=1e-4, atol=1e-6, msg=f"{part} {i} {name}")


def test_video_fix_bn_false_makes_the_reference_separate_backbone_passes():
    """Train-mode BatchNorm normalises with its batch: the B·T query frames pass alone, then the
    B·K supports; layer4 likewise. Features, prior and running statistics equal those passes."""
    torch.manual_seed(0)
    model = build_model(video_cfg(fix_bn=False, freeze_backbone=False)).train()
    reference = copy.deepcopy(model.backbone).train()
    B, T, K = 2, 3, 3
    query, supports, support_masks, _ = clip_episode(B, T, K)
    with torch.no_grad():
        (layer3, layer2), prior, support_mask = model.backbone_features(query, supports, support_masks)
        q2, q3 = reference.mid_level(query.flatten(0, 1))
        s2, s3 = reference.mid_level(supports.flatten(0, 1))
        masks = resize((support_masks == 1).flatten(0, 1).unsqueeze(1).float(), q3.shape[-2:])
        q4 = reference.high_level(q3)
        s4 = reference.high_level(s3 * masks)
        s4 = s4 * resize(masks, s4.shape[-2:])
        expected_prior = prior_mask(q4, s4.unsqueeze(1), q3.shape[-2:])     # paired: frame t with support t
    assert torch.allclose(layer3, torch.cat([q3, s3]), atol=1e-6)
    assert torch.allclose(layer2, torch.cat([q2, s2]), atol=1e-6)
    assert torch.equal(support_mask, masks)
    assert torch.allclose(prior, expected_prior, atol=1e-6)
    for (name, mine), theirs in zip(model.backbone.named_buffers(), reference.buffers()):
        assert torch.allclose(mine.float(), theirs.float(), atol=1e-6), name
    # one batch of all frames and supports normalises differently: the test tells them apart
    with torch.no_grad():
        _, together = copy.deepcopy(model.backbone).mid_level(torch.cat([query.flatten(0, 1), supports.flatten(0, 1)]))
    assert not torch.allclose(together, layer3, atol=1e-3)


def _video_eval_worker(rank, world, port, root, ckpt, out_dir):
    _join_group(rank, world, port)
    from util.distributed import cleanup, init_distributed
    from engine.tester import run_test
    info = init_distributed("cpu")
    try:
        summary = run_test(tiny_video_cfg(root, out_dir, weight=ckpt, save_pred=True, test_seeds=1, batch_size_val=2),
                           info)
        if rank == 0:
            torch.save(summary, os.path.join(out_dir, "summary.pt"))
    finally:
        cleanup()


def test_sharded_video_evaluation_equals_one_process(synthetic_video_tree, tmp_path):  # noqa: F811
    """Two processes each score half of the evaluation chunks: every figure of the result (per
    class, per video) and the saved predictions' index equal one process's."""
    from engine.checkpoint import save_checkpoint
    from engine.tester import run_test
    _, root = synthetic_video_tree
    torch.set_num_threads(1)
    cfg = tiny_video_cfg(root, tmp_path / "one")
    torch.manual_seed(0)
    ckpt = str(tmp_path / "w.pth")
    save_checkpoint(ckpt, build_model(cfg), cfg)
    one = run_test(tiny_video_cfg(root, tmp_path / "one", weight=ckpt, save_pred=True, test_seeds=1, batch_size_val=2),
                   DistInfo())
    mp.start_processes(_video_eval_worker, args=(2, _free_port(), root, ckpt, str(tmp_path / "two")), nprocs=2,
                       start_method="fork")
    two = torch.load(tmp_path / "two" / "summary.pt", weights_only=False)
    [a], [b] = one["runs"], two["runs"]
    assert a["frames"] == b["frames"] > 0 and a["videos"] == b["videos"] and a["queries"] == b["queries"]
    for key in ("J", "F", "JF", "class_iou"):
        assert a[key] == pytest.approx(b[key], abs=1e-9), key
    assert a["per_class"].keys() == b["per_class"].keys()
    for name in a["per_class"]:
        assert a["per_class"][name] == pytest.approx(b["per_class"][name], abs=1e-9), name
    assert [(v["video"], v["episode_id"]) for v in a["per_video"]] == [(v["video"], v["episode_id"]) for v in b["per_video"]]
    assert all(x == pytest.approx(y, abs=1e-9) for x, y in zip(a["per_video"], b["per_video"]))
    index = [json.loads((tmp_path / d / "result" / "pred_seed11" / "predictions.json").read_text()) for d in ("one", "two")]
    assert index[0] == index[1] and len(index[0]["episodes"]) == a["queries"]
