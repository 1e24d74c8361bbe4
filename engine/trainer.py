"""The training loop behind train.py: one process, torchrun on one node, or many nodes.

:class:`Trainer` is given its parts (model, optimiser, loader, validation episodes) and runs a
short loop — per iteration the poly learning rate, a forward with all losses, backward, an
optimiser step — calling its hooks (engine/hooks.py) after each step and each epoch: resume,
loss logging and the non-finite stop, the stop on a signal, validation and ``best.pth``,
``last.pth``. The task (engine/tasks/) supplies what differs between images and videos.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset.image import close_loader, loader_workers, worker_init
from engine.checkpoint import save_checkpoint
from engine.experiment import ExperimentGuard
from engine.hooks import (LossLog, NonFiniteLossError, PeriodicCheckpoint, ResumeHook, StopOnSignal, StopTraining,
                          Validation)
from engine.networks import build_model
from engine.tasks import Task, task_for
from util.amp import autocast, batch_to_device, check_amp, synchronize, to_device
from util.config import validate
from util.distributed import DistInfo
from util.errors import ConfigError, UserError
from util.interrupt import StopAgreement, StopRequest, stop_on_signals
from util.logger import progress_stream

log = logging.getLogger("ntrenetpp")

VAL_SEED_OFFSET = 1000   # validation episodes differ from the test seeds manual_seed + i

__all__ = ["NonFiniteLossError", "Trainer", "TrainState", "build_training", "poly_lr", "train_loader"]


def poly_lr(base_lr: float, it: int, max_iter: int, power: float, warmup_iters: int = 0) -> float:
    """PFENet's poly schedule per iteration, ``it`` counting from 1:
    ``base_lr * (1 - it / max_iter) ** power``; optional linear warm-up from 0.1x."""
    if warmup_iters and it <= warmup_iters:
        return base_lr * (0.1 + 0.9 * it / warmup_iters)
    return base_lr * (1 - min(it, max_iter) / max_iter) ** power


def train_loader(dataset, cfg, info: DistInfo) -> DataLoader:
    """This process's share of ``epoch_size`` episodes per epoch, ``batch_size / processes`` at a time."""
    if cfg.batch_size % info.world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} (the global batch) is not divisible by "
                          f"{info.world_size} processes")
    sampler = dataset.sampler(cfg.epoch_size, cfg.manual_seed, info.world_size, info.rank)
    loader = DataLoader(dataset, batch_size=cfg.batch_size // info.world_size, sampler=sampler,
                        num_workers=loader_workers(cfg.workers), pin_memory=info.device.type == "cuda",
                        drop_last=True, persistent_workers=cfg.workers > 0, worker_init_fn=worker_init,
                        # its own generator: creating an epoch's iterator must not advance the global
                        # torch RNG (dropout's), or a resumed run would drift from the uninterrupted one
                        generator=torch.Generator().manual_seed(cfg.manual_seed))
    if len(loader) == 0:
        raise ConfigError(f"an epoch has no iteration: {len(sampler)} episodes per process, fewer than the "
                          f"per-process batch {loader.batch_size}; raise epoch_size or lower batch_size")
    return loader


@dataclass
class TrainState:
    epoch: int = 0          # epochs completed
    iteration: int = 0      # iterations completed (global)
    best_miou: float = -1.0


def build_training(cfg, info: DistInfo, warn_random_backbone: bool = True, task: Task | None = None):
    """Model, the model wrapped for DDP/compile, the task's optimiser and the GradScaler."""
    check_amp(cfg.amp, info.device)
    task = task or task_for(cfg)
    model = to_device(build_model(cfg, warn_random_backbone), info.device, cfg.channels_last)
    if cfg.sync_bn and info.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # fused: one kernel over all parameters instead of a loop of per-tensor ops (2x faster on the CPU)
    optimizer = task.optimizer(model, cfg, fused=info.device.type in ("cpu", "cuda"))
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.amp == "fp16")
    net = model
    if info.distributed:
        # buffers a network keeps identical across ranks itself (NTRENet++'s DO bank: its own gather)
        # are never sent from rank 0, at start or at each forward (docs/extending.md,
        # ddp_ignored_buffers); other buffers (BN statistics) are sent once at the start (equal on
        # every rank then: the same initialisation or weight file) and at each forward only when
        # they can drift (fix_bn False). forward_sync_buffers replaces the deprecated broadcast_buffers.
        ignored = list(getattr(model, "ddp_ignored_buffers", lambda: [])())
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
        net = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                                      forward_sync_buffers=not cfg.fix_bn)
    if cfg.compile:
        net = torch.compile(net)
    return model, net, optimizer, scaler


