"""Train NTRENet++: python train.py --config CFG [KEY VALUE ...]

Single process by default; multi-GPU / multi-node through torchrun (NGPUS=4 sh train.sh ...).
Ctrl-C or SIGTERM stops after the step in flight with last.pth saved (exit 130 / 143) and
prints the command that continues the run.
"""
import sys

import torch.distributed

from engine.experiment import StartupCleanup, take_lock
from engine.preflight import preflight
from engine.trainer import NonFiniteLossError, Trainer
from util.config import experiment_cfg
from util.distributed import barrier, cleanup, init_distributed
from util.errors import UserError
from util.host_memory import tune_cpu_process
from util.interrupt import TrainingInterrupted, continue_command
from util.logger import setup_logger


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = experiment_cfg(__doc__, argv)
    preflight(cfg, "train")     # every check that needs no data, before anything is read or created
    info = init_distributed(cfg.device)
    startup = StartupCleanup(cfg.save_path, info.is_main)
    lock = trainer = None
    try:
        lock = take_lock(cfg, info)     # before anything is logged or loaded: a refused run writes nothing
        if info.device.type == "cpu":
            tune_cpu_process()      # keep freed memory, flush denormals (docs/benchmarks.md has what each bought)
        log = setup_logger(cfg.save_path, info.rank, "train.log")
        log.info("experiment folder %s, device %s, %d process(es)%s", cfg.save_path, info.device, info.world_size,
                 f", process group {torch.distributed.get_backend()}" if info.distributed else "")
        trainer = Trainer.from_cfg(cfg, info, tensorboard=True, continue_cmd=continue_command(argv))
        trainer.lock = lock
        metrics = trainer.train()
        # every rank leaves its last collective before any tears the process group down: a rank
        # destroying gloo while another still talks to it can abort at exit
        barrier()
        return metrics
    except UserError:
        if trainer is None or not trainer.started:     # refused before training began: leave nothing
            if lock is not None:
                lock.release()
            startup.discard()
        raise
    except NonFiniteLossError as e:
        log.error(str(e))
        sys.exit(3)
    except TrainingInterrupted as e:   # the line saying where it stopped and how to continue is logged
        sys.exit(e.exit_status)
    finally:
        if lock is not None:
            lock.release()
        cleanup()

