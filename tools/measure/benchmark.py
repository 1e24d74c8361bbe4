"""How fast does a training step, an evaluation episode and the data loader run, and how close
is the step to what the device can do?

    python tools/measure/benchmark.py --config config/pascal/pascal_split0_resnet50.yaml --device cpu \
        [--json OUT] [--reps 5] [--warmup 2] [--skip eval,loader] [KEY VALUE ...]

``KEY VALUE`` overrides any config key, e.g. ``amp bf16 channels_last True compile True shot 5
batch_size 8 train_h 641 layers 101``. No dataset or weight file is needed: the step and the
evaluation run on random images with realistic 0/1/255 masks (``pretrained`` is forced to
'' — random weights time the same), and the loader reads a small synthetic VOC-layout tree
generated at the configured resolution in a temporary folder.

Every time is the median of ``--reps`` repetitions after ``--warmup`` untimed ones, with the
device synchronised before and after each repetition. Measured:

- ``backbone_ms``: the frozen part of one step alone: the backbone's mid-level pass over the
  B·(K+1) images, the layer4 pass over the query and the masked supports, and the prior;
- ``train_step_ms``: ``engine.trainer.Trainer.step`` itself — host-to-device copy, forward, all
  losses, backward, SGD step (and the DO bank update);
- ``eval_episode_ms`` (one episode per forward) and ``eval_batched_episode_ms`` (per episode,
  ``batch_size_val`` episodes per forward, at least 4) at ``val_size``;

A video config (``dataset`` ytvis or synthetic_video, e.g. ``config/ytvis/ytvis_split0_resnet50.yaml``
at 241×425, T = 5, K = 5) times the video network the same way: an "episode" is then one
clip of ``clip_len`` frames with its K supports on the ``video_h × video_w`` canvas, the step
is the SGD + Adam step, and the loader reads a synthetic video tree.
- ``loader_episodes_per_s``: ``engine.trainer.train_loader`` alone, configured workers, after the
  first batch (worker start-up) — and ``loader_vs_step``, its rate over the step's;
- ``step_gflop`` and ``backbone_gflop``: counted with ``torch.utils.flop_counter`` (2 per
  multiply-add, convolutions and matrix products, forward and backward);
- ``peak_gflops``: the forward of a 3×3 convolution 256→256 channels (CPU: 4×256×64×64, CUDA:
  32×256×128×128) under the same autocast dtype, the faster of the contiguous and
  channels_last layouts — the device's own best on the operation the heads are made of;
  ``peak_fwdbwd_gflops`` is the same convolution with its backward (informational);
- ``efficiency`` = (``step_gflop`` / ``train_step_ms``) / ``peak_gflops``;
- ``peak_mem_mib``: CUDA max allocated during the step, or the process's peak resident set
  during the step on CPU; ``params_trainable`` / ``params_frozen``;
- ``sync_free``: no operator of the step reads a tensor value on the host (:func:`host_sync_ops`
  on any device; on CUDA also CUDA's sync-debug mode);
- under ``amp``, ``amp_loss_check``: every loss of one forward in fp32 and in the low precision.

``--profile OUT`` instead profiles one step with ``torch.profiler``: operators by self time and
by input shape, and a Chrome trace in OUT.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F


from engine.trainer import Trainer, build_training, train_loader
from model.vit import VIT_VARIANTS, rounded_size
from tools.make_synthetic import main as make_synthetic
from tools.make_synthetic_video import main as make_synthetic_video
from tools.prepare_ytvis import prepare_ytvis
from engine.tasks import task_for
from util.amp import (autocast, batch_to_device, check_amp, synchronize,
                      use_channels_last)
from util.classes import NUM_CLASSES
from util.cli import run as run_cli
from util.config import check_value, load_cfg, parse_args_with_overrides, validate
from dataset.image import FewShotTrainDataset, load_split
from util.distributed import DistInfo
from util.fileio import atomic_write_json
from util.host_memory import tune_cpu_process
from dataset.video import VideoTrainDataset

FIELDS = ("backbone_ms", "train_step_ms", "eval_episode_ms", "eval_batched_episode_ms",
          "loader_episodes_per_s", "loader_vs_step", "step_gflop", "backbone_gflop", "peak_gflops",
          "peak_fwdbwd_gflops", "achieved_gflops", "efficiency", "peak_mem_mib", "params_trainable",
          "params_frozen")
PEAK_SHAPE = {"cpu": (4, 64), "cuda": (32, 128)}   # (N, side) of the peak convolution's input


# ----------------------------------------------------------------------------- inputs
def random_masks(n: int, size: tuple[int, int], generator: torch.Generator, band: int = 3) -> torch.Tensor:
    """``n`` H×W labels like real episodes: an ellipse of target (1) at a random place and
    size on background (0), a ``band``-pixel 255 ring along its outline."""
    H, W = size
    yy = torch.arange(H, dtype=torch.float32)[:, None]
    xx = torch.arange(W, dtype=torch.float32)[None, :]
    out = torch.zeros(n, H, W, dtype=torch.uint8)
    for i in range(n):
        cy, cx, ry, rx = (torch.rand(4, generator=generator) * torch.tensor([0.5, 0.5, 0.3, 0.3])
                          + torch.tensor([0.25, 0.25, 0.1, 0.1])).tolist()
        dist = ((yy / H - cy) / ry) ** 2 + ((xx / W - cx) / rx) ** 2
        edge = 2 * band / min(H * ry, W * rx)           # band width in the normalised radius
        out[i][dist < 1 + edge] = 255
        out[i][dist < 1 - edge] = 1
    return out


def make_batch(batch_size: int, shot: int, size: tuple[int, int], num_classes: int = 20, seed: int = 0,
               pin: bool = False, clip_len: int = 0) -> dict:
    """One collated episode batch as the training loader gives it (CPU tensors); with
    ``clip_len`` T a video batch (B×T query frames and labels, the video loader's keys)."""
    g = torch.Generator().manual_seed(seed)
    B, K = batch_size, shot
    if clip_len:
        T = clip_len
        batch = {
            "query_imgs": torch.randn(B, T, 3, *size, generator=g),
            "query_masks": random_masks(B * T, size, g).long().view(B, T, *size),
            "support_imgs": torch.randn(B, K, 3, *size, generator=g),
            "support_masks": random_masks(B * K, size, g).long().view(B, K, *size),
            "class_id": torch.randint(1, num_classes + 1, (B,), generator=g),
        }
        return {k: v.pin_memory() for k, v in batch.items()} if pin else batch
    batch = {
        "query_img": torch.randn(B, 3, *size, generator=g),
        "query_mask": random_masks(B, size, g).long(),
        "support_imgs": torch.randn(B, K, 3, *size, generator=g),
        "support_masks": random_masks(B * K, size, g).long().view(B, K, *size),
        "class_id": torch.randint(1, num_classes + 1, (B,), generator=g),
    }
    if pin:
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch


# ----------------------------------------------------------------------------- timing
def timed(fn, device: torch.device, warmup: int, reps: int) -> list[float]:
    """Milliseconds of ``reps`` calls of ``fn`` after ``warmup`` calls, device-synchronised."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(1000 * (time.perf_counter() - t0))
    return times


def count_gflop(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


class PeakMemory:
    """Peak memory of a region: CUDA max allocated, or the process's peak RSS (VmHWM, reset
    through /proc/self/clear_refs where the kernel allows; else the lifetime peak)."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _hwm_kib() -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        else:
            kib = self._hwm_kib() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.mib = kib / 1024
        return False


