"""The schema is the one source of key facts: every declared key is read by the code, the
checkpoint's architecture keys are the ones flagged, the shipped configs put each key in its
declared section, and no config sets a key its task ignores."""
import glob
import os
import re

import pytest
import yaml

from util import config as config_module
from util.config import ARCH_KEYS, KEYS, SCHEMA, load_cfg, task_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "config", "**", "*.yaml"), recursive=True))


def source_outside_the_schema() -> str:
    """Every non-test source file, with util/config.py's declarations left out (its functions kept)."""
    texts = []
    for folder, _, files in os.walk(ROOT):
        if any(part in folder for part in (".venv", os.sep + "tests", ".git")):
            continue
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and os.path.abspath(path) != os.path.abspath(config_module.__file__):
                texts.append(open(path).read())
    own = open(config_module.__file__).read()
    texts.append(own[:own.index("SCHEMA: tuple")] + own[own.index("KEYS: dict"):])   # its code, not its declarations
    return "\n".join(texts)


def test_every_declared_key_is_read():
    code = source_outside_the_schema()
    unread = [k.name for k in SCHEMA if not re.search(rf"\.{k.name}\b|[\"']{k.name}[\"']", code)]
    assert unread == []


def test_removed_keys_stay_removed():
    assert "classes" not in KEYS and "padding_label" not in KEYS


def test_architecture_keys_are_the_flagged_ones():
    assert ARCH_KEYS == tuple(k.name for k in SCHEMA if k.arch)
    assert {"task", "arch", "layers", "reduce_dim", "ppm_scales", "self_proto_pool", "bank_classes"} <= set(ARCH_KEYS)
    assert "dataset" not in ARCH_KEYS and "shot" not in ARCH_KEYS


def test_every_key_has_a_section_and_a_task():
    assert {k.section for k in SCHEMA} == {"DATA", "VIDEO", "MODEL", "LOSS", "TRAIN", "TEST"}
    assert all(k.tasks and set(k.tasks) <= {"image", "video"} for k in SCHEMA)
    assert [k.name for k in SCHEMA if k.tasks == ("video",) and k.section not in ("VIDEO", "MODEL", "LOSS", "TRAIN")] == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_shipped_configs_keep_keys_in_their_sections_and_set_only_what_their_task_uses(path):
    raw = yaml.safe_load(open(path))
    misplaced = [(section, name, KEYS[name].section) for section, body in raw.items() for name in body
                 if KEYS[name].section != section]
    assert misplaced == []
    task = task_of(load_cfg(path).dataset)
    ignored = [name for body in raw.values() for name in body if task not in KEYS[name].tasks]
    assert ignored == []
