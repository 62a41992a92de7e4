#!/usr/bin/python3
"""PyTorch DDP on the MNIST example's network (--task mnist) or asgd-lm's transformer
(--task lm): the synchronous peer that torch_asgd's benchmarks compare against, in the
same run, on the same data, batch, learning rule and straggler as asgd-mnist or asgd-lm,
and with their metrics JSON (the keys the benchmark report reads).

Runs under asgd-launch (or any launcher that exports RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT, rank 0 hosting the store), with Debian's python3-torch (1.13) and the gloo
backend. Debian's torchrun 1.13 fails under Python 3.11 before it starts a worker, so it
is not used:

    asgd-launch --nproc 2 --master-port 0 -- /usr/bin/python3 benchmarks/ddp.py \\
        --budget-seconds 30 --straggler 1:2 --metrics-out ddp.json
    asgd-launch --nproc 2 --master-port 0 -- /usr/bin/python3 benchmarks/ddp.py --task lm \\
        --width 128 --depth 4 --heads 4 --context 64 --budget-seconds 60 --target-loss 2.2

What matches asgd-mnist (benchmarks/harness/common): the network (benchmarks/harness/mnist/net.h), the data
(IDX files, scaled to [-1, 1]), the shards (--partition iid: a seeded permutation cut in
WORLD_SIZE parts; full: every rank the whole set in its own order), reshuffled each pass,
SGD with momentum (lr 0.03, momentum 0.7) or AdamW (lr 1e-3, weight decay 0.01), batch 32
per rank, the straggler (rank R sleeps (F - 1) x its compute time each step), budgets
(seconds or samples over all ranks; every rank stops at the same step, agreed every 16
steps), and evaluation on a clock on rank 0's training thread, the pause excluded from
the reported times. What differs: the straggler's measured compute includes the gradient
all-reduce, which DDP overlaps with the backward pass (on loopback, ~1 ms of ~10 ms).

With --task lm: the transformer of benchmarks/harness/lm/transformer.h (the same layers,
sizes and initialisation scheme), the text of benchmarks/harness/lm/text.cc (a file or a
directory's regular files in name order, .dat files and links skipped, disjoint windows of
context + 1 bytes, every 20th held out), asgd-lm's defaults (AdamW, batch 16, 64 held-out
windows evaluated during training, 256 at the end), its loss in nats per byte.
"""
import math
import argparse
import gzip
import json
import os
import struct
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


class CausalSelfAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, t, c = x.shape
        d = c // self.heads
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        future = torch.ones(t, t, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        return self.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Transformer(nn.Module):
    """benchmarks/harness/lm/transformer.h: bytes [B, T] -> log-probabilities [B, T, 256]."""

    def __init__(self, width, depth, heads, context):
        super().__init__()
        self.tokens = nn.Embedding(256, width)
        self.positions = nn.Parameter(torch.randn(context, width) * 0.02)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)
        with torch.no_grad():
            self.tokens.weight.normal_(0, 0.02)

    def forward(self, x):
        h = self.tokens(x) + self.positions[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return F.log_softmax(self.head(self.norm(h)), dim=-1)


class MnistNet(nn.Module):
    """benchmarks/harness/mnist/net.h: LibTorch's MNIST example network, 21,840 parameters."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.view(-1, 320)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, p=0.5, training=self.training)
        return F.log_softmax(self.fc2(x), dim=1)


def fail(message):
    print(f"ddp.py: {message}", file=sys.stderr)
    sys.stderr.flush()
    # Leave at once: once the gloo group exists, a normal exit can hang in its teardown.
    os._exit(1)


def read_idx(directory, stem):
    def load(name):
        for path in (os.path.join(directory, name), os.path.join(directory, name + ".gz")):
            if os.path.exists(path):
                opener = gzip.open if path.endswith(".gz") else open
                with opener(path, "rb") as f:
                    return path, f.read()
        fail(f"{directory}/{name}[.gz] not found: --data must name a directory with "
             "MNIST-format IDX files (Debian's dataset-fashion-mnist: /usr/share/datasets/fashion-mnist)")

    ipath, img = load(f"{stem}-images-idx3-ubyte")
    lpath, lab = load(f"{stem}-labels-idx1-ubyte")
    if len(img) < 16 or struct.unpack(">I", img[:4])[0] != 2051:
        fail(f"{ipath}: not an IDX image file (magic number 2051 expected)")
    if len(lab) < 8 or struct.unpack(">I", lab[:4])[0] != 2049:
        fail(f"{lpath}: not an IDX label file (magic number 2049 expected)")
    n, rows, cols = struct.unpack(">III", img[4:16])
    (nl,) = struct.unpack(">I", lab[4:8])
    if (rows, cols) != (28, 28) or len(img) != 16 + n * 784 or len(lab) != 8 + nl or n != nl:
        fail(f"{ipath} and {lpath} do not hold matching 28x28 images and labels")
    images = torch.frombuffer(bytearray(img[16:]), dtype=torch.uint8).view(n, 1, 28, 28)
    labels = torch.frombuffer(bytearray(lab[8:]), dtype=torch.uint8).long()
    if n == 0:
        fail(f"{ipath} holds no images")
    if labels.max().item() > 9:
        bad = int((labels > 9).nonzero()[0].item())
        fail(f"{lpath}: label {labels[bad].item()} of item {bad} is not a digit class 0..9")
    return images.float().div_(255.0).sub_(0.5).div_(0.5), labels


def read_text(path, context):
    """benchmarks/harness/lm/text.cc: (train inputs, train labels, test inputs, test labels)."""
    if not os.path.exists(path):
        fail(f"--data {path}: no such file or directory (scripts/deps.sh installs Debian's fortunes: "
             "apt-get install fortunes)")
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path))
        files = [f for f in files if not os.path.islink(f) and os.path.isfile(f) and not f.endswith(".dat")]
    else:
        files = [path]
    text = b"".join(open(f, "rb").read() for f in files)
    span = context + 1
    if len(text) < 20 * span:
        fail(f"--data {path}: {len(text)} bytes of text, and this run needs at least {20 * span}")
    windows = len(text) // span
    w = torch.frombuffer(bytearray(text[: windows * span]), dtype=torch.uint8).view(windows, span).long()
    held = torch.arange(windows) % 20 == 19
    train, test = w[~held], w[held]
    return train[:, :-1].contiguous(), train[:, 1:].contiguous(), test[:, :-1].contiguous(), test[:, 1:].contiguous()


def nll(out, labels, reduction="mean"):
    return F.nll_loss(out.reshape(-1, out.shape[-1]), labels.reshape(-1), reduction=reduction)


def evaluate(model, images, labels, limit, classes, chunk):
    """(accuracy, loss, per-class accuracies) on the first `limit` samples."""
    model.eval()
    n = min(limit, labels.shape[0])
    hits, predictions, loss = 0, 0, 0.0
    correct = torch.zeros(max(classes, 1), dtype=torch.long)
    seen = torch.zeros(max(classes, 1), dtype=torch.long)
    with torch.no_grad():
        for start in range(0, n, chunk):
            out = model(images[start:min(start + chunk, n)])
            y = labels[start:min(start + chunk, n)]
            loss += nll(out, y, "sum").item()
            hit = out.argmax(-1).eq(y)
            hits += hit.sum().item()
            predictions += y.numel()
            if classes:
                seen += torch.bincount(y.reshape(-1), minlength=classes)
                correct += torch.bincount(y.reshape(-1)[hit.reshape(-1)], minlength=classes)
    model.train()
    per_class = [c / s for c, s in zip(correct.tolist(), seen.tolist()) if s > 0] if classes else []
    return hits / max(predictions, 1), loss / max(predictions, 1), per_class


def reached(o, accuracy, loss):
    return (o.target_accuracy > 0 and accuracy >= o.target_accuracy) or (o.target_loss > 0 and loss <= o.target_loss)


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["mnist", "lm"], default="mnist")
    p.add_argument("--data", default="")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=None)
    p.add_argument("--lr", type=float, default=0)
    p.add_argument("--momentum", type=float, default=0.7)
    p.add_argument("--weight-decay", type=float, default=-1)
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--budget-seconds", type=float, default=0)
    p.add_argument("--budget-samples", type=int, default=0)
    p.add_argument("--partition", choices=["iid", "full"], default="iid")
    p.add_argument("--straggler", default="")
    p.add_argument("--target-accuracy", type=float, default=0)
    p.add_argument("--target-loss", type=float, default=0)
    p.add_argument("--eval-every-seconds", type=float, default=0)
    p.add_argument("--eval-samples", type=int, default=0)
    p.add_argument("--final-eval-samples", type=int, default=-1)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--metrics-out", default="")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    o = p.parse_args()
    lm = o.task == "lm"
    # asgd-lm's defaults differ from asgd-mnist's (benchmarks/harness/lm/main.cc).
    o.data = o.data or ("/usr/share/games/fortunes" if lm else "/usr/share/datasets/fashion-mnist")
    o.optimizer = o.optimizer or ("adamw" if lm else "sgd")
    o.batch_size = o.batch_size or (16 if lm else 32)
    o.eval_samples = o.eval_samples or (64 if lm else 2000)
    if o.final_eval_samples < 0:
        o.final_eval_samples = 256 if lm else 0
    if lm and (min(o.width, o.depth, o.heads, o.context) <= 0 or o.width % o.heads):
        p.error(f"the transformer needs positive sizes and --heads {o.heads} dividing --width {o.width}")
    if o.target_accuracy > 0 and o.target_loss > 0:
        p.error("give one target: --target-accuracy or --target-loss")
    o.straggler_rank, o.straggler_factor = -1, 1.0
    if o.straggler:
        try:
            r, f = o.straggler.split(":")
            o.straggler_rank, o.straggler_factor = int(r), float(f)
        except ValueError:
            p.error(f"--straggler '{o.straggler}' must be RANK:FACTOR (e.g. 1:2)")
        if o.straggler_rank < 0 or o.straggler_factor < 1:
            p.error(f"--straggler '{o.straggler}' must be RANK:FACTOR with RANK >= 0 and FACTOR >= 1")
    for name in ("batch_size", "epochs", "eval_samples", "threads"):
        if getattr(o, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, not {getattr(o, name)}")
    for name in ("budget_seconds", "budget_samples", "eval_every_seconds", "lr", "target_loss"):
        if getattr(o, name) < 0:
            p.error(f"--{name.replace('_', '-')} must not be negative")
    if not 0 <= o.target_accuracy <= 1:
        p.error("--target-accuracy must be within 0..1")
    if o.budget_seconds > 0 and o.budget_samples > 0:
        p.error("give one budget: samples or seconds")
    if o.lr == 0:
        o.lr = 0.03 if o.optimizer == "sgd" else 1e-3
    if o.weight_decay < 0:
        o.weight_decay = 0.01 if o.optimizer == "adamw" else 0.0
    return o


def main():
    o = parse()
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            fail(f"{var} is not set: start it with asgd-launch --nproc N -- /usr/bin/python3 {sys.argv[0]} ...")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if o.straggler_rank >= world:
        fail(f"--straggler rank {o.straggler_rank} is out of range: this job has ranks 0..{world - 1}")
    torch.set_num_threads(o.threads)
    # Bad data is found before the group is formed: every rank says so and exits.
    lm = o.task == "lm"
    if lm:
        train_x, train_y, test_x, test_y = read_text(o.data, o.context)
    else:
        train_x, train_y = read_idx(o.data, "train")
        test_x, test_y = read_idx(o.data, "t10k")
    classes, chunk = (0, 16) if lm else (10, 1000)
    n = train_y.shape[0]
    if (n if o.partition == "full" else n // world) < o.batch_size:
        fail(f"each of the {world} ranks gets {n if o.partition == 'full' else n // world} samples, "
             f"fewer than one batch of {o.batch_size}: use a smaller --batch-size or fewer ranks")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    if o.partition == "full":
        mine = torch.arange(n)
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(o.seed))
        per = n // world
        mine = order[rank * per:(rank + 1) * per]
    torch.manual_seed(o.seed)  # the same initial model everywhere (DDP broadcasts rank 0's anyway)
    net = Transformer(o.width, o.depth, o.heads, o.context) if lm else MnistNet()
    parameters = sum(p.numel() for p in net.parameters())
    model = DDP(net)
    if o.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    gen = torch.Generator().manual_seed(o.seed * 1000 + rank)
    per_epoch = mine.numel() // o.batch_size
    if o.budget_samples > 0:
        total_steps = -(-o.budget_samples // (world * o.batch_size))
    elif o.budget_seconds > 0:
        total_steps = -1
    else:
        total_steps = o.epochs * per_epoch
    stopped_by = "budget" if o.budget_samples > 0 or o.budget_seconds > 0 else "epochs"

    t0 = time.monotonic()
    pause = 0.0
    clock = lambda: time.monotonic() - t0 - pause  # noqa: E731
    curve, time_to_target = [], None
    next_eval = o.eval_every_seconds
    order, pos, step = None, per_epoch * o.batch_size, 0
    while True:
        if total_steps >= 0 and step >= total_steps:
            break
        if total_steps < 0 and step % 16 == 0:
            flag = torch.tensor([1.0 if clock() >= o.budget_seconds else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0:
                break
        if pos + o.batch_size > mine.numel():
            order, pos = torch.randperm(mine.numel(), generator=gen), 0
        idx = mine[order[pos:pos + o.batch_size]]
        pos += o.batch_size
        s0 = time.monotonic()
        opt.zero_grad()
        loss = nll(model(train_x[idx]), train_y[idx])
        loss.backward()  # DDP's all-reduce of the gradients, overlapped with the backward pass
        compute = time.monotonic() - s0
        if rank == o.straggler_rank and o.straggler_factor > 1:
            time.sleep((o.straggler_factor - 1) * compute)
        opt.step()
        step += 1
        if rank == 0 and o.eval_every_seconds > 0 and clock() >= next_eval:
            e0 = time.monotonic()
            acc, eval_loss, _ = evaluate(model.module, test_x, test_y, o.eval_samples, classes, chunk)
            pause += time.monotonic() - e0
            at = clock()
            curve.append({"seconds": at, "samples": step * world * o.batch_size, "accuracy": acc, "loss": eval_loss})
            if time_to_target is None and reached(o, acc, eval_loss):
                time_to_target = at
            while next_eval <= clock():
                next_eval += o.eval_every_seconds
    train_seconds = clock()
    acc, test_loss, per_class = evaluate(model.module, test_x, test_y, o.final_eval_samples or test_y.shape[0],
                                         classes, chunk)
    if rank == 0 and time_to_target is None and reached(o, acc, test_loss):
        time_to_target = train_seconds
    mine_report = {"trainer": True, "steps": step, "samples_per_second": step * o.batch_size / max(train_seconds, 1e-9),
                   "accuracy": acc, "loss": test_loss, "stats": {}}
    reports = [None] * world
    dist.all_gather_object(reports, mine_report)
    wall_seconds = time.monotonic() - t0
    if rank == 0:
        rates = [r["samples_per_second"] for r in reports]
        metrics = {
            "program": f"ddp-{o.task}", "algo": "ddp", "parameters": parameters, "optimizer": o.optimizer, "lr": o.lr,
            "world_size": world, "workers": world,
            "epochs": None if stopped_by == "budget" else o.epochs,
            "budget": {"samples": o.budget_samples or None, "seconds": o.budget_seconds or None},
            "stopped_by": stopped_by, "partition": o.partition,
            "straggler": {"rank": o.straggler_rank, "factor": o.straggler_factor} if o.straggler_rank >= 0 else None,
            # As asgd-lm's JSON: a non-finite loss is null (exp overflows above 709).
            "test_accuracy": acc, "test_loss": test_loss if math.isfinite(test_loss) else None,
            "perplexity": math.exp(test_loss) if math.isfinite(test_loss) and test_loss < 709 else None,
            "class_accuracy": per_class,
            "worst_class_accuracy": min(per_class) if per_class else acc,
            "wall_seconds": wall_seconds, "train_seconds": train_seconds, "eval_seconds": pause,
            "target_accuracy": o.target_accuracy or None, "target_loss": o.target_loss or None,
            "time_to_target_seconds": time_to_target,
            "samples": sum(r["steps"] for r in reports) * o.batch_size,
            "samples_per_second": rates, "aggregate_samples_per_second": sum(rates),
            # Synchronous: every gradient is computed at the model it is applied to.
            "staleness": {"kind": "staleness", "mean": 0.0, "max": 0, "count": sum(r["steps"] for r in reports),
                          "bounded": 0},
            "eval_curve": curve, "ranks": reports,
        }
        if o.metrics_out:
            with open(o.metrics_out + ".tmp", "w") as f:
                json.dump(metrics, f, indent=1)
            os.replace(o.metrics_out + ".tmp", o.metrics_out)
        print(f"ddp: {step} steps per rank in {train_seconds:.1f} s; test accuracy {acc:.4f}, loss {test_loss:.4f}")
    # Every rank is done with the store (hosted by rank 0) before any leaves. Then exit
    # at once: in torch 1.13, tearing down the gloo group after a peer has left can hang.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
