"""Where a process's time went, from py-spy's raw (collapsed) stacks.

    python bench/spy_summary.py SPY.txt [--rate 100] [--top 40] [--thread MainThread]
        [--under FUNCTION]

Prints, per thread, the seconds sampled, then the frames with the most inclusive time
(a frame counted once per sample however deep it recurs), as seconds at ``--rate``
samples a second. ``--under`` keeps only the samples whose stack passes through a frame
containing that text (say ``warm_up``), to split one phase further.
"""
from __future__ import annotations

import argparse
import collections
import re
from typing import Dict, List, Tuple

FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


def read(path: str) -> List[Tuple[List[str], int]]:
    stacks = []
    for line in open(path, encoding="utf-8", errors="replace"):
        line = line.rstrip("\n")
        if not line:
            continue
        frames, _, count = line.rpartition(" ")
        stacks.append((frames.split(";"), int(count)))
    return stacks


def name(frame: str) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame
    function, where = match.groups()
    return f"{function} ({where.split('site-packages/')[-1]})"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--thread", default="")
    parser.add_argument("--under", default="")
    args = parser.parse_args()
    by_thread: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    for frames, count in read(args.path):
        thread = frames[0]
        if args.thread and args.thread not in thread:
            continue
        if args.under and not any(args.under in frame for frame in frames[1:]):
            continue
        totals[thread] += count
        for key in {name(frame) for frame in frames[1:]}:
            by_thread[thread][key] += count
    for thread, total in totals.most_common():
        print(f"== {thread}: {total / args.rate:.2f} s")
        for key, count in by_thread[thread].most_common(args.top):
            print(f"{count / args.rate:8.2f} s  {key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
