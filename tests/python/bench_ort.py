"""Benchmark peer: builds the benchmark models, runs them in onnxruntime, and writes what the
opreg side needs to run the same thing.

usage: python bench_ort.py DIR THREADS [REAL_MODELS_DIR]
writes DIR/<model>.onnx, DIR/<model>.input (raw f32), DIR/<model>.output (raw f32) and prints
one JSON line: {model: {"ort_ms": median, "shape": [...], "path": model file}}. With
REAL_MODELS_DIR (tests/python/make_models.py's output), ResNet-50, MobileNetV2 and ResNet-50
quantized to QDQ from there are run too, at batch 1. With OPREG_BENCH_LAYERS=1, single
Conv + Relu layers at the shapes that dominate those models are added.
"""
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

out_dir, threads = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)


def init(name, *shape):
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)


def save(name, nodes, inputs, outputs, inits, x):
    g = helper.make_graph(nodes, name, inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path = os.path.join(out_dir, name + ".onnx")
    with open(path, "wb") as f:
        f.write(m.SerializeToString())
    x.astype(np.float32).tofile(os.path.join(out_dir, name + ".input"))
    return path


models = {}
# MLP: 784-512-512-10, batch 64.
x = rng.standard_normal((64, 784)).astype(np.float32)
models["mlp"] = (save(
    "mlp",
    [
        helper.make_node("MatMul", ["x", "w1"], ["a1"]), helper.make_node("Add", ["a1", "b1"], ["a2"]), helper.make_node("Relu", ["a2"], ["a3"]),
        helper.make_node("MatMul", ["a3", "w2"], ["a4"]), helper.make_node("Add", ["a4", "b2"], ["a5"]), helper.make_node("Relu", ["a5"], ["a6"]),
        helper.make_node("MatMul", ["a6", "w3"], ["a7"]), helper.make_node("Add", ["a7", "b3"], ["y"]),
    ],
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 784])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 10])],
    [init("w1", 784, 512), init("b1", 512), init("w2", 512, 512), init("b2", 512), init("w3", 512, 10), init("b3", 10)],
    x,
), x)
# CNN: 3x64x64 -> conv16 -> relu -> pool -> conv32 -> relu -> pool -> conv64 -> relu -> gap -> gemm10, batch 8.
x = rng.standard_normal((8, 3, 64, 64)).astype(np.float32)
conv = lambda i, o, w, b: helper.make_node("Conv", [i, w, b], [o], pads=[1, 1, 1, 1], kernel_shape=[3, 3])
models["cnn"] = (save(
    "cnn",
    [
        conv("x", "c1", "w1", "b1"), helper.make_node("Relu", ["c1"], ["r1"]), helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        conv("p1", "c2", "w2", "b2"), helper.make_node("Relu", ["c2"], ["r2"]), helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        conv("p2", "c3", "w3", "b3"), helper.make_node("Relu", ["c3"], ["r3"]), helper.make_node("GlobalAveragePool", ["r3"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1),
    ],
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 3, 64, 64])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 10])],
    [init("w1", 16, 3, 3, 3), init("b1", 16), init("w2", 32, 16, 3, 3), init("b2", 32), init("w3", 64, 32, 3, 3), init("b3", 64), init("wf", 10, 64), init("bf", 10)],
    x,
), x)

if len(sys.argv) > 3:
    for real in ["resnet50", "mobilenetv2", "efficientnet_b0", "resnet50_qdq", "mobilenetv2_qdq"]:
        path = os.path.join(sys.argv[3], real + ".onnx")
        if os.path.exists(path):
            x = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
            x.tofile(os.path.join(out_dir, real + ".input"))
            models[real] = (path, x)

# OPREG_BENCH_LAYERS=1: single Conv + Relu layers at the shapes that dominate ResNet-50 and
# MobileNetV2 (batch 1), to see per layer where a model's ratio comes from.
if os.environ.get("OPREG_BENCH_LAYERS"):
    layers = [
        # name: (in channels, out channels, size, kernel, stride, group)
        ("l_3x3_64_56", 64, 64, 56, 3, 1, 1),
        ("l_3x3_128_28", 128, 128, 28, 3, 1, 1),
        ("l_3x3_256_14", 256, 256, 14, 3, 1, 1),
        ("l_3x3_512_7", 512, 512, 7, 3, 1, 1),
        ("l_3x3s2_128_56", 128, 128, 56, 3, 2, 1),
        ("l_1x1_64_256_56", 64, 256, 56, 1, 1, 1),
        ("l_1x1_256_64_56", 256, 64, 56, 1, 1, 1),
        ("l_1x1_1024_256_14", 1024, 256, 14, 1, 1, 1),
        ("l_1x1s2_512_1024_28", 512, 1024, 28, 1, 2, 1),
        ("l_7x7s2_3_64_224", 3, 64, 224, 7, 2, 1),
        ("l_dw3x3_144_56", 144, 144, 56, 3, 1, 144),
        ("l_dw3x3s2_96_112", 96, 96, 112, 3, 2, 96),
        ("l_1x1_32_192_56", 32, 192, 56, 1, 1, 1),
    ]
    for name, ci, co, size, k, s, g in layers:
        x = rng.standard_normal((1, ci, size, size)).astype(np.float32)
        pad = k // 2
        out = (size + 2 * pad - k) // s + 1
        models[name] = (save(
            name,
            [
                helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[pad] * 4, kernel_shape=[k, k], strides=[s, s], group=g),
                helper.make_node("Relu", ["c"], ["y"]),
            ],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ci, size, size])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, co, out, out])],
            [init("w", co, ci // g, k, k), init("b", co)],
            x,
        ), x)

result = {}
opts = ort.SessionOptions()
opts.intra_op_num_threads = threads
opts.inter_op_num_threads = 1
for name, (path, x) in models.items():
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    if name.endswith("_qdq"):
        # The reference for a QDQ graph is its evaluation as written: onnxruntime's optimised
        # session fuses it into u8 x s8 kernels whose 16-bit pair sums saturate (VPMADDUBSW),
        # which moves MobileNetV2's logits by ~12 % of the largest; opreg computes the graph
        # exactly. The timing below is the optimised session's.
        plain = ort.SessionOptions()
        plain.intra_op_num_threads = threads
        plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        ref = ort.InferenceSession(path, plain, providers=["CPUExecutionProvider"])
        y = ref.run(None, {"x": x})[0]
    y.astype(np.float32).tofile(os.path.join(out_dir, name + ".output"))
    times = []
    start = time.perf_counter()
    while len(times) < 20 or (time.perf_counter() - start < 2.0 and len(times) < 2000):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t)
    result[name] = {"ort_ms": float(np.median(times) * 1e3), "shape": list(x.shape), "path": path}
print(json.dumps(result))
