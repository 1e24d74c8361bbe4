"""tools/baseline.py: the prototype matcher's arithmetic, and the comparison on shared episodes with
its rows scored again independently."""
import logging
import re
import os

import pytest
import torch
import yaml

from engine.checkpoint import save_checkpoint
from engine.tasks import task_for
from engine.tasks.base import per_unit_ms, with_spread
from engine.tester import run_test
from engine.networks import build_model
from tests.test_rescore import FOLD0, image_sums, pooled, read_gray
from tools import baseline
from util.config import defaults
from util.distributed import DistInfo
from util.errors import ConfigError, UserError

TINY = dict(dataset="synthetic", layers=18, pretrained="", reduce_dim=16, ppm_scales=[1.0, 0.5],
            val_size=41, batch_size_val=4, workers=0, min_class_pixels=150, class_index_workers=1,
            test_num=6, test_seeds=2, memory_size=8, num_negatives=4, manual_seed=5)


@pytest.fixture(autouse=True)
def restore_logging():
    """baseline.main points the root logger at this test's stdout; later tests must not write there."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


class PixelBackbone(torch.nn.Module):
    """Features = the pixels themselves (a 1×1 identity convolution; layer2 empty)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1, bias=False)
        self.conv.weight.data = torch.eye(3).view(3, 3, 1, 1)

    def mid_level(self, x):
        return x[:, :0], self.conv(x)


def test_matcher_assigns_each_pixel_to_the_nearer_prototype_by_cosine():
    """Support: left half red (target), right half blue (background). Query: a green-ish red
    block on blue: cosine sends the reddish pixels to the target, the blue ones to background;
    a 255 (ignore) region of the support counts for neither prototype."""
    red, blue, green = torch.tensor([1.0, 0, 0]), torch.tensor([0, 0, 1.0]), torch.tensor([0, 1.0, 0])
    support = blue.view(3, 1, 1).repeat(1, 8, 8)
    support[:, :, :4] = red.view(3, 1, 1)
    mask = torch.zeros(8, 8, dtype=torch.long)
    mask[:, :4] = 1
    support[:, 6:, 4:] = green.view(3, 1, 1)
    mask[6:, 4:] = 255                                   # ignored: would pull the background to green
    query = blue.view(3, 1, 1).repeat(1, 8, 8)
    query[:, 2:5, 2:6] = (red + 0.6 * green).view(3, 1, 1)
    query[:, 6:, :2] = green.view(3, 1, 1)              # orthogonal to both: a tie -> background (argmax 0)
    matcher = baseline.PrototypeMatcher(PixelBackbone()).eval()
    with torch.no_grad():
        sim = matcher(query[None], support[None, None], mask[None, None])
    assert sim.shape == (1, 2, 8, 8)
    expected = torch.zeros(8, 8, dtype=torch.long)
    expected[2:5, 2:6] = 1
    assert torch.equal(sim[0].argmax(0), expected)
    cos_red = (1 / (1 + 0.36) ** 0.5)
    assert sim[0, 1, 3, 3].item() == pytest.approx(cos_red, abs=1e-5)
    assert sim[0, 0, 0, 0].item() == pytest.approx(1.0, abs=1e-5)


