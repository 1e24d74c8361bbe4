"""The training loop behind train.py: one process, torchrun on one node, or many nodes.

Per iteration: poly learning rate, forward with all losses, backward, SGD step. Loss
values stay on the device and are read back only every ``print_freq`` iterations (no
host-device sync inside the step); a non-finite value found then stops training, naming
the iteration and the loss component, before any checkpoint could take it in.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.evaluate import evaluate
from engine.video import VIDEO_BATCH_KEYS, is_video, validate_video, video_datasets, video_optimizer
from model import build_model
from util.amp import autocast, synchronize, to_device
from util.config import dump_cfg
from util.dataset import FewShotEvalDataset, FewShotTrainDataset, load_split_rank0_first, worker_init
from util.distributed import DistInfo, barrier
from util.fileio import atomic_write_text
from util.logger import format_eta
from util.vis import panel_image

log = logging.getLogger("ntrenetpp")

VAL_SEED_OFFSET = 1000
# batch keys of the model inputs (query, supports, support masks, query label, class)
IMAGE_BATCH_KEYS = ("query_img", "support_imgs", "support_masks", "query_mask", "class_id")   # validation episodes differ from the test seeds manual_seed + i


class NonFiniteLossError(RuntimeError):
    pass


def poly_lr(base_lr: float, it: int, max_iter: int, power: float, warmup_iters: int = 0) -> float:
    """PFENet's poly schedule per iteration, ``it`` counting from 1:
    ``base_lr * (1 - it / max_iter) ** power``; optional linear warm-up from 0.1x."""
    if warmup_iters and it <= warmup_iters:
        return base_lr * (0.1 + 0.9 * it / warmup_iters)
    return base_lr * (1 - min(it, max_iter) / max_iter) ** power


def train_loader(dataset: FewShotTrainDataset, cfg, info: DistInfo) -> DataLoader:
    if cfg.batch_size % info.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} (the global batch) is not divisible by "
                         f"{info.world_size} processes")
    sampler = dataset.sampler(cfg.epoch_size, cfg.manual_seed, info.world_size, info.rank)
    return DataLoader(dataset, batch_size=cfg.batch_size // info.world_size, sampler=sampler,
                      num_workers=cfg.workers, pin_memory=info.device.type == "cuda", drop_last=True,
                      persistent_workers=cfg.workers > 0, worker_init_fn=worker_init,
                      # its own generator: creating an epoch's iterator must not advance the global
                      # torch RNG (dropout's), or a resumed run would drift from the uninterrupted one
                      generator=torch.Generator().manual_seed(cfg.manual_seed))


@dataclass
class TrainState:
    epoch: int = 0          # epochs completed
    iteration: int = 0      # iterations completed (global)
    best_miou: float = -1.0


def build_training(cfg, info: DistInfo):
    """Model (wrapped for DDP/compile), optimizer and GradScaler."""
    model = to_device(build_model(cfg), cfg, info.device)
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
    def __init__(self, cfg, info: DistInfo, writer=None, keep_history: bool = False):
        self.cfg, self.info, self.writer = cfg, info, writer
        self.keep_history = keep_history
        self.model_dir = os.path.join(cfg.save_path, "model")
        torch.manual_seed(cfg.manual_seed + info.rank)   # dropout differs per rank, init is broadcast
        self.video = is_video(cfg)
        self.batch_keys = VIDEO_BATCH_KEYS if self.video else IMAGE_BATCH_KEYS
        if self.video:
            self.train_set, self.val_set = video_datasets(cfg, info, cfg.manual_seed + VAL_SEED_OFFSET)
        else:
            train_split = load_split_rank0_first(cfg, True)
            val_split = load_split_rank0_first(cfg, False) if cfg.evaluate else None
            self.train_set = FewShotTrainDataset(cfg, split=train_split)
        self.loader = train_loader(self.train_set, cfg, info)
        self.iters_per_epoch = len(self.loader)
        if self.iters_per_epoch == 0:
            raise ValueError(f"an epoch has no iteration: {len(self.loader.sampler)} episodes per process, fewer than "
                             f"the per-process batch {self.loader.batch_size}; raise epoch_size or lower batch_size")
        self.max_iter = cfg.epochs * self.iters_per_epoch
        if not self.video:
            self.val_set = None
        if cfg.evaluate and not self.video:
            self.val_set = FewShotEvalDataset(cfg, seed=cfg.manual_seed + VAL_SEED_OFFSET,
                                              num_episodes=cfg.val_num or cfg.test_num, split=val_split,
                                              rank=info.rank, world_size=info.world_size)
        self.model, self.net, self.optimizer, self.scaler = build_training(cfg, info)
        self.state = TrainState()
        self.pending: list[torch.Tensor] = []    # stacked loss values since the last read-back
        self.loss_names: list[str] = []
        self.history: list[dict] = []            # per-iteration loss values (keep_history, for tests)

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_path(self, name: str) -> str:
        return os.path.join(self.model_dir, f"{name}.pth")

    def save(self, name: str, metrics: dict | None = None) -> None:
        if self.info.is_main:
            save_checkpoint(self.checkpoint_path(name), self.model, self.cfg, self.optimizer, self.scaler,
                            self.state.epoch, self.state.iteration, self.state.best_miou,
                            dict(metrics or {}, iters_per_epoch=self.iters_per_epoch))
        barrier()

    def maybe_resume(self) -> None:
        resume = self.cfg.resume
        if not resume:
            return
        path = self.checkpoint_path("last") if resume == "auto" else resume
        if resume == "auto" and not os.path.isfile(path):
            log.info("resume auto: no %s yet, starting from scratch", path)
            return
        state = load_checkpoint(path, self.model, self.cfg, self.optimizer, self.scaler, restore_rng=True)
        saved_ipe = state.get("metrics", {}).get("iters_per_epoch", self.iters_per_epoch)
        if saved_ipe != self.iters_per_epoch:
            raise ValueError(f"{path} was trained with {saved_ipe} iterations per epoch, this run has "
                             f"{self.iters_per_epoch}: resume with the same batch_size, epoch_size and "
                             f"process count, or start a new experiment")
        if self.info.rank:   # dropout streams stay distinct per rank after a resume too
            torch.manual_seed(self.cfg.manual_seed + self.info.rank + state["iteration"])
        self.state = TrainState(state["iteration"] // self.iters_per_epoch, state["iteration"], state["best_miou"])
        log.info("resumed from %s at iteration %d (epoch %d), best mIoU so far %.2f",
                 path, self.state.iteration, self.state.epoch, self.state.best_miou)

    # ---------------------------------------------------------------- logging
    def flush_losses(self, lr: float, t_start: float, it_start: int) -> None:
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
        if self.keep_history:
            self.history += [dict(zip(self.loss_names, row.tolist())) for row in values]
        if self.writer is not None:
            for r in range(values.shape[0]):
                for c, name in enumerate(self.loss_names):
                    self.writer.add_scalar(f"train/loss_{name}", values[r, c].item(), first_it + r)
            self.writer.add_scalar("train/lr", lr, self.state.iteration)
        done = self.state.iteration - it_start
        per_it = (time.perf_counter() - t_start) / max(done, 1)
        mean = values.mean(0)
        parts = " ".join(f"{n} {mean[i]:.4f}" for i, n in enumerate(self.loss_names))
        log.info("epoch %d/%d iter %d/%d | %s | lr %.5f | %.3f s/it | eta %s",
                 self.state.epoch + 1, self.cfg.epochs,
                 self.state.iteration, self.max_iter, parts, lr, per_it,
                 format_eta(per_it * (self.max_iter - self.state.iteration)))

    # ---------------------------------------------------------------- steps
    def step(self, batch: dict, lr: float) -> None:
        dev = self.info.device
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
        q, s, m, y, c = (batch[k].to(dev, non_blocking=True) for k in self.batch_keys)
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
            return validate_video(self.model, self.val_set, self.cfg, self.info.device, self.state.epoch, self.writer)
        out = evaluate(self.model, self.val_set, self.cfg, self.info.device, keep_samples=self.cfg.tb_images)
        r = out.result
        log.info("validation after epoch %d: class mIoU %.2f, FB-IoU %.2f over %d episodes (%.1f ms/episode)",
                 self.state.epoch, r.miou, r.fbiou, r.episodes, out.ms_per_episode)
        log.info("  " + "  ".join(f"{k}: {v:.2f}" for k, v in r.class_iou.items()))
        if self.writer is not None:
            self.writer.add_scalar("val/miou", r.miou, self.state.epoch)
            self.writer.add_scalar("val/fbiou", r.fbiou, self.state.epoch)
            if out.samples:
                for i, sample in enumerate(out.samples):
                    self.writer.add_image(f"val/episode_{i}", panel_image(sample), self.state.epoch,
                                          dataformats="HWC")
        return {"miou": r.miou, "fbiou": r.fbiou, "class_iou": r.class_iou, "episodes": r.episodes}

    def stop_reached(self) -> bool:
        if self.cfg.stop_iter and self.state.iteration >= self.cfg.stop_iter:
            log.info("stop_iter %d reached: saved %s", self.cfg.stop_iter, self.checkpoint_path("last"))
            return True
        return False

    def train(self) -> dict:
        cfg = self.cfg
        if self.info.is_main:
            os.makedirs(self.model_dir, exist_ok=True)
            atomic_write_text(os.path.join(cfg.save_path, "config.yaml"), dump_cfg(cfg))
        self.maybe_resume()
        log.info("%d training episodes/epoch over %d images, %d iterations/epoch, %d in all; %d process(es)",
                 len(self.loader.sampler) * self.info.world_size, len(self.train_set), self.iters_per_epoch,
                 self.max_iter, self.info.world_size)
        metrics: dict = {}
        t_start, it_start = time.perf_counter(), self.state.iteration
        lr = cfg.base_lr
        show_bar = self.info.is_main and sys.stdout.isatty()
        while self.state.epoch < cfg.epochs:
            epoch = self.state.epoch
            skip = self.state.iteration - epoch * self.iters_per_epoch
            self.loader.sampler.set_epoch(epoch, start=skip * self.loader.batch_size)
            self.net.train()
            batches = self.loader
            if show_bar:
                batches = tqdm(batches, total=self.iters_per_epoch - skip, desc=f"epoch {epoch + 1}", leave=False)
            for batch in batches:
                lr = poly_lr(cfg.base_lr, self.state.iteration + 1, self.max_iter, cfg.power, cfg.warmup_iters)
                self.step(batch, lr)
                self.state.iteration += 1
                if self.state.iteration % cfg.print_freq == 0:
                    self.flush_losses(lr, t_start, it_start)
                # at an epoch's end the block below validates and saves; a mid-epoch save there
                # would let a resume skip that epoch's validation
                if self.state.iteration % self.iters_per_epoch == 0:
                    continue
                if cfg.ckpt_freq_iters and self.state.iteration % cfg.ckpt_freq_iters == 0:
                    self.flush_losses(lr, t_start, it_start)
                    self.save("last", metrics)
                if self.stop_reached():
                    self.flush_losses(lr, t_start, it_start)
                    self.save("last", metrics)
                    return metrics
            self.flush_losses(lr, t_start, it_start)
            self.state.epoch += 1
            if self.val_set is not None and (self.state.epoch % cfg.val_freq == 0 or self.state.epoch == cfg.epochs):
                metrics = self.validate()
                if metrics["miou"] > self.state.best_miou:
                    self.state.best_miou = metrics["miou"]
                    self.save("best", metrics)
                    log.info("new best class mIoU %.2f: saved %s", metrics["miou"], self.checkpoint_path("best"))
            self.save("last", metrics)
            if self.stop_reached():
                return metrics
        synchronize(self.info.device)
        log.info("training done: %d iterations, best validation class mIoU %.2f", self.state.iteration,
                 self.state.best_miou)
        return metrics

