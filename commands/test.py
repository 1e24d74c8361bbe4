"""Evaluate NTRENet++: python test.py --config CFG [KEY VALUE ...]

weight best|last|PATH; shot 5 evaluates any model at 5 shots; save_pred True writes the
predicted masks; vis N saves N panels per seed. torchrun shards the episodes.
"""
from engine.experiment import StartupCleanup
from engine.preflight import preflight
from engine.tester import run_test
from util.config import experiment_cfg
from util.distributed import cleanup, init_distributed
from util.errors import UserError
from util.host_memory import tune_cpu_process
from util.logger import setup_logger


def main(argv=None) -> dict:
    cfg = experiment_cfg(__doc__, argv)
    state = preflight(cfg, "test")     # every check that needs no data, before anything is read or created
    info = init_distributed(cfg.device)
    startup = StartupCleanup(cfg.save_path, info.is_main)
    try:
        if info.device.type == "cpu":
            tune_cpu_process()      # keep freed memory, flush denormals (docs/benchmarks.md has what each bought)
        setup_logger(cfg.save_path, info.rank, "test.log")
        return run_test(cfg, info, state=state)
    except UserError:       # a failed test leaves no log of itself (nor a folder it created)
        startup.discard()
        raise
    finally:
        cleanup()

