"""The experiment folder of a config and its overrides: ``python -m commands.folder --config CFG
[KEY VALUE ...]`` checks everything that needs no data (engine/preflight.py), then creates
``<folder>/model`` and ``<folder>/result``, copies the config there and prints the folder, and on a
second line the outermost folder this call created for it ('' when the folder was there). train.sh and test.sh ask here
for where to keep their log, so the folder rule (util/config.py ``default_save_path``) lives in
Python only and train.py agrees for every override; a run refused here creates nothing."""
import argparse
import os
import sys

from engine.experiment import first_missing
from engine.preflight import preflight
from util.cli import run
from util.config import config_with_overrides, parse_args_with_overrides
from util.fileio import atomic_write_text


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--prog", default="train.sh", help="the launcher's name (train.sh or test.sh)")
    args, opts = parse_args_with_overrides(parser, argv)
    cfg = config_with_overrides(args.config, opts)
    preflight(cfg, "test" if args.prog.startswith("test") else "train")
    folder = cfg.save_path
    created = first_missing(folder)
    for sub in ("model", "result"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    with open(args.config) as f:
        atomic_write_text(os.path.join(folder, os.path.basename(args.config)), f.read())
    print(folder)
    print(created)
    return folder


if __name__ == "__main__":
    run(main, prog=sys.argv[sys.argv.index("--prog") + 1] if "--prog" in sys.argv[:-1] else "commands.folder")
