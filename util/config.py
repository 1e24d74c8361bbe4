"""Configuration: one declared schema, YAML files in sections, command-line overrides.

Every key is declared exactly once below with its type, default and meaning. A YAML file
groups keys in sections (DATA, TRAIN, TEST, ...) like PFENet's; sections are flattened
into one :class:`CfgNode` with attribute access. Unknown keys and wrongly typed values are
errors that name the key (and the nearest declared key for typos).
"""
from __future__ import annotations

import ast
import difflib
import logging
import os
from dataclasses import dataclass, replace
from typing import Any, Iterable, Sequence

import yaml

from util.classes import ALL_CLASSES, FOLDER_DATASETS, NUM_CLASSES, VIDEO_DATASETS
from util.errors import ConfigError

log = logging.getLogger("ntrenetpp")


IMAGE, VIDEO = "image", "video"
TASKS = (IMAGE, VIDEO)
PFENET, HSNET = "pfenet", "hsnet"
PROTOCOLS = (PFENET, HSNET)    # the scoring protocols (docs/data.md section 11)
HSNET_SIZE = 400               # HSNet's evaluation side
LIST_DATASETS = ("pascal", "coco", "synthetic")    # images named by list files, classes by fold
# the ViT backbones and their depths (model/vit.py builds them; a test keeps the two in step)
VIT_BACKBONES = {f"dinov2_vit{size}14{reg}": depth for size, depth in (("s", 12), ("b", 12), ("l", 24), ("g", 40))
                 for reg in ("", "_reg")}
VIT_BACKBONES["vit_tiny8"] = 6

# What the 'auto' evaluation keys of an image config resolve to, per dataset family: the protocol
# its published numbers use (its lineage), then (val_size, test_num) under each protocol.
# test_num 0: one episode per image of the evaluation classes (class-folder datasets).
AUTO_EVAL = {
    #             lineage  pfenet       hsnet
    "pascal":    (PFENET, (473, 1000), (HSNET_SIZE, 1000)),
    "coco":      (PFENET, (641, 4000), (HSNET_SIZE, 1000)),
    "synthetic": (PFENET, (473, 1000), (HSNET_SIZE, 1000)),
    "fss1000":   (HSNET,  (473, 0),    (HSNET_SIZE, 0)),
    "cdfss":     (HSNET,  (473, 600),  (HSNET_SIZE, 600)),
    "folder":    (HSNET,  (473, 0),    (HSNET_SIZE, 0)),
}


@dataclass(frozen=True)
class Key:
    """One config key: its type, default and meaning, the YAML section it belongs in, whether it
    shapes the network (``arch``: a checkpoint records it and is rebuilt with it), and the
    task(s) it applies to."""
    name: str
    # 'int' | 'float' | 'bool' | 'auto' (True, False or 'auto') | 'int_auto' (an int or 'auto') |
    # 'fold' (0..3 or 'all') | 'str' | 'list'
    type: str
    default: Any
    help: str
    choices: tuple = ()
    section: str = ""
    arch: bool = False
    tasks: tuple = TASKS
    datasets: tuple = ()   # the dataset families it applies to (empty: every one of its tasks)
    # a file or folder: a relative value is resolved by resolve_paths(); 'under': the key of the root
    # a relative value is first looked for under (class lists); 'words': values that are not paths
    path: bool = False
    under: str = ""
    words: tuple = ()


def _k(name, type_, default, help_, choices=(), *, arch=False, tasks=TASKS, datasets=(), path=False, under="",
       words=()):
    return Key(name, type_, default, help_, tuple(choices), arch=arch, tasks=tuple(tasks), datasets=tuple(datasets),
               path=path or bool(under), under=under, words=tuple(words))


def _section(name: str, *keys: Key) -> tuple[Key, ...]:
    return tuple(replace(k, section=name) for k in keys)


_IMG, _VID = (IMAGE,), (VIDEO,)
_LISTS, _FOLDERS = LIST_DATASETS, FOLDER_DATASETS

