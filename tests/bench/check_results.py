#!/usr/bin/python3
"""Checks what benchmarks/run.sh --quick wrote: RESULTS/<suite>/*.json, README's tables,
RESULTS/plots/<suite>.png. Exits 1 naming the first thing that is missing or malformed.

    tests/bench/check_results.py RESULTS README
"""
import glob
import json
import os
import re
import struct
import sys

results, readme = sys.argv[1], sys.argv[2]
SUITES = {  # suite: the configurations --quick runs
    "stragglers": [f"n2_x{f}_sgd_{a}" for f in (1, 2) for a in ("dasgd", "gossip", "sync", "asgd-shuffle", "ddp")],
    "by-label": ["asgd-pure", "asgd-random", "asgd-shuffle", "asgd-shuffle-delay-adaptive", "dasgd", "gossip", "sync"],
    "scaling": [f"{a}_n{n}" for n in (1, 2) for a in ("local", "dasgd", "gossip", "sync")],
    "staleness": [f"dasgd_b{b}_x{f}" for f in (1, 4) for b in (1, 4)] + ["asgd-pure_x1", "asgd-pure_x4"],
}
errors = []


def check(ok, what):
    if not ok:
        errors.append(what)
    return ok


text = open(readme).read()
check("before" in text and "after" in text, "README: the text around the tables was not kept")
check("OLD TABLE" not in text, "README: the scaling block was not replaced")
for suite, configs in SUITES.items():
    files = sorted(glob.glob(os.path.join(results, suite, "*.json")))
    check(len(files) == len(configs), f"{suite}: {len(files)} JSON files, expected {len(configs)}")
    for config in configs:
        path = os.path.join(results, suite, f"{config}.r1.json")
        if not check(os.path.exists(path), f"{path} is missing"):
            continue
        try:
            m = json.load(open(path))
        except ValueError as e:
            check(False, f"{path}: not JSON ({e})")
            continue
        if not check(isinstance(m.get("bench"), dict) and m["bench"].get("config") == config
                     and isinstance(m["bench"].get("nproc"), int), f"{path}: no bench object for {config}"):
            continue
        check(0 <= m.get("test_accuracy", -1) <= 1, f"{path}: test_accuracy out of [0, 1]")
        check(m.get("train_seconds", 0) > 0, f"{path}: no train_seconds")
        check(len(m.get("ranks") or []) == m["bench"]["nproc"] and all(m["ranks"]),
              f"{path}: not every rank reported")
        check(m.get("stopped_by") == "budget", f"{path}: stopped by {m.get('stopped_by')}, not the budget")
        if suite == "stragglers":
            curve = m.get("eval_curve", [])
            check(len(curve) >= 1 and all({"seconds", "samples", "accuracy"} <= set(p) for p in curve),
                  f"{path}: no accuracy curve (seconds, samples, accuracy)")
            check(all(a["seconds"] < b["seconds"] and a["samples"] <= b["samples"] for a, b in zip(curve, curve[1:])),
                  f"{path}: the curve does not go forward in time")
    block = re.search(rf"<!-- bench:{suite} -->(.*?)<!-- /bench:{suite} -->", text, re.S)
    if check(block is not None, f"README: no {suite} block"):
        rows = [line for line in block.group(1).splitlines() if line.startswith("| ") and "---" not in line]
        body = [r for r in rows if not r.startswith("| ranks ") and not r.startswith("| algorithm ")
                and not r.startswith("| setting ") and not r.startswith("| aim ")]
        expected = len(configs) if suite != "scaling" else 4  # scaling: one row per algorithm
        check(len(body) >= expected, f"README {suite}: {len(body)} table rows, expected at least {expected}")
        check(f"results/plots/{suite}.png" in block.group(1), f"README {suite}: the plot is not linked")
    png = os.path.join(results, "plots", f"{suite}.png")
    if check(os.path.exists(png), f"{png} is missing"):
        head = open(png, "rb").read(24)
        ok = head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
        if check(ok, f"{png}: not a PNG"):
            w, h = struct.unpack(">II", head[16:24])
            check(w >= 200 and h >= 200, f"{png}: {w}x{h} pixels")
for e in errors:
    print(f"check_results.py: {e}", file=sys.stderr)
sys.exit(1 if errors else 0)