# ----------------------------------------------------------------------------- measurements
def measure_peak(device: torch.device, amp: str, warmup: int, reps: int) -> tuple[float, float]:
    """(forward, forward+backward) GFLOP/s of a 256→256 3×3 convolution, best layout."""
    N, S = PEAK_SHAPE[device.type]
    inner = 10 if device.type == "cuda" else 1
    gflop = 2 * N * S * S * 256 * 256 * 9 / 1e9
    g = torch.Generator().manual_seed(0)
    best_fwd = best_bwd = 0.0
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(N, 256, S, S, generator=g).to(device, memory_format=fmt)
        w = (torch.randn(256, 256, 3, 3, generator=g) * 0.02).to(device, memory_format=fmt)

        def fwd():
            with torch.no_grad(), autocast(device, amp):
                for _ in range(inner):
                    F.conv2d(x, w, padding=1)

        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

        def fwd_bwd():
            for _ in range(inner):
                with autocast(device, amp):
                    y = F.conv2d(xg, wg, padding=1)
                y.backward(torch.ones_like(y))

        t = statistics.median(timed(fwd, device, warmup, reps)) / inner
        best_fwd = max(best_fwd, gflop / (t / 1000))
        t = statistics.median(timed(fwd_bwd, device, warmup, reps)) / inner
        best_bwd = max(best_bwd, 3 * gflop / (t / 1000))
    return best_fwd, best_bwd


