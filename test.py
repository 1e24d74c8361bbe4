"""Evaluate NTRENet++: python test.py --config CFG [KEY VALUE ...]

weight best|last|PATH; shot 5 evaluates any model at 5 shots; save_pred True writes the
predicted masks; vis N saves N panels per seed. torchrun shards the episodes.
"""
import argparse

from train import default_save_path
from util.config import load_cfg, parse_args_with_overrides
from util.distributed import cleanup, init_distributed
from util.logger import setup_logger
from util.tester import run_test


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="config/<dataset>/<dataset>_<exp>.yaml")
    args, opts = parse_args_with_overrides(parser, argv)
    cfg = load_cfg(args.config, opts)
    cfg.save_path = cfg.save_path or default_save_path(args.config, cfg.dataset)
    info = init_distributed(cfg.device)
    setup_logger(cfg.save_path, info.rank, "test.log")
    try:
        return run_test(cfg, info)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
