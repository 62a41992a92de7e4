#!/usr/bin/python3
"""Tables and plots of benchmarks/slow_links.sh: usage slow_links_report.py DIR SECONDS CIFAR_SECONDS [EVAL_SECONDS].

Reads DIR/<name>.r<k>.json (the examples' metrics) and DIR/<name>.r<k>.links (bytes each
emulated host sent on its link), writes DIR/README.md (the tables) and DIR/<net>_n<H>_<rate>.png
(test accuracy over training time, one line per configuration)."""
import glob
import json
import os
import re
import statistics
import subprocess
import sys

out, secs, cifar_secs = sys.argv[1], sys.argv[2], sys.argv[3]
eval_secs = sys.argv[4] if len(sys.argv) > 4 else "2"
NAME = re.compile(r"(mnist|cifar)_n(\d+)_(\w+?)_(dasgd|gossip|sync|asgd-shuffle)_([\w.:]+)\.r(\d+)\.json$")

runs = {}
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    m = NAME.search(os.path.basename(path))
    if not m:
        continue
    net, hosts, rate, algo, codec, rep = m.groups()
    metrics = json.load(open(path))
    links = {}
    with open(path[: -len(".json")] + ".links") as f:
        for line in f:
            _, r, _, b = line.split()
            links[int(r)] = int(b)
    steps = [r["steps"] if r else 0 for r in metrics["ranks"]]
    per_step = [links[r] / steps[r] for r in range(len(steps)) if steps[r] > 0]
    runs.setdefault((net, int(hosts), rate, algo, codec), []).append(
        {"m": metrics, "bytes_per_step": statistics.median(per_step) if per_step else float("nan")})


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def med_time(times):
    """Median time to the target, a run that missed it counting as longer than any."""
    if not times:
        return None
    m = statistics.median([float("inf") if t is None else t for t in times])
    return None if m == float("inf") else m


def budget(keys):
    """The budget in seconds of the runs of `keys` (the command line's where they do not say)."""
    values = {r["m"].get("budget", {}).get("seconds") for k in keys for r in runs[k]}
    values.discard(None)
    return "/".join(f"{v:g}" for v in sorted(values)) if values else (secs if keys[0][0] == "mnist" else cifar_secs)


def evaluation(keys):
    """How the runs of `keys` evaluated, from their metrics (older runs do not say)."""
    settings = set()
    for k in keys:
        for r in runs[k]:
            e = r["m"].get("evaluation")
            if e is None:  # an older run: the command line's interval, the default 200 steps
                deferred = r["m"].get("eval_seconds") == 0 and bool(r["m"]["eval_curve"])
                settings.add((float(eval_secs), 200, deferred))
            else:
                settings.add((e["every_seconds"], e["every_steps"], e["deferred"]))
    if len(settings) > 1:
        return "**the rows' evaluation settings differ (see each run's JSON): compare with care**"
    every_s, every_steps, deferred = settings.pop()
    when = " and ".join(w for w in (f"every {every_s:g} s of training" if every_s else "",
                                    f"every {every_steps} of its steps" if every_steps else "") if w)
    if deferred:
        return (f"rank 0 copies its model {when} and evaluates the copies on 2000 test samples after "
                "training (--eval-deferred: no rank pauses)")
    return (f"rank 0 evaluates 2000 test samples {when} (its clock stops meanwhile; the other ranks "
            "of DASGD and gossip train on)")


def cell(v, fmt):
    return "-" if v is None else fmt.format(v)


lines = []
for net in ("mnist", "cifar"):
    keys = sorted(k for k in runs if k[0] == net)
    if not keys:
        continue
    if net == "mnist":
        lines.append(f"**Fashion-MNIST, the MNIST example network (87 KB of parameters), {budget(keys)} s "
                     f"budget, SGD lr 0.03 momentum 0.7 (gossip lr 0.12: 0.03 x 4), batch 32, "
                     f"{evaluation(keys)}.**")
    else:
        lines.append(f"**CIFAR example's ResNet-20 (1.1 MB of parameters) on 2048 synthetic images, "
                     f"{budget(keys)} s budget: throughput and bytes only.**")
    lines.append("")
    lines.append("| hosts | link | algorithm | codec | bytes on the link per rank and step | vs none | "
                 "aggregate samples/s | time to 80 % s | final accuracy % |")
    lines.append("|---:|---|---|---|---:|---:|---:|---:|---:|")
    for key in keys:
        _, hosts, rate, algo, codec = key
        rs = runs[key]
        bps = med([r["bytes_per_step"] for r in rs])
        base = runs.get((net, hosts, rate, algo, "none"))
        ratio = bps / med([r["bytes_per_step"] for r in base]) if base else None
        sps = med([r["m"]["aggregate_samples_per_second"] for r in rs])
        ttt = [r["m"]["time_to_target_seconds"] for r in rs]
        missed = sum(t is None for t in ttt)
        t_cell = cell(med_time(ttt), "{:.1f}")
        reached = sorted(t for t in ttt if t is not None)
        if len(rs) > 1 and reached:
            t_cell += f" ({reached[0]:.1f}-{reached[-1]:.1f})"
        if missed:
            t_cell += f" ({missed} of {len(rs)} missed)"
        if net == "cifar":
            t_cell = "-"
        acc = med([r["m"]["test_accuracy"] for r in rs])
        codec_cell = codec if len(rs) == 1 else f"{codec} (median of {len(rs)} runs)"
        lines.append(f"| {hosts} | {rate} | {algo} | {codec_cell} | {cell(bps, '{:.0f}')} | {cell(ratio, '{:.2f}')} | "
                     f"{cell(sps, '{:.0f}')} | {t_cell} | {cell(acc * 100 if net == 'mnist' else None, '{:.1f}')} |")
    lines.append("")

# Plots: accuracy over training time, one panel file per (hosts, rate).
for hosts, rate in sorted({(k[1], k[2]) for k in runs if k[0] == "mnist"}):
    series = []
    for key in sorted(k for k in runs if k[:3] == ("mnist", hosts, rate)):
        curve = runs[key][0]["m"]["eval_curve"]
        if not curve:
            continue
        data = os.path.join(out, f"curve_n{hosts}_{rate}_{key[3]}_{key[4].replace(':', '_')}.dat")
        with open(data, "w") as f:
            for p in curve:
                f.write(f"{p['seconds']} {100 * p['accuracy']}\n")
        series.append((os.path.basename(data), f"{key[3]} {key[4]}"))
    if not series:
        continue
    png = f"mnist_n{hosts}_{rate}.png"
    plot = ", ".join(f"'{d}' using 1:2 with linespoints title '{t}'" for d, t in series)
    term = "pngcairo" if subprocess.run(["gnuplot", "-e", "set terminal pngcairo"], capture_output=True).returncode == 0 else "png"
    script = (f"set terminal {term} size 800,500; set output '{png}'; "
              f"set title 'Fashion-MNIST, {hosts} emulated hosts, {rate} links'; "
              "set xlabel 'training time (s)'; set ylabel 'test accuracy (%)'; set key bottom right; "
              f"set yrange [0:90]; set grid; plot {plot}")
    subprocess.run(["gnuplot", "-e", script], cwd=out, check=True)
    lines.append(f"![accuracy over time, {hosts} hosts at {rate}]({png})")
    lines.append("")

with open(os.path.join(out, "README.md"), "w") as f:
    f.write("Produced by benchmarks/slow_links.sh (one run per row unless it says so).\n\n")
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
