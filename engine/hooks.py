"""The training loop's hooks (engine/trainer.py): each owns one concern of a run and is called
at fixed points of the loop — before training, after each step, after each epoch — in the
order the trainer lists them.

- :class:`ResumeHook` — the experiment's config copy, and the checkpoint ``resume`` names;
- :class:`LossLog` — loss read-back every ``print_freq`` steps, the non-finite stop, the log
  line and TensorBoard;
- :class:`StopOnSignal` — SIGINT/SIGTERM agreed on by every rank: ``last.pth`` saved, one line
  saying how to continue;
- :class:`Validation` — validation every ``val_freq`` epochs and after the last, ``best.pth``;
- :class:`PeriodicCheckpoint` — ``last.pth`` at every epoch's end, every ``ckpt_freq_iters``
  steps, and at ``stop_iter``.
"""
from __future__ import annotations

import logging
import os
import time

import torch

from engine.checkpoint import load_checkpoint, pick_resume, read_checkpoint, training_position
from engine.evaluate import evaluate
from util.config import dump_cfg
from util.errors import CheckpointError
from util.fileio import atomic_write_text
from util.interrupt import TrainingInterrupted
from util.logger import EventWriter, format_eta

log = logging.getLogger("ntrenetpp")


# entries of a network's loss dict (and the trainer's own) that are not losses but what training shows:
# logged under their own TensorBoard tag and after the losses on the log line (docs/guide.md, "Monitoring")
MONITOR = "monitor/"
MONITOR_LABELS = {"monitor/foreground": "predicted fg", "monitor/bg_mask": "BG mask", "monitor/do_mask": "DO mask",
                  "monitor/do_on_target": "target in DO mask"}


class NonFiniteLossError(RuntimeError):
    pass


class StopTraining(Exception):
    """Raised by a hook to end the run normally before its last epoch (``stop_iter``)."""


