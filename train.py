"""Train a network: python train.py --config CFG [KEY VALUE ...]; --help and commands/train.py say more."""
from commands.train import main
from util.cli import run

if __name__ == "__main__":
    run(main)
