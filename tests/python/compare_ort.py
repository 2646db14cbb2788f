"""Runs two ONNX models on the same random input in onnxruntime and prints, as one JSON line,
the largest absolute difference between their first outputs and each model's node count.

Usage: compare_ort.py A.onnx B.onnx"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort


def run(path, feeds):
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)[0]


a, b = sys.argv[1], sys.argv[2]
model = onnx.load(a)
rng = np.random.default_rng(0)
feeds = {}
for i in ort.InferenceSession(a, providers=["CPUExecutionProvider"]).get_inputs():
    shape = [d if isinstance(d, int) else 1 for d in i.shape]
    if i.type == "tensor(int64)":
        feeds[i.name] = np.ones(shape, np.int64)
    else:
        feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
ya, yb = run(a, feeds), run(b, feeds)
print(json.dumps({
    "max_abs_diff": float(np.max(np.abs(ya - yb))),
    "scale": float(np.max(np.abs(ya))),
    "nodes_a": len(model.graph.node),
    "nodes_b": len(onnx.load(b).graph.node),
}))
