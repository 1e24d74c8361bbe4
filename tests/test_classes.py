import pytest

from util.classes import COCO_CLASSES, PASCAL_CLASSES, class_name, fold_classes


def test_pascal_folds_hold_out_five_consecutive_classes():
    assert fold_classes("pascal", 0)[1] == [1, 2, 3, 4, 5]
    assert fold_classes("pascal", 3)[1] == [16, 17, 18, 19, 20]
    train, val = fold_classes("pascal", 1)
    assert val == [6, 7, 8, 9, 10]
    assert train == [1, 2, 3, 4, 5] + list(range(11, 21))


def test_coco_interleaved_and_sequential_folds():
    assert fold_classes("coco", 0, True)[1] == list(range(1, 81, 4))
    assert fold_classes("coco", 3, True)[1] == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52,
                                                56, 60, 64, 68, 72, 76, 80]
    assert fold_classes("coco", 1, False)[1] == list(range(21, 41))
    for use_split in (True, False):
        vals = [fold_classes("coco", i, use_split)[1] for i in range(4)]
        assert sorted(sum(vals, [])) == list(range(1, 81))
        assert all(len(v) == 20 for v in vals)
        train, val = fold_classes("coco", 2, use_split)
        assert sorted(train + val) == list(range(1, 81)) and not set(train) & set(val)


def test_class_names_follow_label_ids():
    assert len(PASCAL_CLASSES) == 20 and len(COCO_CLASSES) == 80
    assert class_name("pascal", 1) == "aeroplane" and class_name("pascal", 20) == "tvmonitor"
    assert class_name("pascal", 15) == "person"
    assert class_name("coco", 1) == "person" and class_name("coco", 80) == "toothbrush"
    assert class_name("coco", 57) == "chair" and class_name("coco", 62) == "toilet"
    assert len(set(COCO_CLASSES)) == 80


def test_ytvis_folds_interleave_the_40_classes():
    from util.classes import SYNTHETIC_CLASSES, YTVIS_CLASSES, class_names

    assert len(YTVIS_CLASSES) == 40 and len(set(YTVIS_CLASSES)) == 40
    assert class_name("ytvis", 1) == "person" and class_name("ytvis", 40) == "tennis_racket"
    held_out = {
        0: "person skateboard snake duck train motorbike deer truck snowboard frog",
        1: "giant_panda sedan monkey cat horse giraffe owl zebra boat eagle",
        2: "lizard ape hand cow turtle leopard surfboard tiger shark earless_seal",
        3: "parrot dog rabbit fish bear fox airplane elephant mouse tennis_racket",
    }
    for fold, names in held_out.items():
        for use_split in (True, False):          # the COCO switch does not apply
            train, val = fold_classes("ytvis", fold, use_split)
            assert val == list(range(fold + 1, 41, 4))
            assert [class_name("ytvis", c) for c in val] == names.split()
            assert len(train) == 30 and sorted(train + val) == list(range(1, 41))
    assert class_names("synthetic_video") == SYNTHETIC_CLASSES
    # the synthetic video set has the synthetic image set's sequential folds
    assert fold_classes("synthetic_video", 1)[1] == fold_classes("synthetic", 1)[1] == [6, 7, 8, 9, 10]
    with pytest.raises(ValueError, match="unknown dataset 'davis'; expected one of pascal, coco, synthetic, ytvis"):
        class_names("davis")


def test_fold_all_trains_every_class_and_holds_out_none():
    assert fold_classes("pascal", "all") == (list(range(1, 21)), [])
    assert fold_classes("coco", "all", False) == (list(range(1, 81)), [])
    for bad in (4, "4", True):
        with pytest.raises(ValueError, match=r"split must be 0, 1, 2, 3 or 'all', got"):
            fold_classes("pascal", bad)
