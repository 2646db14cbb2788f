"""Runs a model written by `opreg quantize` in onnxruntime on a batch and prints, as one JSON
line, the logits and the top-1 accuracy against the labels (tests/quantize.rs compares them
with opreg's own run of the same model).

The run opreg is compared with is onnxruntime's evaluation of the graph as written (graph
optimisations off: each DequantizeLinear -> float op -> QuantizeLinear as the ONNX spec defines
it). onnxruntime's optimised run fuses QDQ groups into its integer kernels, whose u8 x s8
products on AVX2/AVX-512 (VPMADDUBSW) saturate the 16-bit pair sums - a limitation its own
quantization docs describe (reduce_range or u8u8 avoid it) - so it can differ from the
spec by a point of accuracy; its accuracy is printed as `optimized_accuracy` for reference.

usage: quant_ort.py MODEL.onnx BATCH.npy LABELS.npy
"""
import json
import sys

import numpy as np
import onnxruntime as ort


def main():
    model, batch, labels = sys.argv[1:4]
    x = np.load(batch)
    y = np.load(labels)

    def run(level):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.graph_optimization_level = level
        opts.log_severity_level = 3
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        out = sess.run(None, {name: x})[0]
        return out, float((out.argmax(axis=1) == y).mean())

    logits, accuracy = run(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    _, optimized = run(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    print(json.dumps({
        "accuracy": accuracy,
        "optimized_accuracy": optimized,
        "logits": [float(v) for v in logits.reshape(-1)],
        "ops": sorted({n.op_type for n in __import__("onnx").load(model).graph.node}),
    }))


if __name__ == "__main__":
    main()