# --------------------------------------------------------------------------------------
# The schema. PFENet's key names are kept wherever PFENet has one.
# --------------------------------------------------------------------------------------
SCHEMA: tuple[Key, ...] = _section(
    "DATA",
    _k("dataset", "str", "pascal", "dataset family: where images and classes come from (list files and folds: "
       "pascal, coco, synthetic; class folders named by class lists: folder, fss1000, cdfss; videos: ytvis, "
       "synthetic_video); it decides the task", LIST_DATASETS + FOLDER_DATASETS + VIDEO_DATASETS),
    _k("task", "str", "auto", "image or video few-shot segmentation; 'auto' (the only value a config needs): "
       "the dataset's task", ("auto",) + TASKS, arch=True),
    _k("data_root", "str", "data/pascal", "root holding JPEGImages/ and SegmentationClassAug/ (pascal, coco, "
       "synthetic), the class folders (folder, fss1000, cdfss), or the prepared tree of tools/prepare_ytvis.py "
       "(videos)", path=True),
    _k("train_list", "str", "lists/pascal/train.txt", "training list: 'image label' per line", tasks=_IMG,
       datasets=_LISTS, path=True),
    _k("val_list", "str", "lists/pascal/val.txt", "evaluation list: 'image label' per line", tasks=_IMG,
       datasets=_LISTS, path=True),
    _k("train_classes", "str", "", "class-folder datasets: text file naming the training classes' folders under "
       "data_root, one per line (dataset/folder.py); a relative name is read under data_root", tasks=_IMG,
       datasets=_FOLDERS, under="data_root"),
    _k("val_classes", "str", "", "text file naming the validation classes' folders under val_root (or data_root): "
       "class-folder datasets ('': validate on the test classes, with a warning) and val_dataset; a relative name "
       "is read under val_root (or data_root)", tasks=_IMG, under="val_root"),
    _k("test_classes", "str", "", "class-folder datasets: text file naming the test classes' folders under "
       "data_root; a relative name is read under data_root", tasks=_IMG, datasets=_FOLDERS, under="data_root"),
    _k("split", "fold", 0, f"fold: held-out classes of fold i (0..3), or '{ALL_CLASSES}': every class trains and "
       f"none is held out (validation then needs val_dataset); class-folder datasets have no folds",
       datasets=_LISTS + VIDEO_DATASETS),
    _k("use_split_coco", "bool", True,
       "COCO folds interleaved (i+1, i+5, ..., i+77) when True, sequential (20i+1..) when False", tasks=_IMG,
       datasets=_LISTS),
    _k("min_class_pixels", "int", 2048, "an image serves class c if it has at least this many c pixels (2*32*32)",
       tasks=_IMG, datasets=_LISTS),
    _k("exclude_novel_images", "bool", False,
       "drop training images containing any held-out class (BAM convention; not PFENet-comparable)", tasks=_IMG,
       datasets=_LISTS),
    _k("class_index_workers", "int", 0, "processes building the class index (0: all cores)", tasks=_IMG,
       datasets=_LISTS),
    _k("check_files", "bool", True, "verify that every file named by a list exists before use", tasks=_IMG,
       datasets=_LISTS),
    _k("val_dataset", "str", "", "validate on class folders instead of the fold's held-out classes: a "
       "class-folder family, read from val_root with val_classes ('fss1000': the cross-domain benchmark's "
       "validation, as PATNet's); '': the held-out classes", ("",) + FOLDER_DATASETS, tasks=_IMG,
       datasets=_LISTS),
    _k("val_root", "str", "", "root of the validation class folders: val_dataset's; for class-folder datasets "
       "'' is data_root", tasks=_IMG, path=True),
    _k("workers", "int", 8, "data loader processes per training process (capped at the cores available, logged)"),
) + _section(
    "VIDEO",   # docs/video.md
    _k("clip_len", "int", 5, "T: consecutive class frames per query clip (training and evaluation chunks)",
       tasks=_VID),
    _k("video_h", "int", 241, "letterbox canvas height of every video frame", tasks=_VID),
    _k("video_w", "int", 425, "letterbox canvas width of every video frame", tasks=_VID),
    _k("samples_per_class", "int", 100, "training episodes per training class per epoch (class-balanced)",
       tasks=_VID),
    _k("val_samples_per_class", "int", 50, "validation clips per held-out class during training", tasks=_VID),
    _k("support_per", "str", "video", "evaluation supports drawn afresh per query video or once per class",
       ("video", "class"), tasks=_VID),
    _k("video_augment", "bool", True,
       "training clip augmentation (flip, small affine, contrast, brightness; portrait frames transposed)",
       tasks=_VID),
) + _section(
    "MODEL",
    _k("arch", "str", "ntrenetpp",
       "network: a registered name ('ntrenetpp', 'pfenet') or 'package.module:callable' (docs/extending.md)",
       arch=True),
    _k("layers", "int", 50, "ResNet depth: 18, 34, 50 or 101 (ignored when vgg is True)", (18, 34, 50, 101),
       arch=True),
    _k("vgg", "bool", False, "use VGG-16-bn instead of ResNet", arch=True),
    _k("deep_stem", "bool", True, "ResNet stem: three 3x3 convs (semseg 'v2' weights) or one 7x7 (torchvision)",
       arch=True),
    _k("backbone_width", "float", 1.0,
       "ResNet channel multiplier: 1.0 is the standard network (ImageNet weight files need it); "
       "0.5 halves every channel count for from-scratch training (the synthetic demos)", arch=True),
    _k("backbone", "str", "resnet",
       "backbone family: 'resnet' (the ResNet of 'layers', or VGG-16-bn with 'vgg True') or a DINOv2 vision "
       "transformer (dinov2_vits14, _vitb14, _vitl14, _vitg14, each also with _reg: register tokens; "
       "vit_tiny8: the synthetic demo's), docs/method.md", ("resnet",) + tuple(VIT_BACKBONES), arch=True),
    _k("vit_blocks", "list", [],
       "ViT backbones: the two blocks (1-based) whose patch tokens are layer2 and layer3 (layer3 also feeds the "
       "prior); [] = the first and last of the last four, e.g. [9, 12] for ViT-S/B", arch=True),
    _k("pretrained", "str", "initmodel/resnet50_v2.pth",
       "local weight file for the backbone (ImageNet's, or Meta's dinov2_*_pretrain.pth); '' = random init "
       "(tests, synthetic demo)", path=True),
    _k("allow_missing_backbone_keys", "bool", False, "accept a weight file that lacks backbone keys"),
    _k("freeze_backbone", "bool", True, "backbone gets no gradient and runs under no_grad"),
    _k("fix_bn", "bool", True, "keep backbone BatchNorm in eval mode; False = the authors' train-mode BN "
       "(batch statistics of separate query / per-shot passes, drifting running statistics)"),
    _k("reduce_dim", "int", 256, "channels C of the reduced features", arch=True),
    _k("ppm_scales", "list", [60, 30, 15, 8],
       "per-scale bins: sizes > 1 are absolute, values <= 1.0 fractions of the feature size (PFENet)", arch=True),
    _k("do_pool", "str", "gap", "DO prototype pooling: 'gap' divides by b*b (the authors'), 'map' by mask area",
       ("gap", "map"), arch=True),
    _k("self_proto_pool", "str", "gap",
       "query self-prototype pooling: 'gap' divides by b*b (the authors'), 'map' by mask area", ("gap", "map"),
       arch=True),
    _k("aspp_dilations", "list", [6, 12, 18], "dilations of the ASPP 3x3 branches", arch=True),
    _k("elimination", "str", "bg+do",
       "ablation of NTRENet++'s elimination steps: 'bg+do' (the network), 'bg' or 'do' (one step), 'none' "
       "(neither: no BG branch, no DO bank, no contrastive loss; docs/method.md)", ("bg+do", "bg", "do", "none"),
       arch=True),
    _k("do_mask", "str", "argmax",
       "NTRENet++: the target the DO mask relu(1 - BG - target) leaves out: 'argmax' the second prediction's "
       "(the published network), 'prior' also every pixel whose prior is >= 0.5 (a variant; docs/method.md)",
       ("argmax", "prior"), arch=True),
    _k("support_mode", "str", "paired",
       "video: 'paired' matches query frame t with support t (the reference; needs shot = clip_len), "
       "'mean' gives every frame the K-shot average prototype and prior", ("paired", "mean"), tasks=_VID),
    _k("video_attention", "bool", True,
       "video: cross-frame agent attention in the BG branch, after BG elimination and after the "
       "self-prototype merge (False: frames processed independently)", arch=True, tasks=_VID),
    _k("video_aspp", "bool", False, "video: ASPP on the query features (the reference drops it)", arch=True,
       tasks=_VID),
    _k("video_bg_dim", "int", 512, "video: channels of the learnable BG prototype (the reference's 512)",
       arch=True, tasks=_VID),
) + _section(
    "LOSS",
    _k("main_weight", "float", 1.0, "weight of the final prediction's cross-entropy (video reference: 5)"),
    _k("iou_weight", "float", 0.0, "video: weight of the soft-IoU term 1 - IoU(final fg probability, mask)",
       tasks=_VID),
    _k("aux_weight", "float", 1.0, "weight of the bracketed auxiliary sum"),
    _k("bg_weight", "float", 1.0, "weight of the BG mining loss inside the bracket"),
    _k("aux1_weight", "float", 0.4, "weight of the per-scale auxiliary head loss"),
    _k("aux2_weight", "float", 0.6, "weight of the initial/second prediction loss"),
    _k("contrast_weight", "float", 0.01, "weight of the prototypical-pixel contrastive loss (the video "
       "network has none)", tasks=_IMG),
    _k("bg_alpha", "float", 0.5, "alpha of the BG mining loss (pull of every pixel towards BG)"),
    _k("contrast_temperature", "float", 1.0, "tau of the prototype InfoNCE", tasks=_IMG),
    _k("memory_size", "int", 2000, "DO memory bank capacity per class (FIFO)", arch=True, tasks=_IMG),
    _k("bank_classes", "int", 0, "classes of the DO memory bank (0: the dataset's class count); a checkpoint "
       "keeps its own", arch=True, tasks=_IMG),
    _k("num_negatives", "int", 1000, "negatives sampled from the class's bank per episode", tasks=_IMG),
    _k("pixel_negative", "bool", False, "add the pixel-to-DO negative term (reference leaves it out)", tasks=_IMG),
) + _section(
    "TRAIN",
    _k("train_h", "int", 473, "training crop height", tasks=_IMG),
    _k("train_w", "int", 473, "training crop width", tasks=_IMG),
    _k("scale_min", "float", 0.9, "random scale lower bound", tasks=_IMG),
    _k("scale_max", "float", 1.1, "random scale upper bound", tasks=_IMG),
    _k("rotate_min", "float", -10.0, "random rotation lower bound (degrees)", tasks=_IMG),
    _k("rotate_max", "float", 10.0, "random rotation upper bound (degrees)", tasks=_IMG),
    _k("rotate_p", "float", 0.5, "probability of a random rotation", tasks=_IMG),
    _k("blur_p", "float", 0.5, "probability of a 5x5 Gaussian blur", tasks=_IMG),
    _k("flip_p", "float", 0.5, "probability of a horizontal flip"),
    _k("hue_jitter", "float", 0.0,
       "episode-level hue rotation: query and supports of a training episode turned by one angle drawn "
       "in [-hue_jitter, hue_jitter] degrees (0: off; 180: any hue)", tasks=_IMG),
    _k("tint_jitter", "float", 0.0,
       "episode-level tint: every RGB channel of a training episode's images multiplied by one gain drawn "
       "in [1 - tint_jitter, 1] (0: off); unlike a hue turn it also colours white and grey (black stays "
       "black)", tasks=_IMG),
    _k("ignore_label", "int", 255, "label value ignored by losses and metrics, and padding crops and rotations"),
    _k("shot", "int", 1, "K: support images per episode"),
    _k("batch_size", "int", 4, "global training batch (divided across processes)"),
    _k("epoch_size", "int", 0, "training episodes per epoch (0: one per eligible training image / clip)"),
    _k("epochs", "int", 150, "training epochs"),
    _k("base_lr", "float", 0.025, "starting learning rate actually used (no hidden x10)"),
    _k("power", "float", 0.9, "poly schedule power, applied per iteration"),
    _k("momentum", "float", 0.9, "SGD momentum"),
    _k("weight_decay", "float", 1e-4, "SGD weight decay"),
    _k("attention_lr", "float", 1e-5,
       "video: Adam learning rate of the attention blocks (the head uses SGD at base_lr)", tasks=_VID),
    _k("attention_weight_decay", "float", 5e-4, "video: Adam weight decay of the attention blocks", tasks=_VID),
    _k("warmup_iters", "int", 0, "linear learning-rate warm-up iterations"),
    _k("elimination_training", "str", "guided",
       "NTRENet++: how BG and DO elimination train. 'guided': their fusions start as the identity on the "
       "feature and the DO prototype's mask takes the target from the label in training; 'authors': PyTorch's "
       "initialisation and the predicted mask in training too. Training only: the evaluated function is "
       "the same (docs/method.md)", ("guided", "authors")),
    _k("manual_seed", "int", 321, "seed of training and of the evaluation episode lists"),
    _k("amp", "str", "none", "mixed precision", ("none", "bf16", "fp16")),
    _k("channels_last", "auto", "auto",
       "channels_last memory format for the network: True, False, or 'auto' (on for CPU, where it is "
       "measured faster; off on CUDA)"),
    _k("compile", "bool", False, "wrap the model in torch.compile"),
    _k("sync_bn", "bool", False, "convert trainable BatchNorm to SyncBatchNorm under DDP"),
    _k("print_freq", "int", 10, "iterations between log lines"),
    _k("val_freq", "int", 1, "epochs between validations"),
    _k("evaluate", "bool", True, "validate during training"),
    _k("val_num", "int", 0, "episodes per validation during training (0: test_num; with val_dataset, that "
       "family's count); class-folder validation: N class-balanced episodes", tasks=_IMG),
    _k("stop_iter", "int", 0, "stop after this global iteration, saving last.pth (0: run all epochs)"),
    _k("ckpt_freq_iters", "int", 0, "also write last.pth every N iterations (0: once per epoch)"),
    _k("resume", "str", "", "checkpoint to resume from: '' (none), 'auto' (last.pth) or a path", path=True,
       words=("auto",)),
    _k("overwrite", "bool", False, "start over in an experiment folder that holds checkpoints (deletes them)"),
    _k("save_path", "str", "", "experiment folder (default exp/<dataset>/<exp_name>[_shotK])", path=True),
    _k("tb_images", "int", 4, "episodes logged to TensorBoard as images per validation"),
) + _section(
    "TEST",
    _k("eval_protocol", "str", "auto", "scoring protocol (docs/data.md): 'pfenet' (inputs on a val_size canvas, "
       "labels scored at their original size) or 'hsnet' (inputs and labels resized to val_size x val_size); "
       "'auto': the one the dataset's published numbers use (pascal, coco, synthetic: pfenet; fss1000, "
       "cdfss, folder: hsnet)", ("auto",) + PROTOCOLS, tasks=_IMG),
    _k("val_size", "int_auto", "auto", "evaluation input side: pfenet resizes the longer image side to it and "
       "pastes the image on a square canvas, hsnet resizes image and label to a square of it; 'auto': the "
       "protocol's (pfenet 473, COCO 641; hsnet 400)", tasks=_IMG),
    _k("batch_size_val", "int", 1, "episodes per evaluation forward pass"),
    _k("weight", "str", "best", "checkpoint to evaluate: 'best', 'last' or a path", path=True,
       words=("best", "last")),
    _k("test_num", "int_auto", "auto", "evaluation episodes per seed (exactly this many); class-folder datasets: "
       "0 = one per image of the test classes (HSNet's FSS-1000 rule), N = N class-balanced episodes "
       "(PATNet's); 'auto': the protocol's (pfenet 1000, COCO 4000; hsnet 1000 on pascal/coco; fss1000 and "
       "folder one per image, cdfss 600)", tasks=_IMG),
    _k("test_seeds", "int", 5, "number of evaluation seeds (runs): manual_seed + i under pfenet, i under hsnet "
       "(seed 0 is HSNet's one run)"),
    _k("ori_resize", "bool", True, "pfenet: score on the original-size label (PFENet default); False: on the "
       "val_size canvas", tasks=_IMG),
    _k("save_pred", "bool", False, "write predicted masks and an index of them per seed"),
    _k("vis", "int", 0, "visualisation panels saved per seed"),
    _k("device", "str", "auto", "'auto', 'cpu' or 'cuda'", ("auto", "cpu", "cuda")),
)

