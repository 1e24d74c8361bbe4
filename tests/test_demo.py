"""tools/demo.py: the commands `make demo` runs, its scheduling, and the three image configs
being one recipe."""
from __future__ import annotations

import sys

import pytest

from tools import demo
from util.config import load_cfg
from util.errors import UserError


def test_image_demo_runs_data_pretraining_three_networks_and_one_table():
    first, chains, table = demo.steps(demo.IMAGE, "PY", 1000, ["manual_seed", "322"])
    assert [s.argv[:2] for s in first] == [["PY", "tools/make_synthetic.py"], ["PY", "tools/pretrain_backbone.py"]]
    assert first[1].argv[-2:] == ["manual_seed", "322"] and "--out" in first[1].argv
    assert all(s.threads == demo.MAIN_THREADS == 2 for s in first + [table])
    assert [c.argv[:4] for c in chains] == [["sh", "train.sh", "synthetic", n] for n in demo.IMAGE.networks]
    for chain in chains:
        assert chain.threads == chain.then.threads == demo.TRAIN_THREADS == 1
        assert chain.argv[4:] == ["resume", "", "overwrite", "True", "manual_seed", "322"]
        assert chain.then.argv == ["sh", "test.sh", "synthetic", chain.argv[3], "weight", "best", "manual_seed", "322"]
    # the matcher runs on the pretrained backbone every network uses, once
    argv = table.argv
    assert argv[argv.index("--weight") + 1] == "none" and argv[argv.index("--pretrained") + 1] == demo.BACKBONE
    assert argv[-1] == "--compare"
    for name in demo.IMAGE.networks:
        assert load_cfg(f"config/synthetic/synthetic_{name}.yaml").pretrained == demo.BACKBONE


def test_video_demo_uses_the_image_demos_backbone():
    first, chains, table = demo.steps(demo.VIDEO, "PY", 10, [])
    assert [s.name for s in first] == ["data", "pretrain", "video data", "prepare"]
    assert len(chains) == 1 and chains[0].argv[:4] == ["sh", "train.sh", "synthetic_video", "split0_resnet18"]
    assert chains[0].threads == 2 and "--pretrained" not in table.argv
    cfg = load_cfg(demo.config_of(demo.VIDEO))
    assert cfg.pretrained == demo.BACKBONE and cfg.freeze_backbone and cfg.split == 0


def test_the_three_image_configs_are_one_recipe():
    """PFENet and the ablation differ from NTRENet++ in the network alone."""
    cfgs = {name: load_cfg(f"config/synthetic/synthetic_{name}.yaml") for name in demo.IMAGE.networks}
    full, noelim, pfenet = (cfgs[n] for n in demo.IMAGE.networks)
    assert {k for k in full if full[k] != noelim[k]} == {"elimination"} and noelim.elimination == "none"
    assert {k for k in full if full[k] != pfenet[k]} == {"arch"} and pfenet.arch == "pfenet"


def _step(tmp_path, name, code, then=None):
    return demo.Step(name, [sys.executable, "-c", code], 1, str(tmp_path / f"{name}.log"), then=then)


TRACE = ("import sys, time\n"
         "def note(kind):\n"
         "    with open(sys.argv[1], 'a') as f:\n"
         "        f.write(kind + ' ' + sys.argv[2] + '\\n')\n"
         "note('start'); time.sleep(0.3); note('end')")


def test_chains_run_in_order_at_most_jobs_at_once(tmp_path):
    """Each chain's second step starts after its first ends; never more than ``jobs`` run at once
    (every step writes its start and end to one file)."""
    trace = str(tmp_path / "trace")
    step = lambda name, then=None: demo.Step(name, [sys.executable, "-c", TRACE, trace, name], 1,
                                              str(tmp_path / f"{name}.log"), then=then)
    chains = [step(f"a{k}", then=step(f"t{k}")) for k in range(3)]
    times = {}
    demo.run_chains(chains, 2, sys.executable, times)
    assert set(times) == {f"{p}{k}" for p in "at" for k in range(3)}
    events = open(trace).read().splitlines()
    running, most = set(), 0
    for event in events:
        kind, name = event.split()
        running.add(name) if kind == "start" else running.discard(name)
        most = max(most, len(running))
    assert most == 2 and len(events) == 12
    for k in range(3):
        assert events.index(f"end a{k}") < events.index(f"start t{k}")


def test_a_failing_step_names_its_log(tmp_path):
    chains = [_step(tmp_path, "fine", "pass"), _step(tmp_path, "broken", "import sys; print('bad thing'); sys.exit(3)")]
    with pytest.raises(UserError, match=r"demo step 'broken' failed \(exit 3\); its log is .*broken.log: bad thing"):
        demo.run_chains(chains, 2, sys.executable, {})


def test_overrides_come_in_pairs(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["manual_seed"])
    assert e.value.code == 2 and "KEY VALUE pairs" in capsys.readouterr().err
