"""The documentation's own commands, run as written.

Every command block of README.md, docs/guide.md, docs/data.md and docs/extending.md (an indented
or fenced block with a line starting ``python``, ``sh``, ``make``, ``NGPUS=``, ...; a fenced
``python`` block that imports something) is either

- in :data:`RUNS`, and run here exactly as written — with only tiny-size overrides appended — in a
  scratch copy of the repository on data this file builds, its documented files and printed
  lines checked; or
- marked in the doc by a comment line in the block, ``# not run by the tests: <why>`` (the
  PASCAL download, a GPU, ...), which the reader sees too.

A block that is neither, a marker without a reason, or an entry of :data:`RUNS` that no doc holds
any more fails here (docs/testing.md, "The docs' commands").
"""
from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import cv2
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "docs/guide.md", "docs/data.md", "docs/extending.md")
MARKER = "# not run by the tests:"
COMMAND_START = re.compile(r"^(python3?|sh|bash|make|tensorboard|torchrun|[A-Z_]+=\S*)\s")
# what a scratch repository needs of this one (links; config/ is copied: the launcher copies from it)
LINKED = ("commands", "dataset", "engine", "examples", "lists", "model", "scripts", "tools", "util",
          "train.py", "test.py", "predict.py", "train.sh", "test.sh")


# ----------------------------------------------------------------------------- reading the docs

@dataclass
class Block:
    doc: str
    line: int                  # 1-based line of the block's first line
    lang: str                  # 'python' for a fenced python block, else ''
    text: str                  # the block as written (indentation removed)
    marker: str | None = None  # the reason after MARKER, if the block has one

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    def commands(self) -> list[str]:
        """Shell commands: continuation lines joined, comment lines dropped, one space between words
        (a trailing ``# comment`` stays part of the line: the shell ignores it)."""
        joined, current = [], ""
        for raw in self.text.splitlines():
            line = raw.strip()
            if not current and (not line or line.startswith("#")):
                continue
            current += (" " if current else "") + line.rstrip("\\").strip()
            if not line.endswith("\\"):
                joined.append(current)
                current = ""
        return [normalise(c) for c in joined if COMMAND_START.match(c)]


def normalise(command: str) -> str:
    """One space between words, a trailing comment kept (the key of :data:`RUNS`)."""
    return " ".join(command.split())


def read_blocks(doc: str) -> list[Block]:
    """The code blocks of a markdown file: fenced (```lang) and indented (4 spaces after a blank line)."""
    lines = open(os.path.join(ROOT, doc), encoding="utf-8").read().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            blocks.append(Block(doc, i + 2, line[3:].strip(), "\n".join(lines[i + 1:end])))
            i = end + 1
            continue
        if line.startswith("    ") and line.strip() and (i == 0 or not lines[i - 1].strip()):
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            body = [ln[4:] for ln in lines[i:end]]
            while body and not body[-1].strip():
                body.pop()
            blocks.append(Block(doc, i + 1, "", "\n".join(body)))
            i = end
            continue
        i += 1
    for b in blocks:
        found = [ln.strip()[len(MARKER):].strip() for ln in b.text.splitlines() if ln.strip().startswith(MARKER)]
        b.marker = found[0] if found else None
    return blocks


def command_blocks() -> list[Block]:
    """The blocks a reader runs: shell commands, or python that imports something."""
    out = []
    for doc in DOCS:
        for b in read_blocks(doc):
            if b.lang == "python":
                if re.search(r"^(import|from) \S+", b.text, re.M):
                    out.append(b)
            elif b.lang in ("", "sh", "bash", "shell") and b.commands():
                out.append(b)
    return out


# ----------------------------------------------------------------------------- what runs, how

TINY_NET = ("pretrained '' layers 18 backbone_width 0.25 reduce_dim 8 ppm_scales '[1.0,0.5]' train_h 33 train_w 33 "
            "memory_size 8 num_negatives 4")
