"""Class names and fold splits of PASCAL-5i, COCO-20i, YouTube-VIS and the synthetic datasets.

Class ids are the label values on disk: 1..20 (PASCAL, synthetic), 1..80 (COCO, contiguous
in ascending COCO category-id order). 0 is background, 255 ignore. The video datasets
(``ytvis``, ``synthetic_video``; docs/video.md) use their annotation file's category ids:
1..40 (YouTube-VIS 2019) and 1..20 (the synthetic video set, the synthetic image classes).

The class-folder datasets (``folder``, ``fss1000``, ``cdfss``; docs/data.md) have no fixed
classes and no folds: their class lists name the classes (dataset/folder.py).
"""
from __future__ import annotations

PASCAL_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

# COCO 2014 category names in ascending category-id order (ids 1..90 with gaps -> 1..80).
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)

# The synthetic dataset (tools/make_synthetic.py): a shape and a texture per class (colours are
# drawn per object from a palette all classes share).
SYNTHETIC_CLASSES = (
    "solid square", "striped triangle", "checkered ring", "dotted square", "striped cross",
    "dotted ring", "solid cross", "solid triangle", "striped disc", "checkered cross",
    "solid disc", "striped ring", "dotted triangle", "checkered disc", "dotted cross",
    "dotted disc", "checkered square", "solid ring", "striped square", "checkered triangle",
)

# YouTube-VIS 2019 category names in category-id order (ids 1..40, as in its train.json).
YTVIS_CLASSES = (
    "person", "giant_panda", "lizard", "parrot", "skateboard", "sedan", "ape", "dog", "snake",
    "monkey", "hand", "rabbit", "duck", "cat", "cow", "fish", "train", "horse", "turtle", "bear",
    "motorbike", "giraffe", "leopard", "fox", "deer", "owl", "surfboard", "airplane", "truck",
    "zebra", "tiger", "elephant", "snowboard", "boat", "shark", "mouse", "frog", "eagle",
    "earless_seal", "tennis_racket",
)

# The synthetic video dataset (tools/make_synthetic_video.py) draws the synthetic image classes.
SYNTHETIC_VIDEO_CLASSES = SYNTHETIC_CLASSES

_CLASSES = {"pascal": PASCAL_CLASSES, "coco": COCO_CLASSES, "synthetic": SYNTHETIC_CLASSES,
            "ytvis": YTVIS_CLASSES, "synthetic_video": SYNTHETIC_VIDEO_CLASSES}
NUM_CLASSES = {name: len(classes) for name, classes in _CLASSES.items()}
VIDEO_DATASETS = ("ytvis", "synthetic_video")
# images in class folders, the classes named by class-list files: no class table, no folds
FOLDER_DATASETS = ("folder", "fss1000", "cdfss")
ALL_CLASSES = "all"      # the fold that holds out nothing: training on every class (PATNet's fold 4)
# folds interleaved like COCO-20i (i+1, i+5, ...): always for YouTube-VIS
_INTERLEAVED = ("ytvis",)


def _unknown(dataset: str) -> ValueError:
    return ValueError(f"unknown dataset '{dataset}'; expected one of {', '.join(_CLASSES)}")


def class_names(dataset: str) -> tuple[str, ...]:
    try:
        return _CLASSES[dataset]
    except KeyError:
        raise _unknown(dataset) from None


def class_name(dataset: str, class_id: int) -> str:
    """Name of label value ``class_id`` (1-based)."""
    return class_names(dataset)[class_id - 1]


def fold_classes(dataset: str, split: int | str, use_split_coco: bool = True) -> tuple[list[int], list[int]]:
    """(training class ids, held-out class ids) of fold ``split``, each ascending.

    ``split`` 'all' holds out nothing: every class trains (the cross-domain benchmark's
    PASCAL training, PATNet's ``--fold 4``), and the held-out list is empty.
    PASCAL-5i, synthetic and synthetic_video: fold i holds out 5i+1..5i+5.
    COCO-20i interleaved (``use_split_coco``): fold i holds out i+1, i+5, ..., i+77.
    COCO-20i sequential: fold i holds out 20i+1..20i+20.
    YouTube-VIS (always interleaved): fold i holds out i+1, i+5, ..., i+37 (``use_split_coco``
    does not apply). The synthetic video set has the synthetic image set's folds (5i+1..5i+5),
    so one backbone pretrained on an image fold's training classes serves the video fold too.
    """
    if split not in (0, 1, 2, 3, ALL_CLASSES) or isinstance(split, bool):
        raise ValueError(f"split must be 0, 1, 2, 3 or '{ALL_CLASSES}', got {split!r}")
    n = NUM_CLASSES.get(dataset)
    if n is None:
        raise _unknown(dataset)
    all_ids = list(range(1, n + 1))
    if split == ALL_CLASSES:
        return all_ids, []
    if dataset in _INTERLEAVED or (dataset == "coco" and use_split_coco):
        val = list(range(split + 1, n + 1, 4))
    else:
        per_fold = n // 4
        val = list(range(per_fold * split + 1, per_fold * (split + 1) + 1))
    train = [c for c in all_ids if c not in val]
    return train, val