KEYS: dict[str, Key] = {k.name: k for k in SCHEMA}
assert len(KEYS) == len(SCHEMA), "a key is declared twice"
ARCH_KEYS: tuple[str, ...] = tuple(k.name for k in SCHEMA if k.arch)   # what a checkpoint is rebuilt with


class CfgNode(dict):
    """A flat dict with attribute access (``cfg.shot``). ``explicit``: the keys a YAML file or
    the command line set (the rest hold their declared defaults); ``overridden``: those the
    command line set."""

    explicit: frozenset = frozenset()
    overridden: frozenset = frozenset()

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(_unknown_key_message(name, "config")) from None

    def __setattr__(self, name, value):
        self[name] = value

    def copy(self) -> "CfgNode":
        out = CfgNode(dict(self))
        object.__setattr__(out, "explicit", self.explicit)
        object.__setattr__(out, "overridden", self.overridden)
        return out

    def mark(self, explicit=(), overridden=()) -> "CfgNode":
        object.__setattr__(self, "explicit", self.explicit | frozenset(explicit))
        object.__setattr__(self, "overridden", self.overridden | frozenset(overridden))
        return self


def _unknown_key_message(name: str, where: str) -> str:
    close = difflib.get_close_matches(name, KEYS.keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; see util/config.py for the declared keys"
    return f"{where}: unknown key '{name}'{hint}"


def check_value(name: str, value: Any, where: str = "config") -> Any:
    """Return ``value`` coerced to the declared type of ``name`` or raise ConfigError."""
    if name not in KEYS:
        raise ConfigError(_unknown_key_message(name, where))
    key = KEYS[name]

    def bad(expected):
        return ConfigError(f"{where}: key '{name}' has value {value!r} "
                           f"({type(value).__name__}); expected {expected}")

    t = key.type
    if t == "bool":
        if not isinstance(value, bool):
            raise bad("a bool (True/False)")
    elif t == "auto":
        if not (isinstance(value, bool) or value == "auto"):
            raise bad("True, False or 'auto'")
    elif t == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an int")
    elif t == "int_auto":
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int)):
            raise bad("an int or 'auto'")
    elif t == "fold":
        if value != ALL_CLASSES and (isinstance(value, bool) or not isinstance(value, int)):
            raise bad(f"a fold 0, 1, 2, 3 or '{ALL_CLASSES}'")
    elif t == "float":
        if isinstance(value, str):   # YAML 1.1 reads PFENet's `weight_decay: 1e-4` as a string
            try:
                value = float(value)
            except ValueError:
                raise bad("a float") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a float")
        value = float(value)
    elif t == "str":
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise bad("a string")
    elif t == "list":
        if not isinstance(value, (list, tuple)):
            raise bad("a list, e.g. [60, 30, 15, 8]")
        value = list(value)
    if key.choices and value not in key.choices:
        raise ConfigError(f"{where}: key '{name}' has value {value!r}; "
                          f"expected one of {list(key.choices)}")
    return value


