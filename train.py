"""Train NTRENet++: python train.py --config CFG [KEY VALUE ...]

Single process by default; multi-GPU / multi-node through torchrun (NGPUS=4 sh train.sh ...).
"""
import sys

from tensorboardX import SummaryWriter

from engine.trainer import NonFiniteLossError, Trainer
from util.cli import run
from util.config import experiment_cfg
from util.distributed import cleanup, init_distributed
from util.host_memory import tune_cpu_process
from util.logger import setup_logger


def main(argv=None) -> dict:
    cfg = experiment_cfg(__doc__, argv)
    info = init_distributed(cfg.device)
    if info.device.type == "cpu":
        tune_cpu_process()      # keep freed memory, flush denormals (docs/benchmarks.md has what each bought)
    log = setup_logger(cfg.save_path, info.rank, "train.log")
    writer = None
    if info.is_main:
        writer = SummaryWriter(cfg.save_path)
    log.info("experiment folder %s, device %s, %d process(es)", cfg.save_path, info.device, info.world_size)
    try:
        return Trainer.from_cfg(cfg, info, writer).train()
    except NonFiniteLossError as e:
        log.error(str(e))
        sys.exit(3)
    finally:
        if writer is not None:
            writer.close()
        cleanup()


if __name__ == "__main__":
    run(main)
