"""ONNX Runtime driven like the daemon in the batching benchmark: CLIENTS threads each calling
one shared session back-to-back with batch-1 inputs for SECONDS; prints throughput and
latency percentiles as one JSON object.

usage: python bench_ort_concurrent.py MODEL.onnx CLIENTS SECONDS THREADS
"""
import json
import sys
import threading
import time

import numpy as np
import onnxruntime as ort

path, clients, seconds, threads = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
so = ort.SessionOptions()
so.intra_op_num_threads = threads
so.inter_op_num_threads = 1
sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
inp = sess.get_inputs()[0]
shape = [1 if not isinstance(d, int) else d for d in inp.shape]
x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
sess.run(None, {inp.name: x})  # warm-up

latencies = []
lock = threading.Lock()
stop = time.perf_counter() + seconds


def client():
    mine = []
    while time.perf_counter() < stop:
        t = time.perf_counter()
        sess.run(None, {inp.name: x})
        mine.append(time.perf_counter() - t)
    with lock:
        latencies.extend(mine)


ts = [threading.Thread(target=client) for _ in range(clients)]
start = time.perf_counter()
for t in ts:
    t.start()
for t in ts:
    t.join()
elapsed = time.perf_counter() - start
lat = np.array(latencies)
print(json.dumps({
    "throughput": len(lat) / elapsed,
    "p50_ms": float(np.percentile(lat, 50) * 1e3),
    "p99_ms": float(np.percentile(lat, 99) * 1e3),
}))
