"""Evaluate NTRENet++: python test.py --config CFG [KEY VALUE ...]

weight best|last|PATH; shot 5 evaluates any model at 5 shots; save_pred True writes the
predicted masks; vis N saves N panels per seed. torchrun shards the episodes.
"""
from commands.test import main
from util.cli import run

if __name__ == "__main__":
    run(main)
