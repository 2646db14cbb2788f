"""Runs a model written by `opreg quantize` in onnxruntime on a batch and prints, as one JSON
line, the logits and the top-1 accuracy against the labels (tests/quantize.rs compares them
with opreg's own run of the same model).

usage: quant_ort.py MODEL.onnx BATCH.npy LABELS.npy
"""
import json
import sys

import numpy as np
import onnxruntime as ort


def main():
    model, batch, labels = sys.argv[1:4]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    x = np.load(batch)
    y = np.load(labels)
    name = sess.get_inputs()[0].name
    logits = sess.run(None, {name: x})[0]
    accuracy = float((logits.argmax(axis=1) == y).mean())
    print(json.dumps({
        "accuracy": accuracy,
        "logits": [float(v) for v in logits.reshape(-1)],
        "ops": sorted({n.op_type for n in __import__("onnx").load(model).graph.node}),
    }))


if __name__ == "__main__":
    main()