class HookBase:
    """A hook sees its trainer as ``self.trainer`` (set when the trainer registers it)."""

    trainer = None

    def before_train(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_epoch(self) -> None:
        pass


class ResumeHook(HookBase):
    """Before training: rank 0 writes ``<save_path>/config.yaml``; the checkpoint ``resume``
    names ('auto': ``last.pth``, or ``last.prev.pth`` if that is damaged) restores the model,
    optimiser, GradScaler, RNG states, position and best score, exactly."""

    def before_train(self) -> None:
        t = self.trainer
        if t.info.is_main:
            atomic_write_text(os.path.join(t.cfg.save_path, "config.yaml"), dump_cfg(t.cfg))
        resume = t.cfg.resume
        if not resume:
            return
        if resume == "auto":
            picked = pick_resume(t.checkpoint_path("last"))
            if picked is None:
                log.info("resume auto: no %s yet, starting from scratch", t.checkpoint_path("last"))
                return
            path, state = picked
        else:
            path, state = resume, read_checkpoint(resume)
        self.load(path, state)

    def load(self, path: str, state: dict) -> None:
        t, cfg = self.trainer, self.trainer.cfg
        saved_shot = (state.get("config") or {}).get("shot", cfg.shot)
        if saved_shot != cfg.shot:   # not an architecture key: test.py may evaluate a model at any K
            raise CheckpointError(f"{path} was trained with shot {saved_shot}, this run has shot {cfg.shot}: "
                                  f"resume with shot {saved_shot}, or train the {cfg.shot}-shot model into "
                                  f"its own folder (sh train.sh <dataset> <exp_name> shot {cfg.shot} uses "
                                  f"exp/<dataset>/<exp_name>_shot{cfg.shot})")
        load_checkpoint(path, t.model, cfg, t.optimizer, t.scaler, restore_rng=True, state=state)
        saved_ipe = state.get("metrics", {}).get("iters_per_epoch", t.iters_per_epoch)
        if saved_ipe != t.iters_per_epoch:
            raise CheckpointError(f"{path} was trained with {saved_ipe} iterations per epoch, this run has "
                                  f"{t.iters_per_epoch}: resume with the same batch_size, epoch_size and "
                                  f"process count, or start a new experiment")
        if t.info.rank:   # dropout streams stay distinct per rank after a resume too
            torch.manual_seed(cfg.manual_seed + t.info.rank + state["iteration"])
        t.state.epoch, t.state.iteration = state["iteration"] // t.iters_per_epoch, state["iteration"]
        t.state.best_miou = state["best_miou"]
        t.run = dict(state.get("run") or {})
        t.metrics = {k: v for k, v in state.get("metrics", {}).items() if k != "iters_per_epoch"}
        log.info("resumed from %s at iteration %d (%s), best mIoU so far %.2f", path, t.state.iteration,
                 training_position(t.state.iteration, t.iters_per_epoch), t.state.best_miou)


class LossLog(HookBase):
    """Loss values stay on the device (no host-device sync inside a step) and are read back every
    ``print_freq`` iterations, at an epoch's end and before every save: a non-finite value then
    stops training, naming the iteration and the loss component, before any checkpoint could take
    it in. Rank 0 writes one TensorBoard folder per run, ``<save_path>/tb/<start time>``; a resume
    continues the folder of the run it resumes, dropping the steps written after its checkpoint."""

    def __init__(self, tensorboard: bool = False):
        self.tensorboard = tensorboard
        self.pending: list[torch.Tensor] = []    # stacked loss values since the last read-back
        self.names: list[str] = []
        self.clock = (time.perf_counter(), 0)   # (start time, iteration then) for s/it and the ETA

    def record(self, losses: dict) -> None:
        if not self.names:
            self.names = list(losses)
        self.pending.append(torch.stack([losses[k].detach().float() for k in self.names]))

    def before_train(self) -> None:
        t = self.trainer
        resumed = t.state.iteration > 0 and bool(t.run.get("tb"))
        if not resumed:
            name = base = time.strftime("%Y%m%d-%H%M%S")
            k = 1
            while os.path.exists(os.path.join(t.cfg.save_path, "tb", name)):
                k += 1
                name = f"{base}-{k}"
            t.run = {"tb": name}
        if self.tensorboard:
            t.writer = EventWriter(os.path.join(t.cfg.save_path, "tb", t.run["tb"]),
                                   purge_step=t.state.iteration + 1 if resumed else None)
        log.info("%d training episodes/epoch %s, %d iterations/epoch, %d in all; %d process(es)",
                 len(t.loader.sampler) * t.info.world_size, t.task.describe_train_set(t.loader.dataset),
                 t.iters_per_epoch, t.max_iter, t.info.world_size)
        self.clock = (time.perf_counter(), t.state.iteration)

    def after_step(self) -> None:
        if self.trainer.state.iteration % self.trainer.cfg.print_freq == 0:
            self.flush()

    def after_epoch(self) -> None:
        self.flush()

    def flush(self) -> None:
        """Read the pending loss values back (one sync), check them, log them."""
        if not self.pending:
            return
        t = self.trainer
        values = torch.stack(self.pending).float().cpu()
        first_it = t.state.iteration - len(self.pending) + 1
        self.pending.clear()
        bad = ~torch.isfinite(values)
        # every rank must stop together: gradients are all-reduced, so one rank's NaN is everyone's
        any_bad = torch.tensor(float(bad.any()), device=t.info.device)
        if t.info.distributed:
            torch.distributed.all_reduce(any_bad, op=torch.distributed.ReduceOp.MAX)
        if any_bad.item():
            last = t.checkpoint_path("last")
            where = "on another process"
            if bad.any():
                row, col = [int(x) for x in bad.nonzero()[0]]
                where = f"at iteration {first_it + row}: component '{self.names[col]}' = {values[row, col].item()}"
            raise NonFiniteLossError(
                f"non-finite loss {where}. Training stopped; the last good checkpoint "
                f"({last if os.path.isfile(last) else 'none written yet'}) is intact. "
                f"Try a lower base_lr, amp none, or check the data.")
        if t.writer is not None:
            for r in range(values.shape[0]):
                for c, name in enumerate(self.names):
                    tag = name if name.startswith(MONITOR) else f"train/loss_{name}"
                    t.writer.add_scalar(tag, values[r, c].item(), first_it + r)
            t.writer.add_scalar("train/lr", t.lr, t.state.iteration)
        t_start, it_start = self.clock
        done = t.state.iteration - it_start
        per_it = (time.perf_counter() - t_start) / max(done, 1)
        mean = values.mean(0)
        parts = " ".join(f"{n} {mean[i]:.4f}" for i, n in enumerate(self.names) if not n.startswith(MONITOR))
        shares = " ".join(f"{MONITOR_LABELS.get(n, n[len(MONITOR):])} {mean[i]:.3f}"
                          for i, n in enumerate(self.names) if n.startswith(MONITOR))
        if shares:
            parts += f" | shares of the query: {shares}"
        # the loss window is the iterations since the last line (every save flushes first, so a stop
        # and its resume split a window: each line states its own); the speed is over this process's
        # own iterations; the epoch is the one the window's last iteration belongs to
        window = f"iter {first_it}-{t.state.iteration}" if values.shape[0] > 1 else f"iter {first_it}"
        log.info("epoch %d/%d iter %d/%d | mean of %s: %s | lr %.5f | %.3f s/it over %d iter | eta %s",
                 (t.state.iteration - 1) // t.iters_per_epoch + 1, t.cfg.epochs, t.state.iteration, t.max_iter,
                 window, parts, t.lr, per_it, done, format_eta(per_it * (t.max_iter - t.state.iteration)))


class StopOnSignal(HookBase):
    """Once per step every rank asks whether any rank was sent SIGINT/SIGTERM (a CPU all-reduce
    under torchrun, nothing with one process). Mid-epoch: ``last.pth`` now, then stop. At an
    epoch's last step the epoch's end decides: ``last.pth`` before its validation, marked so
    that the resume runs that validation first (a scheduler's grace is ~30 s)."""

    def __init__(self):
        self.status = 0                  # the exit status all ranks agreed on (0: no stop)
        self.at_epoch_end = False        # a stop agreed on at an epoch's last step

    def after_step(self) -> None:
        t = self.trainer
        request = t.request
        self.status = t.stop.agreed_max(request.exit_status if request.requested else 0)
        if t.state.iteration % t.iters_per_epoch == 0:
            self.at_epoch_end = self.status > 0
        elif self.status:
            t.save("last")
            self.interrupted()

    def after_epoch(self) -> None:
        t = self.trainer
        if not self.at_epoch_end:
            return
        if t.validation.due():
            t.run["validation_pending"] = True
        elif t.state.epoch >= t.cfg.epochs:
            return                       # the run ends here anyway: the usual last save follows
        t.save("last")
        self.interrupted()

    def interrupted(self) -> None:
        """After the stop's save: one line saying where it stopped and how to continue."""
        t = self.trainer
        where = training_position(t.state.iteration, t.iters_per_epoch)
        pending = (f" (epoch {t.state.epoch}'s validation runs first when it continues)"
                   if t.run.get("validation_pending") else "")
        message = (f"stopped by {t.request.name or 'a signal to another process'} after iteration "
                   f"{t.state.iteration} of {t.max_iter} ({where}); {t.checkpoint_path('last')} is saved{pending}. "
                   f"Continue with: {t.continue_cmd}")
        log.info(message)
        raise TrainingInterrupted(message, self.status or t.request.exit_status)


class Validation(HookBase):
    """Validation every ``val_freq`` epochs and after the last; ``best.pth`` keeps the best by the
    task's selection figure (class mIoU, or class IoU for videos). A validation a stop left for
    the resume runs first."""

    def due(self) -> bool:
        t = self.trainer
        epoch = t.state.epoch
        return t.val_set is not None and (epoch % t.cfg.val_freq == 0 or epoch == t.cfg.epochs)

    def before_train(self) -> None:
        t = self.trainer
        if t.run.pop("validation_pending", False):   # the run stopped before it validated
            if self.due():
                log.info("the validation of epoch %d was left for the resume: running it now", t.state.epoch)
                self.validate()
            t.save("last")

    def after_epoch(self) -> None:
        if self.due():
            self.validate()

    def validate(self) -> None:
        t = self.trainer
        out = evaluate(t.model, t.val_set, t.cfg, t.info.device, task=t.task,
                       keep_samples=t.cfg.tb_images if t.writer is not None else 0)
        # at the global iteration, like the training curves (and purged with them on a resume)
        t.metrics = t.task.validation_metrics(out, t.state.epoch, t.writer, t.state.iteration)
        if t.metrics["miou"] > t.state.best_miou:
            t.state.best_miou = t.metrics["miou"]
            t.save("best")
            log.info("new best %s %.2f: saved %s", t.task.selection_metric, t.metrics["miou"],
                     t.checkpoint_path("best"))


class PeriodicCheckpoint(HookBase):
    """``last.pth`` at every epoch's end (after its validation), every ``ckpt_freq_iters``
    iterations, and where ``stop_iter`` ends the run. An epoch's last iteration is left to the
    epoch's end, which validates before it saves: a save there would let a resume skip that
    epoch's validation."""

    def after_step(self) -> None:
        t = self.trainer
        if t.state.iteration % t.iters_per_epoch == 0:
            return
        if self.stop_reached():
            self.finish()
        if t.cfg.ckpt_freq_iters and t.state.iteration % t.cfg.ckpt_freq_iters == 0:
            t.save("last")

    def after_epoch(self) -> None:
        if self.stop_reached():
            self.finish()
        self.trainer.save("last")

    def stop_reached(self) -> bool:
        t = self.trainer
        return bool(t.cfg.stop_iter) and t.state.iteration >= t.cfg.stop_iter

    def finish(self) -> None:
        self.trainer.save("last")
        log.info("stop_iter %d reached: saved %s", self.trainer.cfg.stop_iter, self.trainer.checkpoint_path("last"))
        raise StopTraining
