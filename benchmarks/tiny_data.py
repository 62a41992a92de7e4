#!/usr/bin/python3
"""Writes a tiny MNIST-format data set into DIR, for the benchmark driver's own test:
TRAIN training and TEST test images (default 2000 and 500) of 28x28, class k a bright bar
in row band k over noise, plain IDX files. A noise level near the bars' brightness makes
the classes overlap, so accuracy climbs over a few seconds instead of jumping to 100 %.

    benchmarks/tiny_data.py DIR [TRAIN TEST]
"""
import os
import random
import struct
import sys


def write(directory, stem, n, seed):
    rng = random.Random(seed)
    images = bytearray(struct.pack(">IIII", 2051, n, 28, 28))
    labels = bytearray(struct.pack(">II", 2049, n))
    for i in range(n):
        k = rng.randrange(10)
        labels.append(k)
        for r in range(28):
            bar = 2 + 2 * k <= r < 4 + 2 * k
            images.extend(min(255, (110 if bar else 0) + rng.randrange(150)) for _ in range(28))
    with open(os.path.join(directory, f"{stem}-images-idx3-ubyte"), "wb") as f:
        f.write(images)
    with open(os.path.join(directory, f"{stem}-labels-idx1-ubyte"), "wb") as f:
        f.write(labels)


def main():
    if len(sys.argv) not in (2, 4):
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    directory = sys.argv[1]
    train, test = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) == 4 else (2000, 500)
    os.makedirs(directory, exist_ok=True)
    write(directory, "train", train, 1)
    write(directory, "t10k", test, 2)


if __name__ == "__main__":
    main()
