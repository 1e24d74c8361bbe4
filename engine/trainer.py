"""The training loop behind train.py: one process, torchrun on one node, or many nodes.

Per iteration: poly learning rate, forward with all losses, backward, SGD step. Loss
values stay on the device and are read back only every ``print_freq`` iterations (no
host-device sync inside the step); a non-finite value found then stops training, naming
the iteration and the loss component, before any checkpoint could take it in.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from engine.checkpoint import load_checkpoint, pick_resume, read_checkpoint, save_checkpoint
from engine.evaluate import evaluate
from engine.experiment import ExperimentGuard
from engine.video import VIDEO_BATCH_KEYS, is_video, validate_video, video_datasets, video_optimizer
from model import build_model
from util.amp import TRAIN_INPUTS, autocast, batch_to_device, check_amp, synchronize, to_device
from util.config import dump_cfg
from dataset.image import FewShotEvalDataset, FewShotTrainDataset, close_loader, load_split_rank0_first, worker_init
from util.distributed import DistInfo
from util.errors import CheckpointError, ConfigError, UserError
from util.fileio import atomic_write_text
from util.interrupt import StopAgreement, StopRequest, TrainingInterrupted, stop_on_signals
from util.logger import EventWriter, format_eta, progress_stream
from util.vis import panel_image

log = logging.getLogger("ntrenetpp")

VAL_SEED_OFFSET = 1000   # validation episodes differ from the test seeds manual_seed + i


class NonFiniteLossError(RuntimeError):
    pass


def poly_lr(base_lr: float, it: int, max_iter: int, power: float, warmup_iters: int = 0) -> float:
    """PFENet's poly schedule per iteration, ``it`` counting from 1:
    ``base_lr * (1 - it / max_iter) ** power``; optional linear warm-up from 0.1x."""
    if warmup_iters and it <= warmup_iters:
        return base_lr * (0.1 + 0.9 * it / warmup_iters)
    return base_lr * (1 - min(it, max_iter) / max_iter) ** power


def train_loader(dataset: FewShotTrainDataset, cfg, info: DistInfo) -> DataLoader:
    """This process's share of ``epoch_size`` episodes per epoch, ``batch_size / processes`` at a time."""
    if cfg.batch_size % info.world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} (the global batch) is not divisible by "
                          f"{info.world_size} processes")
    sampler = dataset.sampler(cfg.epoch_size, cfg.manual_seed, info.world_size, info.rank)
    loader = DataLoader(dataset, batch_size=cfg.batch_size // info.world_size, sampler=sampler,
                        num_workers=cfg.workers, pin_memory=info.device.type == "cuda", drop_last=True,
                        persistent_workers=cfg.workers > 0, worker_init_fn=worker_init,
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


def build_training(cfg, info: DistInfo, warn_random_backbone: bool = True):
    """Model, the model wrapped for DDP/compile, optimizer and GradScaler."""
    check_amp(cfg.amp, info.device)
    model = to_device(build_model(cfg, warn_random_backbone), cfg, info.device)
    if cfg.sync_bn and info.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel over all parameters instead of a loop of per-tensor ops (2x faster on the CPU)
    fused = info.device.type in ("cpu", "cuda")
    if is_video(cfg):    # the reference's SGD for the head + Adam for the attention blocks
        optimizer = video_optimizer(model, cfg, fused)
    else:
        optimizer = torch.optim.SGD(params, lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                    fused=fused)
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.amp == "fp16")
    net = model
    if info.distributed:
        # the DO bank is kept identical by its own gather: never re-send its 41-158 MiB from rank 0
        # at each forward; other buffers (BN statistics) are broadcast only when they can drift
        bank = [name for name, _ in model.named_buffers() if name.startswith("memory_bank.")]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, bank)
        net = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                                      broadcast_buffers=not cfg.fix_bn)
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

    def __init__(self, cfg, info: DistInfo, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, loader: DataLoader | None = None,
                 val_set: FewShotEvalDataset | None = None, net: torch.nn.Module | None = None, writer=None,
                 tensorboard: bool = False, continue_cmd: str = ""):
        self.cfg, self.info, self.writer = cfg, info, writer
        self.tensorboard = tensorboard and info.is_main and writer is None
        self.continue_cmd = continue_cmd or "the same command with resume auto"
        self.model, self.net = model, model if net is None else net
        self.optimizer, self.scaler = optimizer, scaler
        self.loader, self.val_set = loader, val_set
        self.video = is_video(cfg)                 # video clips: engine/video.py's parts
        self.inputs = VIDEO_BATCH_KEYS if self.video else TRAIN_INPUTS
        self.model_dir = os.path.join(cfg.save_path, "model")
        self.state = TrainState()
        self.lr = cfg.base_lr
        self.pending: list[torch.Tensor] = []    # stacked loss values since the last read-back
        self.loss_names: list[str] = []
        self._clock = (time.perf_counter(), 0)   # (start time, iteration then) for s/it and the ETA
        self.run: dict = {}                      # facts kept in checkpoints: the TensorBoard folder
        self.stop = StopAgreement(info.distributed)
        self.request = StopRequest()
        self.lock = None                         # the folder's lock when the caller holds it (train.py)
        self.stopping = False                    # a stop agreed on at an epoch's last step
        self.stop_status = 0                     # the exit status all ranks agreed on (0: no stop)

    @classmethod
    def from_cfg(cls, cfg, info: DistInfo, writer=None, tensorboard: bool = False,
                 continue_cmd: str = "") -> "Trainer":
        """Seed this process, load both splits, build the loader, the validation episodes, the
        model (wrapped for DDP/compile), optimizer and GradScaler."""
        torch.manual_seed(cfg.manual_seed + info.rank)   # dropout differs per rank, init is broadcast
        if is_video(cfg):
            train_set, val_set = video_datasets(cfg, info, cfg.manual_seed + VAL_SEED_OFFSET)
            model, net, optimizer, scaler = build_training(cfg, info)
            return cls(cfg, info, model, optimizer, scaler, train_loader(train_set, cfg, info), val_set, net, writer,
                       tensorboard, continue_cmd)
        train_split = load_split_rank0_first(cfg, True)
        val_split = load_split_rank0_first(cfg, False) if cfg.evaluate else None
        loader = train_loader(FewShotTrainDataset(cfg, split=train_split), cfg, info)
        val_set = None
        if cfg.evaluate:
            val_set = FewShotEvalDataset(cfg, seed=cfg.manual_seed + VAL_SEED_OFFSET,
                                         num_episodes=cfg.val_num or cfg.test_num, split=val_split,
                                         rank=info.rank, world_size=info.world_size)
        model, net, optimizer, scaler = build_training(cfg, info)
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

    # ---------------------------------------------------------------- the policy
    def train(self) -> dict:
        """Hold the experiment folder (rank 0: lock, no silent restart over checkpoints; all
        ranks agree), then run with SIGINT/SIGTERM turned into a stop after the step in flight."""
        if self.loader is None:
            raise ValueError("Trainer.train needs a loader (Trainer.from_cfg builds one)")
        error, guard = None, None
        if self.info.is_main:
            try:
                guard = ExperimentGuard(self.cfg, self.model_dir, self.lock).__enter__()
            except UserError as e:
                error = e
        self.stop.raise_if_any_failed(error)
        try:
            with stop_on_signals() as self.request:
                return self.run_epochs()
        finally:
            close_loader(self.loader)   # its workers ignore SIGTERM: left to the exit, they are waited for forever
            if self.writer is not None and self.tensorboard:
                self.writer.close()
            if guard is not None:
                guard.__exit__(None, None, None)

    def run_epochs(self) -> dict:
        """Epoch after epoch: the iterations, then at the epoch's end validate (every
        ``val_freq`` epochs and after the last), keep ``best.pth``, write ``last.pth``;
        ``stop_iter`` ends the run after the next ``last.pth``; so does a signal (then
        TrainingInterrupted)."""
        metrics = self.start()
        if self.run.pop("validation_pending", False):   # the run stopped before it validated
            if self.validation_due():
                log.info("the validation of epoch %d was left for the resume: running it now", self.state.epoch)
                metrics = self.validate()
                self.keep_if_best(metrics)
            self.save("last", metrics)
        while self.state.epoch < self.cfg.epochs:
            if self.run_epoch(metrics):
                self.state.epoch += 1
                if self.stopping and self.validation_due():
                    # a stop must be quick (a scheduler's grace is ~30 s): last.pth first, marked so
                    # that the resume runs this epoch's validation before anything else
                    self.run["validation_pending"] = True
                    self.save("last", metrics)
                    self.interrupted()
                if self.validation_due():
                    metrics = self.validate()
                    self.keep_if_best(metrics)
            self.save("last", metrics)
            if self.stopping and self.state.epoch < self.cfg.epochs:
                self.interrupted()
            if self.stop_reached():
                log.info("stop_iter %d reached: saved %s", self.cfg.stop_iter, self.checkpoint_path("last"))
                return metrics
        synchronize(self.info.device)
        log.info("training done: %d iterations, best validation class mIoU %.2f", self.state.iteration,
                 self.state.best_miou)
        return metrics

    def start(self) -> dict:
        """The experiment folder and its config copy, a resume, the run's size in the log;
        returns the metrics of the checkpoint resumed (empty when none)."""
        if self.info.is_main:
            atomic_write_text(os.path.join(self.cfg.save_path, "config.yaml"), dump_cfg(self.cfg))
        metrics = self.maybe_resume()
        self.open_event_writer()
        log.info("%d training episodes/epoch over %d images, %d iterations/epoch, %d in all; %d process(es)",
                 len(self.loader.sampler) * self.info.world_size, len(self.loader.dataset), self.iters_per_epoch,
                 self.max_iter, self.info.world_size)
        self._clock = (time.perf_counter(), self.state.iteration)
        return metrics

    def run_epoch(self, metrics: dict) -> bool:
        """The current epoch's iterations (after a resume, the rest of them); False when
        ``stop_iter`` cut it short."""
        cfg, epoch = self.cfg, self.state.epoch
        skip = self.state.iteration - epoch * self.iters_per_epoch
        self.loader.sampler.set_epoch(epoch, start=skip * self.loader.batch_size)
        self.net.train()
        batches = self.loader
        bar_stream = progress_stream() if self.info.is_main else None
        if bar_stream is not None:
            batches = tqdm(batches, total=self.iters_per_epoch - skip, desc=f"epoch {epoch + 1}", leave=False,
                           file=bar_stream)
        batches = iter(batches)
        while True:
            error = None
            try:
                batch = next(batches)
            except StopIteration:                # every rank has as many batches (the sampler pads)
                break
            except UserError as e:               # a bad file on this rank (in a loader worker or not)
                error = e
            # before the step's collectives: all ranks stop with a bad file's message, none is left
            # waiting in DDP's all-reduce for the rank that failed (one CPU all-reduce, none alone)
            self.stop.raise_if_any_failed(error)
            self.lr = poly_lr(cfg.base_lr, self.state.iteration + 1, self.max_iter, cfg.power, cfg.warmup_iters)
            self.step(batch, self.lr)
            self.state.iteration += 1
            if self.state.iteration % cfg.print_freq == 0:
                self.flush_losses()
            stop = self.stop_agreed()
            # an epoch's last iteration is left to run_epochs(), which validates before it saves: a
            # save here would let a resume skip that epoch's validation (a stop leaves it to the resume)
            if self.state.iteration % self.iters_per_epoch == 0:
                self.stopping = stop
                continue
            if stop:
                self.save("last", metrics)
                self.interrupted()
            if self.stop_reached():
                return False
            if cfg.ckpt_freq_iters and self.state.iteration % cfg.ckpt_freq_iters == 0:
                self.save("last", metrics)
        self.flush_losses()
        return True

    def validation_due(self) -> bool:
        epoch = self.state.epoch
        return self.val_set is not None and (epoch % self.cfg.val_freq == 0 or epoch == self.cfg.epochs)

    def keep_if_best(self, metrics: dict) -> None:
        if metrics["miou"] > self.state.best_miou:
            self.state.best_miou = metrics["miou"]
            self.save("best", metrics)
            log.info("new best class mIoU %.2f: saved %s", metrics["miou"], self.checkpoint_path("best"))

    def stop_reached(self) -> bool:
        return bool(self.cfg.stop_iter) and self.state.iteration >= self.cfg.stop_iter

    # ---------------------------------------------------------------- stopping on a signal
    def stop_agreed(self) -> bool:
        """Once per step on every rank: was any rank asked to stop (SIGINT/SIGTERM)? A CPU
        all-reduce under torchrun (util/interrupt.py), nothing with one process."""
        self.stop_status = self.stop.agreed_max(self.request.exit_status if self.request.requested else 0)
        return self.stop_status > 0

    def interrupted(self) -> None:
        """After the stop's save: one line saying where it stopped and how to continue."""
        r = self.request
        into = self.state.iteration - self.state.epoch * self.iters_per_epoch
        where = (f"at the end of epoch {self.state.epoch}" if into == 0 else
                 f"in epoch {self.state.epoch + 1}, {into}/{self.iters_per_epoch} into it")
        pending = (f" (epoch {self.state.epoch}'s validation runs first when it continues)"
                   if self.run.get("validation_pending") else "")
        message = (f"stopped by {r.name or 'a signal to another process'} after iteration {self.state.iteration} "
                   f"of {self.max_iter} ({where}); {self.checkpoint_path('last')} is saved{pending}. "
                   f"Continue with: {self.continue_cmd}")
        log.info(message)
        raise TrainingInterrupted(message, self.stop_status or r.exit_status)

    def open_event_writer(self) -> None:
        """One TensorBoard folder per run, ``<save_path>/tb/<start time>``; a resume continues
        the folder of the run it resumes, dropping the steps that run wrote after the checkpoint."""
        resumed = self.state.iteration > 0 and bool(self.run.get("tb"))
        if not resumed:
            name = base = time.strftime("%Y%m%d-%H%M%S")
            k = 1
            while os.path.exists(os.path.join(self.cfg.save_path, "tb", name)):
                k += 1
                name = f"{base}-{k}"
            self.run = {"tb": name}
        if self.tensorboard:
            self.writer = EventWriter(os.path.join(self.cfg.save_path, "tb", self.run["tb"]),
                                      purge_step=self.state.iteration + 1 if resumed else None)

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_path(self, name: str) -> str:
        return os.path.join(self.model_dir, f"{name}.pth")

    def save(self, name: str, metrics: dict | None = None) -> None:
        """Write ``model/<name>.pth``, after the pending losses are checked: a non-finite
        loss stops training before any checkpoint takes it in. Rank 0 writes (``last``
        rotates: the one replaced stays as ``last.prev.pth``); if it fails (disk full), every
        rank stops with its message instead of waiting for it."""
        self.flush_losses()
        error = None
        if self.info.is_main:
            try:
                save_checkpoint(self.checkpoint_path(name), self.model, self.cfg, self.optimizer, self.scaler,
                                self.state.epoch, self.state.iteration, self.state.best_miou,
                                dict(metrics or {}, iters_per_epoch=self.iters_per_epoch), run=self.run,
                                keep_previous=name == "last")
            except UserError as e:
                error = e
        self.stop.raise_if_any_failed(error)

    def maybe_resume(self) -> dict:
        """Load the checkpoint ``resume`` names; returns its metrics (empty when none)."""
        resume = self.cfg.resume
        if not resume:
            return {}
        if resume == "auto":
            picked = pick_resume(self.checkpoint_path("last"))   # last.pth, or last.prev.pth if it is damaged
            if picked is None:
                log.info("resume auto: no %s yet, starting from scratch", self.checkpoint_path("last"))
                return {}
            path, state = picked
        else:
            path, state = resume, read_checkpoint(resume)
        saved_shot = (state.get("config") or {}).get("shot", self.cfg.shot)
        if saved_shot != self.cfg.shot:   # not an ARCH_KEY: test.py may evaluate a model at any K
            raise CheckpointError(f"{path} was trained with shot {saved_shot}, this run has shot {self.cfg.shot}: "
                                  f"resume with shot {saved_shot}, or train the {self.cfg.shot}-shot model into "
                                  f"its own folder (sh train.sh <dataset> <exp_name> shot {self.cfg.shot} uses "
                                  f"exp/<dataset>/<exp_name>_shot{self.cfg.shot})")
        load_checkpoint(path, self.model, self.cfg, self.optimizer, self.scaler, restore_rng=True, state=state)
        saved_ipe = state.get("metrics", {}).get("iters_per_epoch", self.iters_per_epoch)
        if saved_ipe != self.iters_per_epoch:
            raise CheckpointError(f"{path} was trained with {saved_ipe} iterations per epoch, this run has "
                                  f"{self.iters_per_epoch}: resume with the same batch_size, epoch_size and "
                                  f"process count, or start a new experiment")
        if self.info.rank:   # dropout streams stay distinct per rank after a resume too
            torch.manual_seed(self.cfg.manual_seed + self.info.rank + state["iteration"])
        self.state = TrainState(state["iteration"] // self.iters_per_epoch, state["iteration"], state["best_miou"])
        self.run = dict(state.get("run") or {})
        log.info("resumed from %s at iteration %d (epoch %d), best mIoU so far %.2f",
                 path, self.state.iteration, self.state.epoch, self.state.best_miou)
        return {k: v for k, v in state.get("metrics", {}).items() if k != "iters_per_epoch"}

    # ---------------------------------------------------------------- logging
    def flush_losses(self) -> None:
        """Read the pending loss values back (one sync), check them, log them."""
        if not self.pending:
            return
        values = torch.stack(self.pending).float().cpu()
        first_it = self.state.iteration - len(self.pending) + 1
        self.pending.clear()
        bad = ~torch.isfinite(values)
        # every rank must stop together: gradients are all-reduced, so one rank's NaN is everyone's
        any_bad = torch.tensor(float(bad.any()), device=self.info.device)
        if self.info.distributed:
            torch.distributed.all_reduce(any_bad, op=torch.distributed.ReduceOp.MAX)
        if any_bad.item():
            last = self.checkpoint_path("last")
            where = "on another process"
            if bad.any():
                row, col = [int(x) for x in bad.nonzero()[0]]
                where = (f"at iteration {first_it + row}: component '{self.loss_names[col]}' = "
                         f"{values[row, col].item()}")
            raise NonFiniteLossError(
                f"non-finite loss {where}. Training stopped; the last good checkpoint "
                f"({last if os.path.isfile(last) else 'none written yet'}) is intact. "
                f"Try a lower base_lr, amp none, or check the data.")
        if self.writer is not None:
            for r in range(values.shape[0]):
                for c, name in enumerate(self.loss_names):
                    self.writer.add_scalar(f"train/loss_{name}", values[r, c].item(), first_it + r)
            self.writer.add_scalar("train/lr", self.lr, self.state.iteration)
        t_start, it_start = self._clock
        done = self.state.iteration - it_start
        per_it = (time.perf_counter() - t_start) / max(done, 1)
        mean = values.mean(0)
        parts = " ".join(f"{n} {mean[i]:.4f}" for i, n in enumerate(self.loss_names))
        # the loss window is the iterations since the last line (every save flushes first, so a
        # stop and its resume split a window: each line states its own); the speed is over this
        # process's own iterations
        window = f"iter {first_it}-{self.state.iteration}" if values.shape[0] > 1 else f"iter {first_it}"
        log.info("epoch %d/%d iter %d/%d | mean of %s: %s | lr %.5f | %.3f s/it over %d iter | eta %s",
                 self.state.epoch + 1, self.cfg.epochs,
                 self.state.iteration, self.max_iter, window, parts, self.lr, per_it, done,
                 format_eta(per_it * (self.max_iter - self.state.iteration)))

    # ---------------------------------------------------------------- one step, one validation
    def step(self, batch: dict, lr: float) -> None:
        dev = self.info.device
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
        q, s, m, y, c = batch_to_device(batch, dev, self.inputs).values()
        with autocast(dev, self.cfg.amp):
            _, losses = self.net(q, s, m, query_mask=y, class_ids=c)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["total"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if not self.loss_names:
            self.loss_names = list(losses)
        self.pending.append(torch.stack([losses[k].detach().float() for k in self.loss_names]))

    def validate(self) -> dict:
        if self.video:
            # at the global iteration, like the image curves (and purged with them on a resume)
            return validate_video(self.model, self.val_set, self.cfg, self.info.device, self.state.epoch, self.writer,
                                  step=self.state.iteration)
        out = evaluate(self.model, self.val_set, self.cfg, self.info.device, keep_samples=self.cfg.tb_images)
        r = out.result
        log.info("validation after epoch %d: class mIoU %.2f, FB-IoU %.2f over %d episodes (%.1f ms/episode)",
                 self.state.epoch, r.miou, r.fbiou, r.episodes, out.ms_per_episode)
        log.info("  " + "  ".join(f"{k}: {v:.2f}" for k, v in r.class_iou.items()))
        if self.writer is not None:
            # at the global iteration, like the training curves (and purged with them on a resume)
            self.writer.add_scalar("val/miou", r.miou, self.state.iteration)
            self.writer.add_scalar("val/fbiou", r.fbiou, self.state.iteration)
            for i, sample in enumerate(out.samples):
                self.writer.add_image(f"val/episode_{i}", panel_image(sample), self.state.iteration,
                                      dataformats="HWC")
        return {"miou": r.miou, "fbiou": r.fbiou, "class_iou": r.class_iou, "episodes": r.episodes}