def make_trainer(cfg, info: DistInfo) -> Trainer:
    """A ``Trainer`` without datasets: the model, optimizer and ``step`` of the real one
    (random backbone weights on purpose: they time the same)."""
    model, net, optimizer, scaler = build_training(cfg, info, warn_random_backbone=False)
    return Trainer(cfg, info, model, optimizer, scaler, net=net)


def train_inputs(cfg) -> tuple[str, ...]:
    """The batch keys of a training step (the first three: what the network is called with)."""
    return task_for(cfg).train_inputs


def step_size(cfg) -> tuple[int, int]:
    """The training input size: ``train_h × train_w`` crops, or the video canvas."""
    return task_for(cfg).input_size(cfg, train=True)


def cfg_batch(cfg, batch_size: int, size, seed: int, pin: bool = False) -> dict:
    return make_batch(batch_size, cfg.shot, size, NUM_CLASSES.get(cfg.dataset, 20), seed, pin,
                      task_for(cfg).clip_frames(cfg))


def prepare(cfg, device: torch.device, tune_malloc: bool = True):
    """``(trainer, batch, tuned)`` for timing ``cfg``'s training step on ``device``: on the CPU
    first ``util.host_memory.tune_cpu_process`` as train.py and test.py do (denormals flushed;
    with ``tune_malloc``, glibc malloc keeps freed memory — ``tuned`` says what was applied),
    then the seeded trainer and one random batch as the training loader gives it."""
    tuned = tune_cpu_process(tune_malloc) if device.type == "cpu" else {}
    torch.manual_seed(cfg.manual_seed)
    trainer = make_trainer(cfg, DistInfo(device=device))
    batch = cfg_batch(cfg, cfg.batch_size, step_size(cfg), cfg.manual_seed, device.type == "cuda")
    return trainer, batch, tuned


def step_fn(trainer, batch):
    """One training step at learning rate 0 (the same arithmetic; every repetition sees the
    same weights), its loss values dropped."""
    def step():
        trainer.step(batch, 0.0)
        trainer.losses.pending.clear()
    return step


def describe(cfg) -> str:
    """'ResNet-50, 1-shot, batch 4, 473x473' (video: 'video ResNet-50, T=5 + 5-shot paired,
    batch 4, 241x425'): the network and step size of ``cfg``."""
    net = "VGG-16-bn" if cfg["vgg"] else f"ResNet-{cfg['layers']}"
    if cfg.get("backbone", "resnet") != "resnet":
        net = VIT_VARIANTS[cfg["backbone"]].title
    elif cfg["backbone_width"] != 1.0:
        net += f" x{cfg['backbone_width']:g}"
    if cfg["task"] == "video":
        return (f"video {net}, T={cfg['clip_len']} + {cfg['shot']}-shot {cfg['support_mode']}, batch "
                f"{cfg['batch_size']}, {cfg['video_h']}x{cfg['video_w']}")
    return f"{net}, {cfg['shot']}-shot, batch {cfg['batch_size']}, {cfg['train_h']}x{cfg['train_w']}"