class Trainer:
    """The training loop, given its parts.

    ``model`` is the plain network (checkpoints and validation use it), ``net`` what a step
    calls (``model`` wrapped for DDP / torch.compile; ``model`` itself by default),
    ``loader`` the training episodes (a :func:`train_loader`; only :meth:`train` needs it, a
    :meth:`step` does not), ``val_set`` the validation episodes (None: no validation).
    :meth:`from_cfg` builds every part from a config, as train.py does.

    ``writer``: where scalars go (a TensorBoard-like ``add_scalar``/``add_image``), or
    ``tensorboard=True``: one TensorBoard folder per run under ``<save_path>/tb`` (rank 0).
    ``continue_cmd``: the command that continues the run, printed when a signal stops it.
    """

    def __init__(self, cfg, info: DistInfo, model: torch.nn.Module, optimizer, scaler: torch.amp.GradScaler,
                 loader: DataLoader | None = None, val_set=None, net: torch.nn.Module | None = None, writer=None,
                 tensorboard: bool = False, continue_cmd: str = ""):
        validate(cfg)
        self.cfg, self.info, self.writer, self.task = cfg, info, writer, task_for(cfg)
        self.continue_cmd = continue_cmd or "the same command with resume auto"
        self.model, self.net = model, model if net is None else net
        self.optimizer, self.scaler = optimizer, scaler
        self.loader, self.val_set = loader, val_set
        self.model_dir = os.path.join(cfg.save_path, "model")
        self.state = TrainState()
        self.lr = cfg.base_lr
        self.metrics: dict = {}                  # the latest validation's figures (kept in checkpoints)
        self.run: dict = {}                      # facts kept in checkpoints: the TensorBoard folder
        self.stop = StopAgreement(info.distributed)
        self.request = StopRequest()
        self.lock = None                         # the folder's lock when the caller holds it (train.py)
        self.started = False                     # past start-up (folder held, resume loaded): training
        self.losses = LossLog(tensorboard and info.is_main and writer is None)
        self.validation = Validation()
        self.hooks = [ResumeHook(), self.losses, StopOnSignal(), self.validation, PeriodicCheckpoint()]
        for hook in self.hooks:
            hook.trainer = self

    @classmethod
    def from_cfg(cls, cfg, info: DistInfo, writer=None, tensorboard: bool = False,
                 continue_cmd: str = "") -> "Trainer":
        """Seed this process, build the task's training and validation episodes, the loader, the
        model (wrapped for DDP/compile), optimiser and GradScaler."""
        validate(cfg)
        task = task_for(cfg)
        torch.manual_seed(cfg.manual_seed + info.rank)   # dropout differs per rank, init is broadcast
        loader = train_loader(task.train_dataset(cfg, info), cfg, info)
        val_set = task.val_dataset(cfg, info, cfg.manual_seed + VAL_SEED_OFFSET) if cfg.evaluate else None
        model, net, optimizer, scaler = build_training(cfg, info, task=task)
        return cls(cfg, info, model, optimizer, scaler, loader, val_set, net, writer, tensorboard, continue_cmd)

    @property
    def iters_per_epoch(self) -> int:
        # a whole epoch's batches: not len(self.loader), which after a mid-epoch resume counts
        # only the rest of that epoch (the sampler skips its first items) and would shrink
        # max_iter, hence the poly learning rate, for the resumed run
        return self.loader.sampler.per_rank // self.loader.batch_size

    @property
    def max_iter(self) -> int:
        return self.cfg.epochs * self.iters_per_epoch

    def call(self, stage: str) -> None:
        for hook in self.hooks:
            getattr(hook, stage)()

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict:
        """Hold the experiment folder (rank 0: lock, no silent restart over checkpoints; all
        ranks agree), turn SIGINT/SIGTERM into a stop after the step in flight, and run epoch
        after epoch; returns the last validation's metrics."""
        if self.loader is None:
            raise ValueError("Trainer.train needs a loader (Trainer.from_cfg builds one)")
        with contextlib.ExitStack() as stack:
            self.hold_folder(stack)
            stack.callback(self.close_writer)
            stack.callback(close_loader, self.loader)   # its workers ignore SIGTERM: left to the exit, they hang
            self.request = stack.enter_context(stop_on_signals())
            self.call("before_train")
            self.started = True
            try:
                while self.state.epoch < self.cfg.epochs:
                    self.run_epoch()
            except StopTraining:
                return self.metrics
            synchronize(self.info.device)
            log.info("training done: %d iterations, best validation %s %.2f", self.state.iteration,
                     self.task.selection_metric, self.state.best_miou)
            return self.metrics

    def run_epoch(self) -> None:
        """The current epoch's iterations (after a resume, the rest of them), then its end."""
        skip = self.state.iteration - self.state.epoch * self.iters_per_epoch
        self.loader.sampler.set_epoch(self.state.epoch, start=skip * self.loader.batch_size)
        self.net.train()
        for batch in self.batches(skip):
            self.lr = poly_lr(self.cfg.base_lr, self.state.iteration + 1, self.max_iter, self.cfg.power,
                              self.cfg.warmup_iters)
            self.step(batch, self.lr)
            self.state.iteration += 1
            self.call("after_step")
        self.state.epoch += 1
        self.call("after_epoch")

    def batches(self, skip: int):
        """This epoch's batches (with a progress bar on rank 0). A bad file on any rank stops every
        rank with its message before the step's collectives: none is left waiting in DDP's
        all-reduce for the rank that failed (one CPU all-reduce per batch, none alone)."""
        batches = self.loader
        bar_stream = progress_stream() if self.info.is_main else None
        if bar_stream is not None:
            batches = tqdm(batches, total=self.iters_per_epoch - skip, desc=f"epoch {self.state.epoch + 1}",
                           leave=False, file=bar_stream)
        batches = iter(batches)
        while True:
            error = None
            try:
                batch = next(batches)
            except StopIteration:                # every rank has as many batches (the sampler pads)
                return
            except UserError as e:               # a bad file on this rank (in a loader worker or not)
                error = e
            self.stop.raise_if_any_failed(error)
            yield batch

    def step(self, batch: dict, lr: float) -> None:
        dev = self.info.device
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
        q, s, m, y, c = batch_to_device(batch, dev, self.task.train_inputs).values()
        with autocast(dev, self.cfg.amp):
            logits, losses = self.net(q, s, m, query_mask=y, class_ids=c)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["total"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # what every network's training shows besides its losses: the share of query pixels it predicts
        # as target (channel 1 of the logits, B×2×H×W or B×T×2×H×W)
        if isinstance(logits, torch.Tensor) and logits.dim() >= 3:
            losses = {**losses, "monitor/foreground": (logits.detach().argmax(dim=-3) == 1).float().mean()}
        self.losses.record(losses)

    # ---------------------------------------------------------------- the run's surroundings
    def hold_folder(self, stack: contextlib.ExitStack) -> None:
        """Rank 0 enters the experiment folder's guard (lock, no silent restart over checkpoints)
        for the run's length; every rank stops with its message if it refuses."""
        error = None
        if self.info.is_main:
            try:
                stack.enter_context(ExperimentGuard(self.cfg, self.model_dir, self.lock))
            except UserError as e:
                error = e
        self.stop.raise_if_any_failed(error)

    def close_writer(self) -> None:
        if self.writer is not None and self.losses.tensorboard:
            self.writer.close()

    def checkpoint_path(self, name: str) -> str:
        return os.path.join(self.model_dir, f"{name}.pth")

    def save(self, name: str) -> None:
        """Write ``model/<name>.pth``, after the pending losses are checked: a non-finite
        loss stops training before any checkpoint takes it in. Rank 0 writes (``last``
        rotates: the one replaced stays as ``last.prev.pth``); if it fails (disk full), every
        rank stops with its message instead of waiting for it."""
        self.losses.flush()
        error = None
        if self.info.is_main:
            try:
                save_checkpoint(self.checkpoint_path(name), self.model, self.cfg, self.optimizer, self.scaler,
                                self.state.epoch, self.state.iteration, self.state.best_miou,
                                dict(self.metrics, iters_per_epoch=self.iters_per_epoch), run=self.run,
                                keep_previous=name == "last")
            except UserError as e:
                error = e
        self.stop.raise_if_any_failed(error)