def test_two_shots_average_the_prototypes():
    red, blue = torch.tensor([1.0, 0, 0]), torch.tensor([0, 0, 1.0])
    supports = torch.stack([red.view(3, 1, 1).repeat(1, 4, 4), blue.view(3, 1, 1).repeat(1, 4, 4)])
    masks = torch.ones(2, 4, 4, dtype=torch.long)
    masks[:, 0] = 0                                      # background row: the same colour as the target
    query = (red + blue).view(3, 1, 1).repeat(1, 4, 4)   # halfway: cosine 1 with the mean prototype
    with torch.no_grad():
        sim = baseline.PrototypeMatcher(PixelBackbone())(query[None], supports[None], masks[None])
    assert torch.allclose(sim[0, 1], torch.ones(4, 4), atol=1e-5)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny synthetic tree, an untrained checkpoint and its test.py result."""
    from tools.make_synthetic import main as make_synthetic
    root = str(tmp_path_factory.mktemp("synth"))
    make_synthetic(["--out", root, "--train", "0", "--val", "60", "--size", "64", "--workers", "1"])
    cfg = defaults()
    cfg.update(TINY, data_root=root, train_list=os.path.join(root, "val.txt"),
               val_list=os.path.join(root, "val.txt"), save_path=os.path.join(root, "exp"))
    torch.manual_seed(0)
    model = build_model(cfg)
    weight = os.path.join(root, "exp", "model", "last.pth")
    save_checkpoint(weight, model, cfg, epoch=1, iteration=4)
    cfg.update(weight=weight)
    res = run_test(cfg, DistInfo())
    config_path = os.path.join(root, "tiny.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump({"DATA": {k: cfg[k] for k in ("dataset", "data_root", "train_list", "val_list",
                                                      "min_class_pixels", "class_index_workers")},
                        "MODEL": {k: cfg[k] for k in ("layers", "pretrained", "reduce_dim", "ppm_scales")},
                        "TRAIN": {k: cfg[k] for k in ("workers", "memory_size", "num_negatives", "manual_seed")},
                        "TEST": {"val_size": cfg.val_size, "batch_size_val": cfg.batch_size_val}}, f)
    return config_path, res, model, cfg


def variant_result(cfg, folder: str, seed: int, **over):
    """An untrained network of ``cfg`` changed by ``over``, saved under ``folder`` beside the tiny
    run's experiment, and its test.py result: (its config, the result)."""
    variant = cfg.copy()
    variant.update(over, save_path=os.path.join(os.path.dirname(cfg.save_path), folder))
    torch.manual_seed(seed)
    weight = os.path.join(variant.save_path, "model", "last.pth")
    save_checkpoint(weight, build_model(variant), variant, epoch=1, iteration=4)
    variant.update(weight=weight)
    return variant, run_test(variant, DistInfo())


def test_compare_scores_every_row_on_the_same_episodes(tiny_run, capsys, tmp_path):
    config_path, res, model, cfg = tiny_run
    rows = baseline.main(["--config", config_path, "--compare", res["json_path"]])
    names = list(rows)
    assert names == ["NTRENet++ (exp/last.pth)", "prototype matcher (its backbone)", "all-foreground"]
    assert rows["NTRENet++ (exp/last.pth)"]["miou_mean"] == res["miou_mean"]
    for name in names[1:]:
        r = rows[name]
        assert r["episodes"] == res["episodes"] == 6 and r["seeds"] == res["seeds"] == 2
        assert [p["episodes"] for p in r["per_seed"]] == [p["episodes"] for p in res["per_seed"]]
    # the rows, scored again here (tests/test_rescore.py's scoring, not dataset/metrics.py): the
    # matcher's saved predictions, and all-foreground's exact value, sum fg / sum valid per class
    saved = cfg.copy()
    saved.update(save_pred=True, save_path=str(tmp_path))
    run_test(saved, DistInfo(), model=baseline.PrototypeMatcher(model.backbone), write_json=False)
    for k, seed in enumerate((5, 6)):
        index, sums = image_sums(str(tmp_path / "result" / f"pred_seed{seed}"))
        class_iou, miou, fbiou = pooled(sums)
        row = rows["prototype matcher (its backbone)"]["per_seed"][k]
        assert row["seed"] == seed and row["miou"] == pytest.approx(miou, abs=1e-6)
        assert row["fbiou"] == pytest.approx(fbiou, abs=1e-6)
        assert row["class_iou"] == pytest.approx(class_iou, abs=1e-6)
        fg, valid = dict.fromkeys(FOLD0, 0), dict.fromkeys(FOLD0, 0)
        for e in index["episodes"]:
            label = read_gray(os.path.join(index["data_root"], e["query_label"]))
            fg[e["class_name"]] += int((label == e["class"]).sum())
            valid[e["class_name"]] += int((label != 255).sum())
        expected = {name: 100 * fg[name] / valid[name] if valid[name] else 0.0 for name in FOLD0}
        row = rows["all-foreground"]["per_seed"][k]
        assert row["class_iou"] == pytest.approx(expected, abs=1e-9)
        assert row["fbiou"] == pytest.approx(50 * sum(fg.values()) / sum(valid.values()), abs=1e-9)
    out = capsys.readouterr().out
    assert "prototype matcher (its backbone)" in out and "all-foreground" in out
    assert "(1-shot, 2 seed(s) x 6 episodes, pfenet protocol; the same episodes for every row)" in out