def measure_backbone(model, batch, cfg, device, warmup, reps) -> tuple[float, float]:
    """(GFLOP, median ms) of the backbone alone: everything the frozen part of the step runs."""
    q, s, m = batch_to_device(batch, device, train_inputs(cfg)[:3]).values()

    def backbone():
        with torch.no_grad(), autocast(device, cfg.amp):
            model.backbone_features(q, s, m)

    model.train()
    return count_gflop(backbone), statistics.median(timed(backbone, device, warmup, reps))


def measure_step(trainer, batch, cfg, device, warmup, reps) -> dict:
    """The training step: GFLOP (counted on the plain module, torch.compile aside), median and
    every time, peak memory, the losses (finite, read back once outside timing), and whether the
    step runs without a host-device sync."""
    step = step_fn(trainer, batch)
    plain = Trainer(cfg, trainer.info, trainer.model, trainer.optimizer, trainer.scaler)
    out = {"step_gflop": count_gflop(step_fn(plain, batch))}
    with PeakMemory(device) as mem:
        times = timed(step, device, warmup, reps)
    out.update(train_step_ms=statistics.median(times), train_step_ms_all=[round(t, 2) for t in times],
               peak_mem_mib=mem.mib)
    trainer.step(batch, 0.0)
    out["losses"] = {k: float(v) for k, v in zip(trainer.losses.names, trainer.losses.pending.pop())}
    out["sync_free"] = step_is_sync_free(trainer, batch)
    return out