TINY_EVAL = "val_size 41 test_num 4 test_seeds 1 batch_size_val 2 class_index_workers 1 workers 0"
TINY_TRAIN = f"{TINY_NET} {TINY_EVAL} batch_size 2 epochs 1 epoch_size 4 val_num 4 print_freq 1 tb_images 0"
SYNTHETIC_LABELS = "min_class_pixels 150"      # the 512-pixel rule of 80 px images, at the 64 px ones made here


@dataclass
class Run:
    """How the test runs a documented command: ``append`` (tiny sizes) after it as written, in the
    scratch repository of ``scenario``; afterwards these files exist and these lines were printed."""
    scenario: str
    append: str = ""
    files: tuple[str, ...] = ()          # glob patterns (relative to the scratch repository)
    printed: tuple[str, ...] = ()        # substrings of stdout + stderr
    status: int = 0


PREDICTOR_SNIPPET = "from engine.predictor import Predictor"      # the guide's notebook block starts so
EXAMPLE_NETWORK = '"""A complete network of the contract in docs/extending.md'

# In the order they run; each scenario has its own scratch repository (see ``prepare``).
RUNS: dict[str, Run] = {
    # docs/guide.md "Synthetic data"
    "python tools/make_synthetic.py --out data/synthetic": Run(
        "synthetic", "--train 200 --val 80 --size 64 --workers 1",
        files=("data/synthetic/train.txt", "data/synthetic/val.txt", "data/synthetic/JPEGImages/*.jpg",
               "data/synthetic/SegmentationClassAug/*.png")),
    # README "Your own network"
    "python train.py --config config/synthetic/synthetic_split0_resnet18.yaml arch examples.cosine_proto:build": Run(
        "synthetic", f"{TINY_TRAIN} {SYNTHETIC_LABELS}",
        files=("exp/synthetic/split0_resnet18/model/best.pth", "exp/synthetic/split0_resnet18/model/last.pth",
               "exp/synthetic/split0_resnet18/train.log", "exp/synthetic/split0_resnet18/tb/*/events.out.tfevents.*")),
    # docs/guide.md "Predicting on your own images": the notebook block, on that checkpoint
    PREDICTOR_SNIPPET: Run("synthetic"),
    # docs/extending.md: the example network's file, then its three commands
    EXAMPLE_NETWORK: Run("synthetic"),
    "python train.py --config config/synthetic/synthetic_split0_resnet18.yaml arch examples.cosine_proto:build "
    "save_path exp/synthetic/cosine_proto": Run(
        "synthetic", f"{TINY_TRAIN} {SYNTHETIC_LABELS}", files=("exp/synthetic/cosine_proto/model/best.pth",)),
    "python test.py --config config/synthetic/synthetic_split0_resnet18.yaml save_path exp/synthetic/cosine_proto": Run(
        "synthetic", f"{TINY_EVAL} {SYNTHETIC_LABELS}",
        files=("exp/synthetic/cosine_proto/result/test_*.json", "exp/synthetic/cosine_proto/test.log"),
        printed=("class mIoU",)),
    "python predict.py --config config/synthetic/synthetic_split0_resnet18.yaml "
    "--weight exp/synthetic/cosine_proto/model/best.pth --support s.jpg s_mask.png --query q.jpg --out out/": Run(
        "synthetic", "val_size 41", files=("out/q_mask.png", "out/q_overlay.jpg")),
    # docs/guide.md "Few-shot video": the no-download stand-in
    "python tools/make_synthetic_video.py --out data/synthetic_video": Run(
        "video", "--videos 24 --frames-min 3 --frames-max 4 --size 32 --workers 1",
        files=("data/synthetic_video/train/JPEGImages/*/*.jpg",)),
    "python tools/prepare_ytvis.py --ytvis data/synthetic_video --out data/synthetic_video": Run(
        "video", "--workers 1"),
    # README "Any dataset" and docs/data.md section 8: your own class folders, the lists under data_root
    "sh train.sh folder resnet50 data_root data/mine train_classes train.txt val_classes val.txt "
    "test_classes test.txt": Run(
        "folder", TINY_TRAIN,
        files=("exp/folder/resnet50/model/best.pth", "exp/folder/resnet50/model/last.pth",
               "exp/folder/resnet50/result/train-*.log", "exp/folder/resnet50/folder_resnet50.yaml",
               "exp/folder/resnet50/tb/*/events.out.tfevents.*"),
        printed=("log: exp/folder/resnet50/result/train-",)),
    "sh test.sh folder resnet50 data_root data/mine test_classes test.txt": Run(
        "folder", f"{TINY_NET} {TINY_EVAL}",
        files=("exp/folder/resnet50/result/test_*.json", "exp/folder/resnet50/result/test-*.log"),
        printed=("class mIoU", "log: exp/folder/resnet50/result/test-")),
}
# a scenario whose commands are known to fail for now, with why: strict, so the mark goes once it passes
EXPECTED_TO_FAIL: dict[str, str] = {}   # scenario -> why it fails for now (strict: a pass fails the test)