def test_pfenet_and_ntrenetpp_results_side_by_side_on_identical_episodes(tiny_run, capsys):
    """Two test.py results of one setting, PFENet's and NTRENet++'s, are rows of one table; a
    result of other episodes (another shot) is refused naming what differs."""
    config_path, res, _, cfg = tiny_run
    pfenet_cfg, pfenet_res = variant_result(cfg, "exp_pfenet", seed=1, arch="pfenet")
    assert pfenet_res["arch"] == "pfenet" and res["arch"] == "ntrenetpp"
    rows = baseline.main(["--config", config_path, "--compare", res["json_path"], pfenet_res["json_path"]])
    assert list(rows)[:2] == ["NTRENet++ (exp/last.pth)", "PFENet (exp_pfenet/last.pth)"]
    assert rows["PFENet (exp_pfenet/last.pth)"]["miou_mean"] == pfenet_res["miou_mean"]
    out = capsys.readouterr().out
    assert "PFENet (exp_pfenet/last.pth)" in out and "NTRENet++ (exp/last.pth)" in out
    pfenet_cfg.update(shot=2, save_path=pfenet_cfg.save_path + "_2shot")
    two_shot = run_test(pfenet_cfg, DistInfo())
    with pytest.raises(UserError, match=r"scored other episodes than .*\(shot 2 vs 1\)"):
        baseline.main(["--config", config_path, "--compare", res["json_path"], two_shot["json_path"]])