def run(cfg, device: torch.device, reps: int = 5, warmup: int = 2, skip=(), log=print,
        tune_malloc: bool = True) -> dict:
    """Every measurement of the module docstring for ``cfg`` on ``device``; returns the dict.

    Set up by :func:`prepare` (CPU process tuning first, as train.py and test.py do).
    """
    validate(cfg)
    res: dict = {"machine": machine_name(device), "date": datetime.date.today().isoformat(),
                 "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "config": {k: cfg[k] for k in ("dataset", "task", "arch", "backbone", "layers", "backbone_width", "vgg", "shot", "batch_size", "train_h",
                                                "train_w", "val_size", "clip_len", "video_h", "video_w",
                                                "support_mode", "batch_size_val", "reduce_dim",
                                                "amp", "channels_last", "compile", "workers")},
                 "channels_last_used": use_channels_last(cfg.channels_last, device),
                 "reps": reps, "warmup": warmup}
    res.update({k: None for k in FIELDS})

    trainer, batch, tuned = prepare(cfg, device, tune_malloc)
    res.update(malloc_tuned=tuned.get("malloc_tuned", False), flush_denormal=tuned.get("flush_denormal", False))
    log("peak: 3x3 convolution 256->256 ...")
    # cheap next to a step, and the denominator of the efficiency: more repetitions
    res["peak_gflops"], res["peak_fwdbwd_gflops"] = measure_peak(device, cfg.amp, max(warmup, 2), max(10, 3 * reps))

    model = trainer.model
    res["params_trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    res["params_frozen"] = sum(p.numel() for p in model.parameters() if not p.requires_grad)

    if hasattr(model, "backbone_features"):   # a network of the contract may not expose its frozen part
        log("backbone ...")
        res["backbone_gflop"], res["backbone_ms"] = measure_backbone(model, batch, cfg, device, warmup, reps)
    log("training step ...")
    res.update(measure_step(trainer, batch, cfg, device, warmup, reps))
    res["achieved_gflops"] = res["step_gflop"] / (res["train_step_ms"] / 1000)
    res["efficiency"] = res["achieved_gflops"] / res["peak_gflops"]

    if cfg.amp != "none":
        log("losses under amp vs fp32 ...")
        res["amp_loss_check"] = amp_loss_check(model, batch, cfg, device)

    # ---- evaluation episodes
    if "eval" not in skip:
        log("evaluation ...")
        res["eval_episode_ms"], res["eval_batched_episode_ms"], res["eval_batch"] = \
            measure_eval(trainer.net, cfg, device, warmup, reps)
        model.train()

    # ---- the loader
    if "loader" not in skip:
        log("loader ...")
        res["loader_episodes_per_s"] = measure_loader(cfg, trainer.info)
        res["loader_vs_step"] = res["loader_episodes_per_s"] / (cfg.batch_size / (res["train_step_ms"] / 1000))
    return res


def profile_step(cfg, device: torch.device, trace: str, warmup: int = 2, top: int = 25,
                 tune_malloc: bool = True) -> str:
    """Profile one training step after ``warmup`` ones; write a Chrome trace to ``trace`` and
    return the operator table sorted by self time (device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    trainer, batch, _ = prepare(cfg, device, tune_malloc)
    step = step_fn(trainer, batch)
    for _ in range(max(warmup, 1)):
        step()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        with record_function("train_step"):
            step()
        synchronize(device)
    if trace:
        prof.export_chrome_trace(trace)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return (prof.key_averages().table(sort_by=key, row_limit=top) + "\n\nby input shape:\n"
            + prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=top))


# operators whose result the host must wait for: a tensor value read as a Python number or
# bool (.item(), float(t), `if t:`), or an output whose size depends on tensor values
SYNC_OPS = ("aten::_local_scalar_dense", "aten::is_nonzero", "aten::item", "aten::nonzero",
            "aten::nonzero_static", "aten::masked_select", "aten::unique", "aten::_unique", "aten::_unique2",
            "aten::unique_consecutive", "aten::unique_dim", "aten::repeat_interleave", "aten::equal",
            "aten::allclose", "aten::bincount")
MASK_INDEX_OPS = ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_")


def _device_to_host(name, args, kwargs) -> bool:
    if name == "aten::copy_":                      # copy_(dst, src)
        return args[0].device.type == "cpu" and args[1].device.type == "cuda"
    target = kwargs.get("device")
    return args[0].device.type == "cuda" and target is not None and torch.device(target).type == "cpu"


def host_sync_ops(fn) -> list[str]:
    """The operators of :data:`SYNC_OPS` that ``fn()`` runs (forward, backward and optimizer
    alike), in order, boolean-mask indexing (``x[mask]``, whose size depends on the mask) and
    copies from a CUDA tensor to the CPU. The first two are visible on any device, so a CPU test
    checks a step for them; a device-to-host copy (``.cpu()``, ``.tolist()``, ``.numpy()``) only
    exists on a GPU, where this sees the copy and CUDA's sync-debug mode sees the rest."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            if name in SYNC_OPS:
                seen.append(name)
            elif name in MASK_INDEX_OPS and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
                seen.append(name + " with a boolean mask")
            elif name in ("aten::_to_copy", "aten::copy_") and _device_to_host(name, args, kwargs or {}):
                seen.append(name + " from CUDA to the CPU")
            return func(*args, **(kwargs or {}))

    with Recorder():
        fn()
    return seen


def step_is_sync_free(trainer, batch) -> bool:
    """One training step runs no :data:`SYNC_OPS` operator and, on CUDA, also passes CUDA's
    sync debug mode set to 'error'."""
    step = step_fn(trainer, batch)
    ops = host_sync_ops(step)
    if ops:
        print(f"host-device sync inside the step: {sorted(set(ops))}", file=sys.stderr)
        return False
    if trainer.info.device.type != "cuda":
        return True
    try:
        torch.cuda.set_sync_debug_mode("error")
        step()
        return True
    except RuntimeError as e:
        print(f"host-device sync inside the step: {e}", file=sys.stderr)
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")


def amp_loss_check(model, batch, cfg, device) -> dict:
    """Every loss of one training forward in fp32 and under ``cfg.amp``, same weights, same DO
    bank, dropout off: {name: [fp32, amp, |difference|]}."""
    values = {}
    inputs = list(batch_to_device(batch, device, train_inputs(cfg)).values())
    for amp in ("none", cfg.amp):
        twin = copy.deepcopy(model).train()
        for m in twin.modules():
            if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d)):
                m.p = 0.0
        with torch.no_grad(), autocast(device, amp):
            _, losses = twin(*inputs[:3], query_mask=inputs[3], class_ids=inputs[4])
        values[amp] = {k: float(v) for k, v in losses.items() if not k.startswith("monitor/")}   # losses only
        del twin
    return {k: [values["none"][k], values[cfg.amp][k], abs(values["none"][k] - values[cfg.amp][k])]
            for k in values["none"]}