# Lines the docs quote, printed by a command the test runs after its scenario (scenario, command, line).
QUOTED = (
    ("folder", "sh train.sh folder resnet50 shots 5", "unknown key 'shots'; did you mean 'shot'?"),
)


def python_key(block: Block) -> str:
    """A python block's key in RUNS: the start of its first line that RUNS names, else that line."""
    first = next(ln for ln in block.text.splitlines() if ln.strip())
    return next((k for k in (PREDICTOR_SNIPPET, EXAMPLE_NETWORK) if first.startswith(k)), first)


def runnable() -> list[tuple[Block, str, str]]:
    """(block, the command or python text, its key in RUNS) for every unmarked block, doc order."""
    out = []
    for b in command_blocks():
        if b.marker is not None:
            continue
        if b.lang == "python":
            out.append((b, b.text, python_key(b)))
        else:
            out += [(b, c, c) for c in b.commands()]
    return out


# ----------------------------------------------------------------------------- the checks that read

def test_every_command_block_is_run_here_or_marked_with_a_reason():
    blocks = command_blocks()
    assert len(blocks) >= 30, "the docs' blocks were not found: has the markdown layout changed?"
    unmarked = [f"{b.where}: {key}" for b, _, key in runnable() if key not in RUNS]
    assert not unmarked, ("documented commands neither run by tests/test_docs.py (RUNS) nor marked "
                          f"'{MARKER} <why>' in their block:\n  " + "\n  ".join(unmarked))
    empty = [b.where for b in blocks if b.marker is not None and not b.marker]
    assert not empty, f"'{MARKER}' needs its reason (real data, a GPU, ...): {empty}"


def test_every_run_here_is_still_in_the_docs():
    documented = {key for _, _, key in runnable()}
    stale = [k for k in RUNS if k not in documented]
    assert not stale, f"RUNS holds commands no doc shows any more (remove them or mark the block): {stale}"


# ----------------------------------------------------------------------------- the scratch repositories