def defaults() -> CfgNode:
    return CfgNode({k.name: (list(k.default) if isinstance(k.default, list) else k.default)
                    for k in SCHEMA})


def load_cfg_from_yaml(path: str) -> CfgNode:
    """Read a sectioned YAML file on top of the declared defaults."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{os.path.abspath(path)}' does not exist; configs live under config/<dataset>/")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected sections (DATA:, TRAIN:, TEST:, ...) at the top level")
    cfg = defaults()
    seen: dict[str, str] = {}
    for section, body in raw.items():
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: section '{section}' must map keys to values, "
                              f"e.g. '{section}:\\n  shot: 1'")
        for name, value in body.items():
            if name in seen:
                raise ConfigError(f"{path}: key '{name}' appears in both '{seen[name]}' and '{section}'")
            seen[name] = section
            cfg[name] = check_value(name, value, where=path)
    return cfg.mark(explicit=seen)


def parse_literal(text: str) -> Any:
    """A command-line value: a Python literal if it parses as one, else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def merge_cfg_from_list(cfg: CfgNode, opts: Sequence[str]) -> CfgNode:
    """Apply trailing ``KEY VALUE`` pairs (values parsed as Python literals)."""
    if len(opts) % 2:
        raise ConfigError(f"command-line overrides come in KEY VALUE pairs; got {list(opts)}")
    out = cfg.copy()
    for name, text in zip(opts[0::2], opts[1::2]):
        value = parse_literal(text)
        if name in KEYS and KEYS[name].type == "str" and not isinstance(value, str):
            value = text  # e.g. `weight 123` or a path that happens to parse
        out[name] = check_value(name, value, where="command line")
    return out.mark(explicit=opts[0::2], overridden=opts[0::2])


