"""Benchmark peer for one real model: onnxruntime in this process, as `opreg bench` runs opreg.

usage: python bench_ort_model.py MODEL.onnx BATCH THREADS [NAME:D1xD2x... ...]
Inputs are made like `opreg bench` makes them: a symbolic first dimension is BATCH, whole
shapes may be given; floats uniform in [-1, 1), integers zero. 5 warm-up runs, then at least
30 runs and until 2 s have passed. Prints one JSON line: median_ms, p90_ms, min_ms, runs and
peak_rss_bytes (the whole process: interpreter, numpy and onnxruntime included, as opreg's
figure includes its plugins).
"""
import json
import math
import sys
import time

import numpy as np
import onnxruntime as ort

path, batch, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
given = {}
for spec in sys.argv[4:]:
    name, dims = spec.rsplit(":", 1)
    given[name] = [int(d) for d in dims.split("x") if d]

opts = ort.SessionOptions()
opts.intra_op_num_threads = threads
opts.inter_op_num_threads = 1
sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
types = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
         "tensor(double)": np.float64, "tensor(bool)": np.bool_}
feeds = {}
for i in sess.get_inputs():
    if i.name in given:
        shape = given[i.name]
    else:
        shape = []
        for k, d in enumerate(i.shape):
            if isinstance(d, int) and d >= 0:
                shape.append(d)
            elif k == 0:
                shape.append(batch)
            else:
                sys.exit(f"input {i.name} has a symbolic dimension {k} past the first: give its shape")
    dtype = types[i.type]
    if np.issubdtype(dtype, np.floating):
        feeds[i.name] = rng.uniform(-1, 1, shape).astype(dtype)
    else:
        feeds[i.name] = np.zeros(shape, dtype)

for _ in range(5):
    sess.run(None, feeds)
times = []
start = time.perf_counter()
while len(times) < 30 or (time.perf_counter() - start < 2.0 and len(times) < 10000):
    t = time.perf_counter()
    sess.run(None, feeds)
    times.append((time.perf_counter() - t) * 1e3)
times.sort()


def quantile(q):
    # Nearest rank, as opreg bench computes it.
    return times[min(max(math.ceil(q * len(times)), 1), len(times)) - 1]


def peak_rss():
    # VmHWM, as opreg bench reads it: getrusage's ru_maxrss would include the parent's peak
    # (Linux carries it across fork and exec).
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


print(json.dumps({
    "median_ms": quantile(0.5),
    "p90_ms": quantile(0.9),
    "min_ms": times[0],
    "runs": len(times),
    "peak_rss_bytes": peak_rss(),
}))