def test_a_result_of_another_fold_is_a_config_error(tiny_run):
    config_path, res, _, _ = tiny_run
    with pytest.raises(ConfigError, match="split"):
        baseline.main(["--config", config_path, "--compare", res["json_path"], "split", "1"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        baseline.main(["--config", config_path, "--compare", res["json_path"] + ".missing"])


def test_ablation_row_and_pretrained_matcher_and_per_class_table(tiny_run, capsys):
    """The demo's table: an 'elimination none' result is named as the ablation, '--weight none'
    drops the checkpoint-backbone matcher for the one on the --pretrained file, and the
    per-class table gives each row's mean class IoU over the runs."""
    config_path, res, model, cfg = tiny_run
    _, ablated_res = variant_result(cfg, "exp_noelim", seed=2, elimination="none")
    assert ablated_res["elimination"] == "none" and res["elimination"] == "bg+do"
    backbone_file = os.path.join(os.path.dirname(cfg.save_path), "backbone.pth")
    torch.save(model.backbone.state_dict(), backbone_file)
    rows = baseline.main(["--config", config_path, "--weight", "none", "--pretrained", backbone_file,
                          "--compare", res["json_path"], ablated_res["json_path"]])
    assert list(rows) == ["NTRENet++ (exp/last.pth)", "NTRENet++ (no BG/DO elimination) (exp_noelim/last.pth)",
                          "prototype matcher (backbone.pth)", "all-foreground"]
    out = capsys.readouterr().out
    per_class = out[out.index("per held-out class, IoU (mean over the runs)"):].splitlines()
    header = per_class[1].split()
    assert header == [word for name in FOLD0 for word in name.split()]
    for line, (name, r) in zip(per_class[2:], rows.items()):
        assert line.startswith(name)
        means = [sum(run["class_iou"][c] for run in r["per_seed"]) / len(r["per_seed"]) for c in FOLD0]
        assert [float(v) for v in line[len(name):].split()] == pytest.approx(means, abs=0.006)


def test_compare_takes_the_newest_result_of_each_checkpoint_and_names_the_files_it_leaves_out(tiny_run, capsys):
    """An experiment tested three times (twice on the same episodes, then on fewer) under the
    README's glob: the newest of its results is compared and the two older ones are named;
    ``--all`` compares every file, the rows of one checkpoint named by their files."""
    config_path, res, _, cfg = tiny_run
    twice_cfg, first = variant_result(cfg, "exp_twice", seed=3)
    second = run_test(twice_cfg, DistInfo())
    assert second["miou_mean"] == first["miou_mean"]
    third_cfg = twice_cfg.copy()
    third_cfg.update(test_num=4)
    third = run_test(third_cfg, DistInfo())
    result_dir = os.path.dirname(first["json_path"])
    assert sorted(os.listdir(result_dir)) == sorted(os.path.basename(r["json_path"]) for r in (first, second, third))
    # the shell's glob order, which puts test_<time>-2.json before test_<time>.json: not the order written
    files = sorted(os.path.join(result_dir, name) for name in os.listdir(result_dir))
    rows = baseline.main(["--config", config_path, "--weight", "none", "--compare", *files])
    assert list(rows) == ["NTRENet++ (exp_twice/last.pth)", "all-foreground"]
    assert rows["NTRENet++ (exp_twice/last.pth)"] == {k: v for k, v in third.items() if k != "json_path"}
    assert rows["all-foreground"]["episodes"] == 4                # the newest result's episodes
    out = capsys.readouterr().out
    for older in (first, second):
        assert (f"--compare: left out {older['json_path']}, an older result of the same checkpoint and shot than "
                f"{os.path.basename(third['json_path'])} (--all compares every file)") in out
    rows = baseline.main(["--config", config_path, "--weight", "none", "--all",
                          "--compare", first["json_path"], second["json_path"]])
    assert list(rows) == [f"NTRENet++ (exp_twice/last.pth, {os.path.basename(first['json_path'])})",
                          f"NTRENet++ (exp_twice/last.pth, {os.path.basename(second['json_path'])})", "all-foreground"]
    with pytest.raises(UserError, match=r"scored other episodes .*episodes 4 vs 6"):
        baseline.main(["--config", config_path, "--all", "--compare", first["json_path"], third["json_path"]])


def test_a_result_of_another_folders_checkpoint_says_which_checkpoint_and_shot(tiny_run):
    """The guide's '1-shot model at 5 shots' lands in the K-shot experiment's result folder: its
    file name names the checkpoint and the shot, so it is never taken for that folder's own model's."""
    _, res, _, cfg = tiny_run
    assert re.fullmatch(r"test_\d{8}_\d{6}(-\d+)?\.json", os.path.basename(res["json_path"]))   # its own model
    at_two = cfg.copy()
    at_two.update(shot=2, save_path=cfg.save_path + "_shot2")
    foreign = run_test(at_two, DistInfo())
    assert os.path.dirname(foreign["json_path"]) == os.path.join(cfg.save_path + "_shot2", "result")
    assert re.fullmatch(r"test_\d{8}_\d{6}(-\d+)?_exp_last_shot2\.json", os.path.basename(foreign["json_path"]))
    assert foreign["weight"] == res["weight"] and foreign["shot"] == 2
    assert baseline.written_at(foreign["json_path"])[0] == os.path.basename(foreign["json_path"])[5:20]


def test_a_baseline_is_logged_by_its_name_and_one_seed_shows_no_spread(tiny_run, caplog):
    """Each baseline block names its model (not '(in-memory model)'); one seed has no '± 0.00';
    a time that rounds to 0.0 ms reads '<0.1 ms'."""
    _, _, _, cfg = tiny_run
    one = cfg.copy()
    one.update(test_seeds=1)
    caplog.set_level(logging.INFO, logger="ntrenetpp")
    r = run_test(one, DistInfo(), model=baseline.AllForeground(), write_json=False, name="all-foreground")
    text = caplog.text
    assert "model: all-foreground; 1-shot, 1 seed(s) x 6 episodes" in text and "in-memory" not in text
    assert (f"1-shot over 1 seed(s) x 6 episodes (pfenet protocol), all-foreground: class mIoU "
            f"{r['miou_mean']:.2f}, FB-IoU {r['fbiou_mean']:.2f}") in text and "±" not in text
    assert baseline.format_table([("all-foreground", r)], task_for(one), one).splitlines()[2] == \
        f"{'all-foreground':34s}{r['miou_mean']:8.2f}{'':8s}{r['fbiou_mean']:8.2f}{'':8s}"
    assert [per_unit_ms(ms, "episode") for ms in (0.0, 0.049, 0.05, 12.34)] == [
        "<0.1 ms/episode", "<0.1 ms/episode", "0.1 ms/episode", "12.3 ms/episode"]
    assert [with_spread(50.634, 0.456, n) for n in (1, 2)] == ["50.63", "50.63 ± 0.46"]