def scratch_repository(path) -> dict:
    """A repository to run commands in: the code linked, config/ copied, the virtual environment
    this suite runs in (linked as .venv, where the launchers look, or named by PYTHON); returns the
    environment the commands get (``python`` first on PATH: an activated environment)."""
    os.makedirs(path, exist_ok=True)
    for name in LINKED:
        os.symlink(os.path.join(ROOT, name), os.path.join(path, name))
    shutil.copytree(os.path.join(ROOT, "config"), os.path.join(path, "config"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NTRENETPP_")}
    venv = os.path.dirname(os.path.dirname(sys.executable))
    if sys.prefix != sys.base_prefix:
        os.symlink(venv, os.path.join(path, ".venv"))
    else:
        env["PYTHON"] = sys.executable
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def write_pair(image_path: str, mask_path: str, rng, size=(40, 48), box=(8, 30, 10, 36)) -> None:
    """A random image and a 0/1 mask of one rectangle."""
    cv2.imwrite(image_path, rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    mask = np.zeros(size, np.uint8)
    top, bottom, left, right = box
    mask[top:bottom, left:right] = 1
    cv2.imwrite(mask_path, mask)


def class_folders(root: str, lists: str, rng) -> None:
    """data/mine: 9 classes of 6 images (stem.jpg + stem.png), train / val / test lists of 3 each."""
    names = [f"class{c}" for c in range(9)]
    for name in names:
        os.makedirs(os.path.join(root, name))
        for i in range(6):
            write_pair(os.path.join(root, name, f"{i}.jpg"), os.path.join(root, name, f"{i}.png"), rng,
                       box=(4 + i, 30, 6, 30 + i))
    os.makedirs(lists, exist_ok=True)
    for part, chosen in (("train", names[:3]), ("val", names[3:6]), ("test", names[6:])):
        with open(os.path.join(lists, f"{part}.txt"), "w") as f:
            f.write("\n".join(chosen) + "\n")


def prepare(scenario: str, path: str) -> None:
    """The data a scenario's commands take from the reader: images, masks, class folders."""
    rng = np.random.default_rng(0)
    if scenario == "synthetic":
        for image, mask in (("a.jpg", "a_mask.png"), ("s.jpg", "s_mask.png")):
            write_pair(os.path.join(path, image), os.path.join(path, mask), rng)
        for query in ("query.jpg", "q.jpg"):
            cv2.imwrite(os.path.join(path, query), rng.integers(0, 256, (36, 52, 3), dtype=np.uint8))
    elif scenario == "folder":
        class_folders(os.path.join(path, "data", "mine"), os.path.join(path, "data", "mine"), rng)


def run_shell(command: str, path: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def scenarios() -> list[str]:
    return list(dict.fromkeys(r.scenario for r in RUNS.values()))


@pytest.mark.parametrize("scenario", scenarios())
def test_the_documented_commands_run_as_written(scenario, tmp_path):
    """Each command of the scenario, in doc-independent order (RUNS), as written plus tiny sizes;
    then the files the docs name exist and the lines they quote were printed."""
    path = str(tmp_path / "repo")
    env = scratch_repository(path)
    prepare(scenario, path)
    texts = {key: text for _, text, key in runnable()}
    failures = []
    for key, how in RUNS.items():
        if how.scenario != scenario:
            continue
        text = texts[key]
        if key in (PREDICTOR_SNIPPET, EXAMPLE_NETWORK):
            script = os.path.join(path, f"doc_block_{list(RUNS).index(key)}.py")
            with open(script, "w") as f:
                f.write(text)
            command = f"python {shlex.quote(os.path.basename(script))}"
        else:
            command = f"{text.split(' #')[0]} {how.append}".strip()
        r = run_shell(command, path, env)
        out = r.stdout + r.stderr
        if r.returncode != how.status:
            failures.append(f"{command}\n  exit status {r.returncode}, not {how.status}:\n{out[-2500:]}")
            break
        missing = [p for p in how.files if not glob.glob(os.path.join(path, p))]
        unprinted = [line for line in how.printed if line not in out]
        if missing or unprinted:
            failures.append(f"{command}\n  the docs' files missing: {missing}; lines not printed: {unprinted}")
    for where, command, line in QUOTED:
        if where == scenario and not failures:
            r = run_shell(command, path, env)
            if line not in r.stdout + r.stderr:
                failures.append(f"{command}\n  did not print the line the docs quote: {line!r}")
    if scenario in EXPECTED_TO_FAIL:
        assert failures, f"scenario {scenario} passes now: remove it from EXPECTED_TO_FAIL"
        pytest.xfail(EXPECTED_TO_FAIL[scenario])
    assert not failures, "\n\n".join(failures)
