"""Train NTRENet++: python train.py --config CFG [KEY VALUE ...]

Single process by default; multi-GPU / multi-node through torchrun (NGPUS=4 sh train.sh ...).
"""
import argparse
import os
import sys

from util.config import load_cfg, parse_args_with_overrides
from util.distributed import cleanup, init_distributed
from util.logger import setup_logger
from util.trainer import NonFiniteLossError, Trainer


def default_save_path(config_path: str, dataset: str) -> str:
    """exp/<dataset>/<exp_name>, exp_name from config/<dataset>/<dataset>_<exp_name>.yaml."""
    stem = os.path.splitext(os.path.basename(config_path))[0]
    return os.path.join("exp", dataset, stem[len(dataset) + 1:] if stem.startswith(dataset + "_") else stem)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="config/<dataset>/<dataset>_<exp>.yaml")
    args, opts = parse_args_with_overrides(parser, argv)
    cfg = load_cfg(args.config, opts)
    cfg.save_path = cfg.save_path or default_save_path(args.config, cfg.dataset)
    info = init_distributed(cfg.device)
    log = setup_logger(cfg.save_path, info.rank, "train.log")
    writer = None
    if info.is_main:
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(cfg.save_path)
    log.info("config %s, experiment folder %s, device %s", args.config, cfg.save_path, info.device)
    try:
        return Trainer(cfg, info, writer).train()
    except NonFiniteLossError as e:
        log.error(str(e))
        sys.exit(3)
    finally:
        if writer is not None:
            writer.close()
        cleanup()


if __name__ == "__main__":
    main()
