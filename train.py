"""Train NTRENet++: python train.py --config CFG [KEY VALUE ...]

Single process by default; multi-GPU / multi-node through torchrun (NGPUS=4 sh train.sh ...).
Ctrl-C or SIGTERM stops after the step in flight with last.pth saved (exit 130 / 143) and
prints the command that continues the run.
"""
from commands.train import main
from util.cli import run

if __name__ == "__main__":
    run(main)