CALLER_DIR_ENV = "NTRENETPP_CALLER_DIR"    # set by train.sh / test.sh: the folder the command was typed in


def resolve_paths(cfg: CfgNode, caller_dir: str | None = None) -> CfgNode:
    """The one rule for relative paths (docs/guide.md, "Paths"), applied in place:

    - a class list (``train_classes``, ``test_classes``; ``val_classes``) is read under the root
      of its classes (``data_root``; ``val_root``, else ``data_root``) when that file exists there;
    - every other relative path, and a class list not found under its root, is taken from the
      folder the command was typed in when it was typed on the command line (``caller_dir``:
      ``$NTRENETPP_CALLER_DIR``, which the launchers set because they run python from the
      repository; else the current folder), and from the folder python runs in when it was
      written in a config file (the repository root under the launchers).

    A class list found nowhere is left under its root (command line) or as written (config
    file), so that the error names the place it was expected in."""
    caller = os.environ.get(CALLER_DIR_ENV, "") if caller_dir is None else caller_dir
    moved = bool(caller) and os.path.abspath(caller) != os.path.abspath(os.getcwd())

    def typed(name: str, value: str) -> str:
        return os.path.normpath(os.path.join(caller, value)) if moved and name in cfg.overridden else value

    def relative(key: Key) -> bool:
        value = cfg[key.name]
        return bool(value) and value not in key.words and not os.path.isabs(value)

    for key in SCHEMA:
        if key.path and not key.under and relative(key):
            cfg[key.name] = typed(key.name, cfg[key.name])
    for key in SCHEMA:
        if key.under and relative(key):
            value = cfg[key.name]
            beside = os.path.join(cfg[key.under] or cfg.data_root, value)
            elsewhere = typed(key.name, value)
            if os.path.isfile(beside) or (not os.path.isfile(elsewhere) and key.name in cfg.overridden):
                cfg[key.name] = beside
            else:
                cfg[key.name] = elsewhere
    return cfg


