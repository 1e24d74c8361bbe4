"""The experiment folder of a config and its overrides: ``python -m commands.folder --config CFG
[KEY VALUE ...]`` creates ``<folder>/model`` and ``<folder>/result``, copies the config there and
prints the folder. train.sh and test.sh ask here for where to keep their log, so the folder rule
(util/config.py ``default_save_path``) lives in Python only and train.py agrees for every override."""
import argparse
import os
import sys

from util.config import config_with_overrides, parse_args_with_overrides
from util.errors import UserError, user_message
from util.fileio import atomic_write_text


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--prog", default="train.sh", help="the launcher's name, for the error line")
    args, opts = parse_args_with_overrides(parser, argv)
    folder = config_with_overrides(args.config, opts).save_path
    for sub in ("model", "result"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    with open(args.config) as f:
        atomic_write_text(os.path.join(folder, os.path.basename(args.config)), f.read())
    print(folder)
    return folder


if __name__ == "__main__":
    try:           # util.cli.run's report, without the torch import it brings: this runs before every launch
        main()
    except UserError as e:
        prog = sys.argv[sys.argv.index("--prog") + 1] if "--prog" in sys.argv[:-1] else "commands.folder"
        print(f"{prog}: error: {user_message(e)}", file=sys.stderr)
        sys.exit(2)