def measure_eval(net, cfg, device, warmup, reps):
    """(ms per episode one at a time, ms per episode batched, the batch) at ``val_size`` (video:
    per clip of ``clip_len`` frames on the canvas)."""
    size = task_for(cfg).input_size(cfg, train=False)
    out = []
    batched = max(cfg.batch_size_val, 4)
    net.eval()
    for n in (1, batched):
        batch = cfg_batch(cfg, n, size, seed=1)
        q, s, m = batch_to_device(batch, device, train_inputs(cfg)[:3]).values()

        def episode():
            with torch.no_grad(), autocast(device, cfg.amp):
                net(q, s, m)

        out.append(statistics.median(timed(episode, device, warmup, reps)) / n)
    return out[0], out[1], batched


def measure_video_loader(cfg, info: DistInfo, batches: int) -> float:
    """:func:`measure_loader` for a video config: clips per second from a synthetic video tree
    (tools/make_synthetic_video.py, prepared) with frames about the canvas height."""
    B = cfg.batch_size
    with tempfile.TemporaryDirectory(prefix="ntrenet_bench_video_") as root:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            make_synthetic_video(["--out", root, "--videos", str(20 * (cfg.shot + 2)), "--size", str(cfg.video_h),
                                  "--workers", str(os.cpu_count() or 1)])
            prepare_ytvis(root, root, workers=os.cpu_count() or 1)
        lcfg = cfg.copy()
        lcfg.update(dataset="synthetic_video", data_root=root, epoch_size=B * (batches + 1))
        loader = train_loader(VideoTrainDataset(lcfg), lcfg, info)
        loader.sampler.set_epoch(0)
        it = iter(loader)
        next(it)                                 # worker start-up
        t0 = time.perf_counter()
        n = sum(batch["query_imgs"].shape[0] for batch in it)
        rate = n / (time.perf_counter() - t0)
        del it, loader
    return rate


def measure_loader(cfg, info: DistInfo, batches: int = 0) -> float:
    """Episodes per second of the configured training loader on a synthetic tree at the
    configured resolution (first batch, i.e. worker start-up, excluded)."""
    B = cfg.batch_size
    batches = batches or max(12, 2 * max(cfg.workers, 1))
    if task_for(cfg).name == "video":      # its own synthetic tree: clips, not images
        return measure_video_loader(cfg, info, batches)
    # every training class needs two images it covers: 80 leave a margin now that distractors
    # may hide an image's main object
    images = max(80, 2 * B * (cfg.shot + 1))
    with tempfile.TemporaryDirectory(prefix="ntrenet_bench_") as root:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            make_synthetic(["--out", root, "--train", str(images), "--val", "0",
                            "--size", str(max(cfg.train_h, cfg.train_w)), "--workers", str(os.cpu_count() or 1)])
        lcfg = cfg.copy()
        # the generated tree is synthetic whatever the config's dataset; its fold rules apply,
        # but not the config's filtering: with exclude_novel_images few of so few images would stay
        lcfg.update(dataset="synthetic", data_root=root, train_list=os.path.join(root, "train.txt"),
                    class_index_workers=1, epoch_size=B * (batches + 1), min_class_pixels=32,
                    exclude_novel_images=False)
        dataset = FewShotTrainDataset(lcfg, split=load_split(lcfg, True, use_cache=False))
        loader = train_loader(dataset, lcfg, info)
        loader.sampler.set_epoch(0)
        it = iter(loader)
        next(it)                                 # worker start-up
        t0 = time.perf_counter()
        n = 0
        for batch in it:
            n += batch["query_img"].shape[0]
        rate = n / (time.perf_counter() - t0)
        del it, loader
    return rate


# ----------------------------------------------------------------------------- reporting
def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs"