def load_cfg(path: str, opts: Iterable[str] = ()) -> CfgNode:
    """The usual entry point: YAML file plus command-line overrides, paths resolved
    (:func:`resolve_paths`), validated."""
    cfg = resolve_paths(merge_cfg_from_list(load_cfg_from_yaml(path), list(opts)))
    validate(cfg)
    warn_inapplicable(cfg)
    return cfg


def task_of(dataset: str) -> str:
    """The task a dataset family belongs to."""
    return VIDEO if dataset in VIDEO_DATASETS else IMAGE


def datasets_of(task: str) -> list[str]:
    """The dataset families of a task."""
    return [name for name in KEYS["dataset"].choices if task_of(name) == task]


def class_list_size(path: str) -> int:
    """How many classes a class-list file names (its non-blank lines; dataset/folder.py reads and
    checks the names themselves); 0 when ``path`` is empty or no file."""
    if not path or not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8-sig") as f:
        return sum(1 for line in f.read().splitlines() if line.strip())


def training_classes(cfg: CfgNode) -> int:
    """The number of classes a config trains on, the DO memory bank's rows: the dataset's class
    count, or for class-folder datasets the length of ``train_classes`` (0 when it names no
    file: an evaluation-only config, whose network is the checkpoint's)."""
    if cfg.dataset in FOLDER_DATASETS:
        return class_list_size(cfg.train_classes)
    return NUM_CLASSES[cfg.dataset]


def resolve_evaluation(cfg: CfgNode) -> None:
    """An image config's 'auto' evaluation keys: ``eval_protocol`` (the dataset's lineage), then
    ``val_size`` and ``test_num`` (that protocol's, :data:`AUTO_EVAL`)."""
    lineage, pfenet, hsnet = AUTO_EVAL[cfg.dataset]
    if cfg.eval_protocol == "auto":
        cfg.eval_protocol = lineage
    size, episodes = pfenet if cfg.eval_protocol == PFENET else hsnet
    if cfg.val_size == "auto":
        cfg.val_size = size
    if cfg.test_num == "auto":
        cfg.test_num = episodes


def validate(cfg: CfgNode) -> None:
    """Every cross-key check, in one place, and the keys derived from others: ``task`` from the
    dataset, ``bank_classes`` from its class count, and an image config's evaluation keys left
    at 'auto' (:func:`resolve_evaluation`). The network builders and data classes get values
    this has checked."""
    task = task_of(cfg.dataset)
    if cfg.task not in ("auto", task):
        raise ConfigError(f"key 'task' is {cfg.task!r} but dataset {cfg.dataset!r} is a {task} dataset; "
                          f"leave task at 'auto'")
    cfg.task = task
    if cfg.bank_classes == 0:
        cfg.bank_classes = training_classes(cfg)
    if cfg.split == ALL_CLASSES:
        if task == VIDEO:
            raise ConfigError(f"key 'split' is '{ALL_CLASSES}', which holds out no class; the video task "
                              f"evaluates on a fold's held-out classes: use split 0, 1, 2 or 3")
    elif not 0 <= cfg.split <= 3:
        raise ConfigError(f"key 'split' is {cfg.split}; folds are 0, 1, 2 or 3, or '{ALL_CLASSES}' "
                          f"(every class trains)")
    if task == IMAGE:
        _validate_image_evaluation(cfg)
    _validate_bounds(cfg)
    if task == VIDEO:
        if cfg.arch != "ntrenetpp":
            raise ConfigError(f"key 'arch' is {cfg.arch!r}; the video task has one network, NTRENet++'s video "
                              f"network: leave arch at 'ntrenetpp'")
        if cfg.support_mode == "paired" and cfg.shot != cfg.clip_len:
            raise ConfigError(f"support_mode 'paired' pairs query frame t with support t, so 'shot' ({cfg.shot}) "
                              f"must equal 'clip_len' ({cfg.clip_len}); set both, or use 'support_mode mean'")


