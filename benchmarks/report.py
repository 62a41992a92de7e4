#!/usr/bin/python3
"""The benchmark report: reads the runs' JSON under RESULTS/<suite>/ (written by
benchmarks/run.sh), draws one PNG per suite with gnuplot under RESULTS/plots/, and
rewrites each suite's table in README between its markers

    <!-- bench:SUITE -->  ...  <!-- /bench:SUITE -->

(appended at the end when the markers are missing). Every figure is the median over the
repeats of a configuration, with the minimum and maximum in brackets. Standard library
only.

    benchmarks/report.py --results DIR --readme FILE [--suites a,b] [--note TEXT]
"""
import argparse
import glob
import json
import os
import re
import statistics
import subprocess
import sys
from collections import OrderedDict


def fail(message):
    print(f"report.py: {message}", file=sys.stderr)
    sys.exit(1)


def load(results, suite):
    runs = OrderedDict()
    for path in sorted(glob.glob(os.path.join(results, suite, "*.json"))):
        try:
            m = json.load(open(path))
            config = m["bench"]["config"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            fail(f"{path}: not a benchmark run's JSON ({e}); rerun benchmarks/run.sh")
        runs.setdefault(config, []).append(m)
    return runs


def med(values, fmt="{:.1f}"):
    """'median [min-max]' of the numbers in values; None entries count as missing."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    text = fmt.format(statistics.median(vals))
    if len(values) > 1:
        text += " [" + fmt.format(min(vals)) + "-" + fmt.format(max(vals)) + "]"
    if len(vals) < len(values):
        text += f" ({len(values) - len(vals)} of {len(values)} missing)"
    return text


def median_or_none(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def straggler_rank(m):
    return m["straggler"]["rank"] if m.get("straggler") else -1


def fast_rate(m):
    """Mean samples/s of the trainers other than the straggler."""
    slow = straggler_rank(m)
    rates = [r["samples_per_second"] for k, r in enumerate(m["ranks"])
             if r and r.get("trainer") and k != slow]
    return statistics.mean(rates) if rates else None


def all_staleness(m):
    """Staleness over every rank's applied updates: (mean, max, count)."""
    total, count, peak = 0.0, 0, 0
    for r in m["ranks"]:
        s = (r or {}).get("stats", {}).get("staleness") if r else None
        if not s or not s.get("count"):
            continue
        total += s["mean"] * s["count"]
        count += s["count"]
        peak = max(peak, s["max"])
    if count == 0:
        s = m["staleness"]
        return s["mean"], s["max"], s["count"]
    return total / count, peak, count


def staleness_cell(ms):
    """'mean / max' of the repeats' staleness over every rank, each as median [min-max]."""
    st = [all_staleness(m) for m in ms]
    return f"{med([s[0] for s in st], '{:.2f}')} / {med([s[1] for s in st], '{:.0f}')}"


def representative(runs, metric="test_accuracy"):
    """The repeat whose final `metric` is the median one (its curve is plotted); a run
    without one (a diverged run's null loss) sorts last."""
    ordered = sorted(runs, key=lambda m: m[metric] if m[metric] is not None else float("inf"))
    return ordered[(len(ordered) - 1) // 2]


def time_or_bound(ms):
    """(median time to the target, how many runs never reached it); a run that did not
    counts with its whole training time, a lower bound of its time."""
    short = sum(1 for m in ms if m["time_to_target_seconds"] is None)
    return median_or_none([m["train_seconds"] if m["time_to_target_seconds"] is None
                           else m["time_to_target_seconds"] for m in ms]), short


# ---- plots ------------------------------------------------------------------------------

def gnuplot(script, png):
    terminal = "pngcairo"
    probe = subprocess.run(["gnuplot", "-e", "set terminal pngcairo"], capture_output=True, text=True)
    if probe.returncode != 0 or "unknown" in probe.stderr.lower():
        terminal = "png"
    script = script.replace("@TERMINAL@", terminal)
    path = png[:-4] + ".gp"
    with open(path, "w") as f:
        f.write(script)
    p = subprocess.run(["gnuplot", os.path.abspath(path)], capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(png)))
    if p.returncode != 0 or not os.path.exists(png) or os.path.getsize(png) == 0:
        fail(f"gnuplot failed on {path}: {p.stderr.strip()[-500:]}")


def write_curves(plots, stem, series):
    """series: list of (title, [(x, y)]); writes one data file per series."""
    files = []
    for i, (title, points) in enumerate(series):
        path = os.path.join(plots, f"{stem}.{i}.dat")
        with open(path, "w") as f:
            for x, y in points:
                f.write(f"{x} {y}\n")
        files.append((path, title, len(points)))
    return files


def plot_panels(png, panels, xlabel, ylabel, cols=3, logx=False, yrange=None):
    """panels: list of (panel title, [(data file, series title, points)])."""
    rows = (len(panels) + cols - 1) // cols
    cols = min(cols, len(panels))
    lines = [f"set terminal @TERMINAL@ size {420 * cols},{320 * rows}",
             f"set output '{os.path.basename(png)}'", f"set multiplot layout {rows},{cols}",
             f"set xlabel '{xlabel}'", f"set ylabel '{ylabel}'", "set key bottom right", "set grid"]
    if logx:
        lines.append("set logscale x 2")
    if yrange:
        lines.append(f"set yrange [{yrange[0]}:{yrange[1]}]")
    for title, files in panels:
        lines.append(f"set title '{title}'")
        parts = [f"'{os.path.basename(path)}' using 1:2 with linespoints title '{t}'" for path, t, n in files if n > 0]
        if not parts:
            lines.append("set label 1 'no data' at graph 0.4, graph 0.5")
            lines.append("plot [0:1][0:1] NaN notitle")
            lines.append("unset label 1")
        else:
            lines.append("plot " + ", ".join(parts))
    lines.append("unset multiplot")
    return "\n".join(lines) + "\n"


# ---- suites -----------------------------------------------------------------------------

def curve_points(m, x="seconds"):
    return [(p[x], 100 * p["accuracy"]) for p in m.get("eval_curve", [])] + \
        ([(m["train_seconds"] if x == "seconds" else m["samples"], 100 * m["test_accuracy"])])


def split_config(config):
    # n{N}_x{F}_{opt}_{algo}
    n, x, opt, algo = config.split("_", 3)
    return int(n[1:]), float(x[1:]), opt, algo


def suite_stragglers(runs, plots):
    header = ("| ranks | straggler | rule | algorithm | time to 80 % s | accuracy at the budget % "
              "| fast ranks samples/s | staleness mean / max |\n|---:|---:|---|---|---:|---:|---:|---:|")
    rows, panels, by_setting = [], OrderedDict(), OrderedDict()
    for config, ms in runs.items():
        n, f, opt, algo = split_config(config)
        by_setting.setdefault((n, f, opt), OrderedDict())[algo] = ms
    aims = []
    for (n, f, opt), algos in sorted(by_setting.items()):
        series = []
        for algo, ms in algos.items():
            rows.append(f"| {n} | {'none' if f == 1 else f'{f:g}x'} | {opt} | {algo} | "
                        f"{med([m['time_to_target_seconds'] for m in ms])} | "
                        f"{med([100 * m['test_accuracy'] for m in ms])} | "
                        f"{med([fast_rate(m) for m in ms], '{:.0f}')} | {staleness_cell(ms)} |")
            series.append((algo, curve_points(representative(ms))))
        panels[(n, f, opt)] = write_curves(plots, f"stragglers.n{n}.x{f:g}.{opt}", series)
        # The aims, as ratios of medians.
        tt = {a: median_or_none([m["time_to_target_seconds"] for m in ms]) for a, ms in algos.items()}
        if f == 2 and "dasgd" in tt:
            for peer in ("ddp", "sync"):
                if peer in tt:
                    # A run of the peer that never got there took longer than its whole
                    # run: its training time is a lower bound, and the ratio an upper one.
                    peer_runs = algos[peer]
                    bound, short = time_or_bound(peer_runs)
                    if tt["dasgd"] is None:
                        ratio = "-"
                    elif short:
                        ratio = (f"< {tt['dasgd'] / bound:.2f} ({short} of {len(peer_runs)} {peer} runs "
                                 f"below 80 % at the end)")
                    else:
                        ratio = f"{tt['dasgd'] / bound:.2f}"
                    aims.append(f"| {n} ranks, {opt}, one rank 2x slower | DASGD's time to 80 % / {peer}'s "
                                f"| {'<= 0.5' if peer == 'ddp' else '<= 0.6'} | {ratio} |")
        if f == 2 and (n, 1.0, opt) in by_setting and "dasgd" in algos and "dasgd" in by_setting[(n, 1.0, opt)]:
            slow = median_or_none([fast_rate(m) for m in algos["dasgd"]])
            base = median_or_none([fast_rate(m) for m in by_setting[(n, 1.0, opt)]["dasgd"]])
            if slow and base:
                aims.append(f"| {n} ranks, {opt}, one rank 2x slower | DASGD's fast ranks' samples/s / "
                            f"without the straggler | >= 0.9 | {slow / base:.2f} |")
    png = os.path.join(plots, "stragglers.png")
    gnuplot(plot_panels(png, [(f"{n} ranks, {'no straggler' if f == 1 else f'one rank {f:g}x slower'}, {opt}", files)
                              for (n, f, opt), files in panels.items()],
                        "seconds of training", "test accuracy %", yrange=(0, 100)), png)
    text = header + "\n" + "\n".join(rows)
    if aims:
        text += "\n\n| setting | aim | target | measured |\n|---|---|---:|---:|\n" + "\n".join(aims)
    return text + "\n\n![accuracy against seconds](@PLOTS@/stragglers.png)"


def suite_by_label(runs, plots):
    header = ("| algorithm | accuracy % | worst class % | server steps (gradients) or steps of rank 0 "
              "| seconds | staleness mean / max |\n|---|---:|---:|---:|---:|---:|")
    rows, seconds, steps = [], [], []
    for config, ms in runs.items():
        rows.append(f"| {config} | {med([100 * m['test_accuracy'] for m in ms])} | "
                    f"{med([100 * m['worst_class_accuracy'] for m in ms])} | "
                    f"{med([m['ranks'][0]['steps'] for m in ms], '{:.0f}')} | "
                    f"{med([m['train_seconds'] for m in ms])} | {staleness_cell(ms)} |")
        rep = representative(ms)
        batch = 32
        seconds.append((config, curve_points(rep, "seconds")))
        steps.append((config, [(s / batch, a) for s, a in curve_points(rep, "samples")]))
    aims = []
    pure, shuffle = runs.get("asgd-pure"), runs.get("asgd-shuffle")
    if pure and shuffle:
        p = median_or_none([m["worst_class_accuracy"] for m in pure])
        s = median_or_none([m["worst_class_accuracy"] for m in shuffle])
        aims.append(f"| shuffle's worst-class accuracy >= pure's | {100 * s:.1f} vs {100 * p:.1f} | "
                    f"{'met' if s >= p else 'not met'} |")
    png = os.path.join(plots, "by-label.png")
    gnuplot(plot_panels(png, [("accuracy against seconds", write_curves(plots, "by-label.seconds", seconds)),
                              ("accuracy against steps (samples / 32)", write_curves(plots, "by-label.steps", steps))],
                        "seconds / steps", "test accuracy %", cols=2, yrange=(0, 100)), png)
    text = header + "\n" + "\n".join(rows)
    if aims:
        text += "\n\n| aim | measured | |\n|---|---:|---|\n" + "\n".join(aims)
    return text + "\n\n![accuracy against seconds and steps](@PLOTS@/by-label.png)"


def suite_scaling(runs, plots):
    table = OrderedDict()
    for config, ms in runs.items():
        algo, n = config.rsplit("_n", 1)
        table.setdefault(algo, OrderedDict())[int(n)] = ms
    ranks = sorted({n for per in table.values() for n in per})
    header = "| algorithm | " + " | ".join(f"{n} rank(s)" for n in ranks) + " |\n|---|" + "---:|" * len(ranks)
    rows, series = [], []
    local = {n: median_or_none([m["aggregate_samples_per_second"] for m in ms])
             for n, ms in table.get("local", {}).items()}
    for algo, per in table.items():
        cells = []
        for n in ranks:
            ms = per.get(n)
            if not ms:
                cells.append("-")
                continue
            cell = med([m["aggregate_samples_per_second"] for m in ms], "{:.0f}")
            agg = median_or_none([m["aggregate_samples_per_second"] for m in ms])
            if algo != "local" and local.get(n):
                cell += f" ({agg / local[n]:.2f}x)"
            cells.append(cell)
        rows.append(f"| {algo} | " + " | ".join(cells) + " |")
        series.append((algo, [(n, median_or_none([m["aggregate_samples_per_second"] for m in per[n]]))
                              for n in sorted(per)]))
    png = os.path.join(plots, "scaling.png")
    gnuplot(plot_panels(png, [("aggregate samples/s", write_curves(plots, "scaling", series))],
                        "ranks", "samples/s", cols=1, logx=True), png)
    return (header + "\n" + "\n".join(rows) +
            "\n\nIn brackets: the ratio to `local` (the same processes, no communication) at that rank count."
            "\n\n![aggregate samples/s against ranks](@PLOTS@/scaling.png)")


def predicted(algo, n, every, factor, slow_rank):
    """The job-count argument for docs/algorithms.md's set-based staleness, in units of a fast
    rank's step (delivery at once, no jitter). Trainers k of speeds v_k (1, or 1/factor
    for the straggler) and step times T_k = 1/v_k.

    Pure ASGD: a job of worker s is out for T_s, while the others' v_k T_s gradients reach
    the server: tau_s = sum_{k != s} v_k / v_s. Weighted by the rates v_s, S_avg = t - 1
    whatever the speeds; the straggler's gradients are the stalest, (t - 1) x factor.

    DASGD: a message of `every` steps is on average A_s = T_s (every + 1) / 2 old when
    sent; the receiver r applies it at its next step boundary, on average W_r = T_r / 2
    later, then its own step's update too (+1/2 on average), and x_s lacked r's
    (every - 1) / 2 unsent updates: tau_sr = sum_{k != s} v_k (A_s + W_r) + 1/2 +
    (every - 1) / 2. Every update is also applied once at its own rank with tau = 0, and
    S_avg averages over all of them (the measured figure counts those zeros too).
    Returns (S_avg, the straggler's mean over its applied updates, own zeros excluded)."""
    if algo.startswith("asgd"):
        t = n - 1
        return t - 1.0, (t - 1.0) * factor
    t = n
    v = [1.0 / factor if k == slow_rank else 1.0 for k in range(t)]
    tau = [[0.0] * t for _ in range(t)]
    for s in range(t):
        for r in range(t):
            if r != s:
                window = (every + 1) / 2 / v[s] + 0.5 / v[r]
                tau[s][r] = sum(v[k] for k in range(t) if k != s) * window + 0.5 + (every - 1) / 2
    total = sum(v[s] * sum(tau[s]) for s in range(t))
    mean = total / (sum(v) * t)
    s = slow_rank if 0 <= slow_rank < t else 0
    slow = sum(tau[s]) / (t - 1)
    return mean, slow


def suite_staleness(runs, plots):
    header = ("| algorithm | broadcast_every | straggler | S_avg measured | S_avg predicted "
              "| S_max measured | the straggler's updates: mean predicted |\n|---|---:|---:|---:|---:|---:|---:|")
    rows, series = [], OrderedDict()
    for config, ms in runs.items():
        m0 = ms[0]
        algo = m0["algo"]
        every = 1
        cmd = m0["bench"]["command"]
        if "--broadcast-every" in cmd:
            every = int(cmd[cmd.index("--broadcast-every") + 1])
        factor = m0["straggler"]["factor"] if m0.get("straggler") else 1.0
        st = [all_staleness(m) for m in ms]
        mean, slow = predicted(algo, m0["world_size"], every, factor, straggler_rank(m0))
        rows.append(f"| {algo} | {every if algo == 'dasgd' else '-'} | {'none' if factor == 1 else f'{factor:g}x'} | "
                    f"{med([s[0] for s in st], '{:.2f}')} | {mean:.2f} | {med([s[1] for s in st], '{:.0f}')} | {slow:.1f} |")
        key = f"{algo} b={every}" if algo == "dasgd" else algo
        series.setdefault(key, []).append((factor, median_or_none([s[0] for s in st])))
    png = os.path.join(plots, "staleness.png")
    gnuplot(plot_panels(png, [("measured S_avg against the straggler factor",
                               write_curves(plots, "staleness", [(k, sorted(v)) for k, v in series.items()]))],
                        "straggler factor", "S_avg", cols=1), png)
    return (header + "\n" + "\n".join(rows) +
            "\n\nPredicted: the job-count argument in `predicted()` in benchmarks/report.py (no jitter, "
            "delivery at once, a message applied at the receiver's next step boundary; S_avg counts "
            "each rank's own updates, applied with staleness 0). S_max is the largest single value: "
            "it sits above the straggler's mean by the jitter of a loaded machine."
            "\n\n![measured mean staleness](@PLOTS@/staleness.png)")


def loss_points(m):
    # The curve only: its points are on the same held-out windows (the final loss is
    # measured on more of them).
    return [(p["seconds"], p["loss"]) for p in m.get("eval_curve", []) if p.get("loss") is not None]


def suite_lm(runs, plots):
    any_run = next(iter(runs.values()))[0]
    target = any_run.get("target_loss")
    header = (f"| ranks | straggler | algorithm | time to loss {target} s | loss at the budget | "
              "aggregate samples/s | staleness mean / max |\n|---:|---:|---|---:|---:|---:|---:|")
    rows, panels, by_setting = [], OrderedDict(), OrderedDict()
    for config, ms in runs.items():
        n, f, _opt, algo = split_config(config)
        by_setting.setdefault((n, f), OrderedDict())[algo] = ms
    aims = []
    for (n, f), algos in sorted(by_setting.items()):
        series = []
        for algo, ms in algos.items():
            rows.append(f"| {n} | {'none' if f == 1 else f'{f:g}x'} | {algo} | "
                        f"{med([m['time_to_target_seconds'] for m in ms])} | "
                        f"{med([m['test_loss'] for m in ms], '{:.3f}')} | "
                        f"{med([m['aggregate_samples_per_second'] for m in ms], '{:.1f}')} | {staleness_cell(ms)} |")
            series.append((algo, loss_points(representative(ms, "test_loss"))))
        panels[(n, f)] = write_curves(plots, f"lm.n{n}.x{f:g}", series)
        if f == 2 and "dasgd" in algos and "ddp" in algos:
            mine = median_or_none([m["time_to_target_seconds"] for m in algos["dasgd"]])
            peer, short = time_or_bound(algos["ddp"])
            if mine is None:
                ratio = "- (DASGD did not reach the target)"
            elif short:
                ratio = f"< {mine / peer:.2f} ({short} of {len(algos['ddp'])} DDP runs short of the target)"
            else:
                ratio = f"{mine / peer:.2f}"
            aims.append(f"| {n} ranks, one rank 2x slower | DASGD's time to the target / DDP's | <= 0.5 | {ratio} |")
        if f == 1 and n == 2 and "dasgd" in algos and "local" in algos:
            d = median_or_none([m["aggregate_samples_per_second"] for m in algos["dasgd"]])
            loc = median_or_none([m["aggregate_samples_per_second"] for m in algos["local"]])
            if d and loc:
                aims.append(f"| 2 ranks, no straggler | DASGD's aggregate samples/s / local's | >= 0.95 | "
                            f"{d / loc:.3f} ({'met' if d / loc >= 0.95 else 'not met'}) |")
    png = os.path.join(plots, "lm.png")
    gnuplot(plot_panels(png, [(f"{n} ranks, {'no straggler' if f == 1 else f'one rank {f:g}x slower'}", files)
                              for (n, f), files in panels.items()],
                        "seconds of training", "held-out loss (nats per byte)", cols=2), png)
    params = any_run.get("parameters")
    text = (f"The transformer: {params:,} parameters" if params else "The transformer") + \
        "; samples are windows of bytes.\n\n" + header + "\n" + "\n".join(rows)
    if aims:
        text += "\n\n| setting | aim | target | measured |\n|---|---|---:|---:|\n" + "\n".join(aims)
    return text + "\n\n![held-out loss against seconds](@PLOTS@/lm.png)"


SUITES = OrderedDict([("stragglers", suite_stragglers), ("by-label", suite_by_label),
                      ("scaling", suite_scaling), ("staleness", suite_staleness), ("lm", suite_lm)])


def main():
    p = argparse.ArgumentParser(description="the benchmark report")
    p.add_argument("--results", required=True)
    p.add_argument("--readme", required=True)
    p.add_argument("--suites", default=",".join(SUITES))
    p.add_argument("--note", default="")
    o = p.parse_args()
    plots = os.path.join(o.results, "plots")
    os.makedirs(plots, exist_ok=True)
    readme = open(o.readme).read() if os.path.exists(o.readme) else "# Benchmarks\n"
    for suite in o.suites.split(","):
        if suite not in SUITES:
            fail(f"unknown suite '{suite}' ({', '.join(SUITES)})")
        runs = load(o.results, suite)
        if not runs:
            fail(f"no runs under {o.results}/{suite}: run benchmarks/run.sh --suites {suite} first")
        link = os.path.relpath(os.path.abspath(plots), os.path.dirname(os.path.abspath(o.readme)))
        body = SUITES[suite](runs, plots).replace("@PLOTS@", link)
        block = f"<!-- bench:{suite} -->\n{o.note}.\n\n{body}\n<!-- /bench:{suite} -->"
        pattern = re.compile(rf"<!-- bench:{re.escape(suite)} -->.*?<!-- /bench:{re.escape(suite)} -->", re.S)
        if pattern.search(readme):
            readme = pattern.sub(lambda _: block, readme)
        else:
            readme = readme.rstrip("\n") + f"\n\n## {suite}\n\n{block}\n"
        print(f"report.py: {suite}: {sum(len(v) for v in runs.values())} runs, table and "
              f"{os.path.join(plots, suite + '.png')}", file=sys.stderr)
    with open(o.readme + ".tmp", "w") as f:
        f.write(readme)
    os.replace(o.readme + ".tmp", o.readme)


if __name__ == "__main__":
    main()