ROWS = (("backbone_ms", "backbone forward (B·(K+1) images + masked layer4 + prior)", "ms", "{:.1f}"),
        ("train_step_ms", "training step (fwd, losses, bwd, SGD)", "ms", "{:.1f}"),
        ("eval_episode_ms", "evaluation episode, 1 per forward", "ms", "{:.1f}"),
        ("eval_batched_episode_ms", "evaluation episode, batched", "ms", "{:.1f}"),
        ("loader_episodes_per_s", "training loader alone", "episodes/s", "{:.1f}"),
        ("loader_vs_step", "loader rate / step rate", "x", "{:.1f}"),
        ("step_gflop", "step arithmetic", "GFLOP", "{:.1f}"),
        ("backbone_gflop", "backbone arithmetic", "GFLOP", "{:.1f}"),
        ("achieved_gflops", "step throughput", "GFLOP/s", "{:.1f}"),
        ("peak_gflops", "peak: 3x3 conv 256->256 forward, same dtype", "GFLOP/s", "{:.1f}"),
        ("peak_fwdbwd_gflops", "3x3 conv 256->256 forward+backward", "GFLOP/s", "{:.1f}"),
        ("efficiency", "efficiency = step throughput / peak", "", "{:.3f}"),
        ("peak_mem_mib", "peak memory during the step", "MiB", "{:.0f}"),
        ("params_trainable", "trainable parameters", "", "{:,d}"),
        ("params_frozen", "frozen parameters", "", "{:,d}"))


def format_table(res: dict) -> str:
    c = res["config"]
    head = (f"{res['machine']} | torch {res['torch']}, {res['threads']} threads | {res['date']}\n"
            f"{describe(c)} (eval {'canvas' if c['task'] == 'video' else c['val_size']}, batch "
            f"{res.get('eval_batch', '-')}), amp {c['amp']}, channels_last {c['channels_last']}"
            + (f" (-> {res['channels_last_used']})" if c['channels_last'] == 'auto' else "") + ", "
            f"compile {c['compile']}, workers {c['workers']}"
            + (", malloc tuned" if res.get("malloc_tuned") else "")
            + (", denormals flushed" if res.get("flush_denormal") else ""))
    lines = [head, f"{'measure':58s} {'value':>14s}  unit", "-" * 80]
    for key, label, unit, fmt in ROWS:
        v = res.get(key)
        text = "skipped" if v is None else fmt.format(v)
        lines.append(f"{label:58s} {text:>14s}  {unit}")
    for name, (full, low, diff) in (res.get("amp_loss_check") or {}).items():
        lines.append(f"{'loss ' + name + ': fp32 / ' + c['amp'] + ' / |diff|':58s} {full:9.4f} {low:9.4f} {diff:9.2e}")
    if res.get("sync_free") is not None:
        lines.append(f"{'no host-device sync in the step':58s} {str(res['sync_free']):>14s}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s --config CFG [--device cpu|cuda] [options] [KEY VALUE ...]",
        epilog="Trailing KEY VALUE pairs override any config key (no dashes), e.g.\n"
               "  amp bf16 channels_last True shot 5 batch_size 8 train_h 641 layers 101\n"
               "The module docstring (tools/measure/benchmark.py) says what each measurement is.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    parser.add_argument("--default-malloc", action="store_true",
                        help="CPU: leave glibc malloc as it is (see util/host_memory.py) to compare")
    parser.add_argument("--skip", default="", help="comma-separated measurements to skip: eval, loader")
    parser.add_argument("--profile", default="", metavar="OUT",
                        help="instead of the measurements (and --json): profile one training step with "
                             "torch.profiler, print the operators by self time and write a Chrome trace to OUT "
                             "(open in chrome://tracing or ui.perfetto.dev)")
    parser.add_argument("--top", type=int, default=25, help="with --profile: operators listed")
    parser.add_argument("--backbones", default="", metavar="LIST",
                        help="comma-separated 'backbone' values (resnet, dinov2_vits14, ...): run the measurements "
                             "once per backbone and print them side by side; a ViT's training crop is rounded to "
                             "its patch size and absolute pyramid bins become fractions, as its configs do "
                             "(e.g. resnet,dinov2_vits14,dinov2_vitb14)")
    args, opts = parse_args_with_overrides(parser, argv)
    if args.reps < 1 or args.warmup < 0:
        parser.error(f"--reps must be at least 1 and --warmup at least 0; got {args.reps} and {args.warmup}")
    skip = {x for x in args.skip.split(",") if x}
    if skip - {"eval", "loader"}:
        parser.error(f"--skip takes eval and/or loader (comma-separated); got {args.skip!r}")
    cfg = load_cfg(args.config, opts)
    cfg.pretrained = ""                       # random weights time the same; no weight file needed
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA GPU")
    device = torch.device(args.device)
    check_amp(cfg.amp, device)
    if args.profile:
        folder = os.path.dirname(os.path.abspath(args.profile))
        os.makedirs(folder, exist_ok=True)
        table = profile_step(cfg, device, args.profile, args.warmup, args.top, tune_malloc=not args.default_malloc)
        print(f"{machine_name(device)} | {describe(cfg)}, amp {cfg.amp}, channels_last "
              f"{use_channels_last(cfg.channels_last, device)} | one training step\n{table}")
        if not os.path.isfile(args.profile):
            raise SystemExit(f"error: the profiler did not write the trace '{args.profile}' (see the message above)")
        print(f"Chrome trace: {args.profile} (open in chrome://tracing or ui.perfetto.dev)")
        return {}
    if args.backbones:
        results = {}
        for name in args.backbones.split(","):
            one = backbone_cfg(cfg, name)
            print(f"{name} ...", file=sys.stderr)
            results[name] = run(one, device, args.reps, args.warmup, skip, tune_malloc=not args.default_malloc,
                                log=lambda m: print(m, file=sys.stderr))
            print(format_table(results[name]) + "\n")
        print(format_comparison(results))
        if args.json:
            atomic_write_json(args.json, results)
        return results
    res = run(cfg, device, args.reps, args.warmup, skip, tune_malloc=not args.default_malloc, log=lambda m: print(m, file=sys.stderr))
    print(format_table(res))
    if args.json:
        atomic_write_json(args.json, res)
    return res