def _validate_image_evaluation(cfg: CfgNode) -> None:
    """validate()'s part for an image config: the evaluation keys left at 'auto' resolved, and the
    validation set of a run that holds out no class."""
    folders = cfg.dataset in FOLDER_DATASETS
    resolve_evaluation(cfg)
    if cfg.val_dataset:
        if folders:
            raise ConfigError(f"key 'val_dataset' is {cfg.val_dataset!r}, but dataset {cfg.dataset} is class "
                              f"folders already: it validates on val_classes (under val_root, or data_root); "
                              f"leave val_dataset ''")
        if not cfg.val_root or not cfg.val_classes:
            raise ConfigError(f"val_dataset {cfg.val_dataset} validates on class folders: set val_root (their "
                              f"root, e.g. data/fss1000) and val_classes (a class list, e.g. "
                              f"lists/fss1000/val.txt)")
    elif cfg.split == ALL_CLASSES and cfg.evaluate and not folders:
        raise ConfigError(f"split '{ALL_CLASSES}' trains on every {cfg.dataset} class, so none is left to "
                          f"validate on: set val_dataset fss1000 val_root data/fss1000 val_classes "
                          f"lists/fss1000/val.txt (as config/pascal/pascal_all_resnet50.yaml does), or "
                          f"evaluate False")
    if cfg.val_size < 1:
        raise ConfigError(f"key 'val_size' is {cfg.val_size}; it must be at least 1")
    if cfg.test_num < (0 if folders else 1):
        raise ConfigError(f"key 'test_num' is {cfg.test_num}; it must be at least 1"
                          + (" (0: one episode per image of the test classes)" if folders else ""))


def _validate_bounds(cfg: CfgNode) -> None:
    """validate()'s single-key bounds and pairwise orders."""
    folders = cfg.dataset in FOLDER_DATASETS
    if cfg.shot < 1:
        raise ConfigError(f"key 'shot' is {cfg.shot}; it must be at least 1")
    if cfg.base_lr <= 0:
        raise ConfigError(f"key 'base_lr' is {cfg.base_lr}; it must be positive (the configs use 0.025)")
    if not 0.0 <= cfg.tint_jitter < 1.0:
        raise ConfigError(f"key 'tint_jitter' is {cfg.tint_jitter}; it must be in [0, 1) (0: off)")
    if cfg.backbone_width <= 0 or (cfg.vgg and cfg.backbone_width != 1.0):
        raise ConfigError(f"key 'backbone_width' is {cfg.backbone_width}; it must be positive, and 1.0 "
                          "with 'vgg True' (VGG-16-bn keeps its channels)")
    _validate_backbone(cfg)
    if cfg.scale_min > cfg.scale_max:
        raise ConfigError(f"scale_min ({cfg.scale_min}) is larger than scale_max ({cfg.scale_max})")
    if cfg.rotate_min > cfg.rotate_max:
        raise ConfigError(f"rotate_min ({cfg.rotate_min}) is larger than rotate_max ({cfg.rotate_max})")
    for name in ("train_h", "train_w", "batch_size", "batch_size_val", "test_seeds",
                 "reduce_dim", "memory_size", "epochs", "print_freq", "val_freq",
                 "clip_len", "samples_per_class", "val_samples_per_class") + (() if folders else ("bank_classes",)):
        if cfg[name] < 1:
            raise ConfigError(f"key '{name}' is {cfg[name]}; it must be at least 1")
    for name in ("workers", "class_index_workers", "epoch_size", "stop_iter", "ckpt_freq_iters", "warmup_iters",
                 "num_negatives", "val_num", "vis", "tb_images", "bank_classes"):
        if cfg[name] < 0:
            raise ConfigError(f"key '{name}' is {cfg[name]}; it must not be negative")
    if not cfg.ppm_scales or any(not isinstance(s, (int, float)) or s <= 0 for s in cfg.ppm_scales):
        raise ConfigError(f"key 'ppm_scales' is {cfg.ppm_scales}; expected positive sizes or fractions, "
                          f"e.g. [60, 30, 15, 8] or [1.0, 0.5, 0.25, 0.125]")
    for name in ("video_h", "video_w"):
        if cfg[name] < 8:
            raise ConfigError(f"key '{name}' is {cfg[name]}; the video canvas must be at least 8 pixels")


def _validate_backbone(cfg: CfgNode) -> None:
    """validate()'s part for the backbone keys: a ViT excludes the ResNet/VGG ones, and its
    'vit_blocks' name two of its blocks."""
    if cfg.backbone == "resnet":
        if cfg.vit_blocks:
            raise ConfigError(f"key 'vit_blocks' is {cfg.vit_blocks} but 'backbone' is resnet; it applies to ViT "
                              f"backbones only: leave it []")
        return
    if cfg.vgg or cfg.backbone_width != 1.0:
        raise ConfigError(f"'backbone {cfg.backbone}' is a vision transformer: 'vgg' must be False and "
                          f"'backbone_width' 1.0 (they shape ResNet/VGG backbones)")
    depth = VIT_BACKBONES[cfg.backbone]
    blocks = cfg.vit_blocks
    if blocks and not (len(blocks) == 2 and all(isinstance(b, int) and not isinstance(b, bool) for b in blocks)
                       and 1 <= blocks[0] <= blocks[1] <= depth):
        raise ConfigError(f"key 'vit_blocks' is {blocks}; expected [] or two block numbers [a, b] with "
                          f"1 <= a <= b <= {depth} ({cfg.backbone} has {depth} blocks), e.g. [{max(1, depth - 3)}, "
                          f"{depth}]")


