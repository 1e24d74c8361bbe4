"""Time the class-index build for a list: first (scan) and cached.

    python tools/make_synthetic.py --out data/synth10k --train 10000 --val 0
    python tools/measure/bench_class_index.py --data-root data/synth10k --list data/synth10k/train.txt

Removes the list's cache first, then loads the index twice, as training start-up would.
"""
from __future__ import annotations

import argparse
import os
import time


from dataset.class_index import build_class_index, cache_path_for, load_area_table
from util.cli import run
from util.classes import fold_classes
from util.fileio import read_list


def time_index(list_path: str, data_root: str, workers: int, dataset: str = "synthetic") -> dict:
    out = {}
    if os.path.exists(cache_path_for(list_path)):
        os.remove(cache_path_for(list_path))
    for run in ("first", "cached"):
        t0 = time.perf_counter()
        pairs = read_list(list_path, data_root)           # includes the existence check
        table, cached = load_area_table(list_path, data_root, [lab for _, lab in pairs], workers)
        index = build_class_index(table, fold_classes(dataset, 0)[0], 2048)
        out[run] = {"seconds": time.perf_counter() - t0, "from_cache": cached,
                    "images": len(pairs), "serving": len(index.images)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True)
    p.add_argument("--list", required=True)
    p.add_argument("--workers", type=int, default=0, help="scan processes (0: all cores)")
    p.add_argument("--dataset", default="synthetic", help="class split used for the filtered index")
    args = p.parse_args(argv)
    result = time_index(args.list, args.data_root, args.workers, args.dataset)
    for run, r in result.items():
        print(f"{run:7s} {r['seconds']:7.3f} s  from_cache={r['from_cache']}  "
              f"{r['images']} images, {r['serving']} serve a fold-0 training class")
    return result


if __name__ == "__main__":
    run(main)
