"""Evaluate a checkpoint: python test.py --config CFG [KEY VALUE ...]; --help and commands/test.py say more."""
from commands.test import main
from util.cli import run

if __name__ == "__main__":
    run(main)