def resolved(cfg: CfgNode) -> CfgNode:
    """A validated copy of ``cfg`` (derived keys filled in); ``cfg`` itself is left as it is."""
    out = cfg.copy()
    validate(out)
    return out


def warn_inapplicable(cfg: CfgNode) -> None:
    """A warning naming the keys the YAML file or command line set, to other than their default,
    that the config's task does not use (image augmentation in a video config, for example), and
    one naming those its dataset does not use (folds and list files of a class-folder dataset)."""
    set_keys = [k for k in sorted(cfg.explicit) if k in KEYS and cfg[k] != KEYS[k].default]
    by_task = [k for k in set_keys if cfg.task not in KEYS[k].tasks]
    by_dataset = [k for k in set_keys if k not in by_task and KEYS[k].datasets and cfg.dataset not in KEYS[k].datasets]
    for ignored, what in ((by_task, f"{cfg.task} experiments"), (by_dataset, f"dataset {cfg.dataset}")):
        if ignored:
            log.warning("%s do%s not apply to %s and %s ignored", ", ".join(ignored),
                        "es" if len(ignored) == 1 else "", what, "is" if len(ignored) == 1 else "are")


def dump_cfg(cfg: CfgNode) -> str:
    """The config as a YAML document in its declared sections (saved beside experiments); it
    loads back to the same config."""
    sections: dict[str, dict] = {}
    for key in SCHEMA:
        sections.setdefault(key.section, {})[key.name] = cfg[key.name]
    return yaml.safe_dump(sections, sort_keys=False)


def describe_schema() -> str:
    """A readable table of every key (for docs and `--help`)."""
    lines = []
    for k in SCHEMA:
        choices = f" {list(k.choices)}" if k.choices else ""
        lines.append(f"{k.name:28s} {k.type:5s} {k.default!r:32s} {k.help}{choices}")
    return "\n".join(lines)


def parse_args_with_overrides(parser, argv=None):
    """Parse ``parser``'s flags anywhere on the line; what is left are ``KEY VALUE`` overrides.

    Returns ``(args, opts)``. A leftover that looks like a flag (``--x``) is an error rather
    than a silently ignored typo.
    """
    args, opts = parser.parse_known_args(argv)
    flags = [o for o in opts if o.startswith("--")]
    if flags:
        parser.error(f"unknown option(s) {flags}; config overrides are written KEY VALUE without dashes")
    return args, opts


def split_trailing_overrides(queries: list[str], opts: list[str]) -> tuple[list[str], list[str]]:
    """``--query a.jpg b.jpg shot 5``: argparse hands every word to an option of several values;
    from the first word that is a declared config key (and not a file) on, the words are overrides."""
    for i, word in enumerate(queries):
        if word in KEYS and not os.path.exists(word):
            return queries[:i], queries[i:] + opts
    return queries, opts


def default_save_path(config_path: str, cfg: CfgNode, yaml_shot: int) -> str:
    """The experiment folder: exp/<dataset>/<exp_name>, exp_name from
    config/<dataset>/<dataset>_<exp_name>.yaml. A model at another shot than its config's
    (``shot K`` on the command line, K != the YAML's shot) is its own experiment,
    exp/<dataset>/<exp_name>_shotK, for training and testing alike: never the config's folder,
    whose checkpoints a resume would continue."""
    stem = os.path.splitext(os.path.basename(config_path))[0]
    dataset = cfg.dataset
    name = stem[len(dataset) + 1:] if stem.startswith(dataset + "_") else stem
    if cfg.shot != yaml_shot:
        name += f"_shot{cfg.shot}"
    return os.path.join("exp", dataset, name)


def config_with_overrides(config_path: str, opts: Sequence[str]) -> CfgNode:
    """YAML file plus command-line overrides, paths resolved (:func:`resolve_paths`), validated,
    with ``save_path`` defaulting to the experiment folder (:func:`default_save_path`)."""
    from_yaml = load_cfg_from_yaml(config_path)
    cfg = resolve_paths(merge_cfg_from_list(from_yaml, list(opts)))
    validate(cfg)
    warn_inapplicable(cfg)
    cfg.save_path = cfg.save_path or default_save_path(config_path, cfg, from_yaml.shot)
    return cfg


def experiment_cfg(description: str, argv=None) -> CfgNode:
    """What train.py and test.py share: ``--config CFG [KEY VALUE ...]`` → validated config,
    with ``save_path`` defaulting to the experiment folder."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="config/<dataset>/<dataset>_<exp>.yaml")
    args, opts = parse_args_with_overrides(parser, argv)
    return config_with_overrides(args.config, opts)