def backbone_cfg(cfg, name: str):
    """``cfg`` on the backbone ``name`` (a 'backbone' value): a ViT's training crop rounded to the
    nearest multiple of its patch, as the ViT configs set it; a config error for an unknown name."""
    one = cfg.copy()
    one.backbone = check_value("backbone", name, where="--backbones")
    if name != "resnet":
        patch = VIT_VARIANTS[name].patch
        one.update(vit_blocks=[], vgg=False, backbone_width=1.0, train_h=rounded_size(cfg.train_h, patch),
                   train_w=rounded_size(cfg.train_w, patch))
        if any(s > 1 for s in cfg.ppm_scales):      # absolute bins sized for stride 8: the ViT configs' fractions
            one.ppm_scales = [1.0, 0.5, 0.25, 0.125]
    validate(one)
    return one


COMPARED = (("backbone_ms", "frozen part of a step (backbone, prior)", "{:.0f} ms"),
            ("train_step_ms", "training step", "{:.0f} ms"),
            ("eval_episode_ms", "evaluation episode, 1 per forward", "{:.0f} ms"),
            ("eval_batched_episode_ms", "evaluation episode, batched", "{:.0f} ms"),
            ("peak_mem_mib", "peak memory during the step", "{:.0f} MiB"),
            ("step_gflop", "step arithmetic", "{:.0f} GFLOP"),
            ("backbone_gflop", "backbone arithmetic", "{:.0f} GFLOP"),
            ("params_frozen", "frozen parameters", "{:,d}"),
            ("params_trainable", "trainable parameters", "{:,d}"))


def format_comparison(results: dict) -> str:
    """The --backbones table: one column per backbone."""
    names = [describe(r["config"]).split(",")[0] for r in results.values()]
    sizes = [f"{r['config']['train_h']}x{r['config']['train_w']}" for r in results.values()]
    lines = [f"{'':40s}" + "".join(f"{n[:22]:>24s}" for n in names),
             f"{'training crop':40s}" + "".join(f"{s:>24s}" for s in sizes)]
    for key, label, fmt in COMPARED:
        cells = ["skipped" if r.get(key) is None else fmt.format(r[key]) for r in results.values()]
        lines.append(f"{label:40s}" + "".join(f"{c:>24s}" for c in cells))
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
