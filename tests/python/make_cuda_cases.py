"""Small ONNX models, one per CUDA kernel and attribute variant, plus a mini CNN and a mini
transformer block: `tests/cuda.rs` serves each on ["cuda", "cpu"] and on ["cpu"] and compares.

Every graph input is f32 (indices, shapes and scales are initializers), so the test can feed
any model the same way. A case named `decline_<...>` has as its first node one the CUDA plugin
must decline (placement then puts it on the CPU).

    python make_cuda_cases.py OUT_DIR
"""

import json
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(7)
OUT = sys.argv[1] if len(sys.argv) > 1 else "cuda-cases"


def save(name, nodes, inputs, outputs, inits=(), opset=17, extra_opsets=()):
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits],
    )
    imports = [helper.make_opsetid("", opset)] + [
        helper.make_opsetid(d, v) for d, v in extra_opsets
    ]
    m = helper.make_model(graph, opset_imports=imports)
    m.ir_version = 8
    # Outputs are declared without shapes (the checker insists on one): not checked here.
    onnx.save(m, os.path.join(OUT, name + ".onnx"))


def f32(*shape, lo=-1.0, hi=1.0):
    return RNG.uniform(lo, hi, shape).astype(np.float32)


def unary(name, op, opset=17, shape=(2, 3, 4, 5), **attrs):
    save(name, [helper.make_node(op, ["x"], ["y"], **attrs)], [("x", shape)], ["y"], opset=opset)


def binary(name, op, a, b, opset=17):
    save(name, [helper.make_node(op, ["a", "b"], ["y"])], [("a", a), ("b", b)], ["y"], opset=opset)


def main():
    os.makedirs(OUT, exist_ok=True)
    # Unary functions.
    for op in ["Relu", "Sigmoid", "Tanh", "Exp", "Log", "Neg", "Abs", "Sqrt", "Erf", "HardSwish",
               "Reciprocal", "Floor", "Ceil", "Softplus", "Sin", "Cos", "Identity"]:
        unary("unary_" + op.lower(), op)
    unary("unary_leakyrelu", "LeakyRelu", alpha=0.1)
    unary("unary_hardsigmoid", "HardSigmoid", alpha=0.3, beta=0.4)
    unary("unary_elu", "Elu", alpha=0.7)
    unary("unary_gelu", "Gelu", opset=20)
    unary("unary_clip6", "Clip", opset=10, min=-0.25, max=0.5)
    save("unary_clip11", [helper.make_node("Clip", ["x", "lo", "hi"], ["y"])], [("x", (2, 3, 4, 5))],
         ["y"], [("lo", np.float32(-0.3)), ("hi", np.float32(0.6))])
    save("unary_clip_inverted", [helper.make_node("Clip", ["x", "lo", "hi"], ["y"])], [("x", (3, 4))],
         ["y"], [("lo", np.float32(0.6)), ("hi", np.float32(-0.3))])
    # Binary operators with broadcasting.
    binary("binary_add", "Add", (2, 3, 4, 5), (4, 1))
    binary("binary_sub", "Sub", (2, 3, 4, 5), ())
    binary("binary_mul", "Mul", (2, 3, 4, 5), (3, 1, 1))
    binary("binary_div", "Div", (2, 1, 4, 5), (3, 1, 5))
    binary("binary_max", "Max", (3, 4), (3, 4))
    binary("binary_min", "Min", (1, 6), (5, 1))
    binary("binary_prelu", "PRelu", (2, 3, 4, 5), (3, 1, 1))
    save("binary_pow", [helper.make_node("Abs", ["a"], ["p"]), helper.make_node("Pow", ["p", "b"], ["y"])],
         [("a", (4, 5)), ("b", (5,))], ["y"])
    # Products.
    binary("matmul_batched", "MatMul", (2, 3, 8, 16), (2, 3, 16, 8))
    binary("matmul_shared_b", "MatMul", (2, 5, 16), (16, 7))
    binary("matmul_shared_a", "MatMul", (5, 16), (3, 16, 7))
    binary("matmul_vector", "MatMul", (16,), (16, 8))
    save("matmul_constant_b", [helper.make_node("MatMul", ["a", "w"], ["y"])], [("a", (4, 32))], ["y"],
         [("w", f32(32, 24))])
    save("gemm_all", [helper.make_node("Gemm", ["a", "w", "c"], ["y"], alpha=0.5, beta=2.0, transB=1)],
         [("a", (6, 32))], ["y"], [("w", f32(24, 32)), ("c", f32(24))])
    save("gemm_trans_a", [helper.make_node("Gemm", ["a", "w"], ["y"], transA=1)], [("a", (32, 6))], ["y"],
         [("w", f32(32, 24))])
    # Convolutions (Conv + Relu and Conv + Add + Relu become FusedConv through the passes).
    def conv(cin, cout, k, x_shape, relu=False, residual=False, **attrs):
        """Conv (+ Add of an input z shaped as x: the pads keep the extents) (+ Relu)."""
        group = attrs.get("group", 1)
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], **attrs)]
        last = "c"
        inputs = [("x", x_shape)]
        if residual:
            nodes.append(helper.make_node("Add", [last, "z"], ["s"]))
            last = "s"
            inputs.append(("z", x_shape))
        if relu:
            nodes.append(helper.make_node("Relu", [last], ["r"]))
            last = "r"
        nodes.append(helper.make_node("Identity", [last], ["y"]))
        w = f32(cout, cin // group, *k)
        return nodes, inputs, [("w", w), ("b", f32(cout))]

    for name, cin, cout, k, xs, extra, attrs in [
        ("conv_3x3", 4, 8, (3, 3), (2, 4, 9, 10), {}, dict(pads=[1, 1, 1, 1])),
        ("conv_relu_stride2_groups", 4, 8, (3, 3), (1, 4, 11, 11), dict(relu=True), dict(strides=[2, 2], group=2, pads=[1, 0, 1, 0])),
        ("conv_depthwise", 8, 8, (3, 3), (2, 8, 10, 10), dict(relu=True), dict(group=8, pads=[1, 1, 1, 1])),
        ("conv_1x1", 16, 8, (1, 1), (2, 16, 7, 7), {}, {}),
        ("conv_dilated", 3, 4, (3, 3), (1, 3, 12, 12), {}, dict(dilations=[2, 2])),
        ("conv_same_upper", 3, 4, (3, 3), (1, 3, 9, 9), {}, dict(auto_pad="SAME_UPPER", strides=[2, 2])),
        ("conv_1d", 4, 6, (5,), (2, 4, 20), {}, dict(pads=[2, 2])),
    ]:
        nodes, inputs, inits = conv(cin, cout, k, xs, **extra, **attrs)
        save(name, nodes, inputs, ["y"], inits)
    nodes, inputs, inits = conv(8, 8, (3, 3), (2, 8, 6, 6), relu=True, residual=True, pads=[1, 1, 1, 1])
    save("conv_residual_relu", nodes, inputs, ["y"], inits)
    # Pooling and normalization.
    unary("pool_max", "MaxPool", shape=(2, 3, 9, 9), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    unary("pool_max_ceil", "MaxPool", shape=(1, 2, 10, 10), kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    unary("pool_avg", "AveragePool", shape=(2, 3, 8, 8), kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    unary("pool_avg_pads", "AveragePool", shape=(2, 3, 8, 8), kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)
    unary("pool_global_avg", "GlobalAveragePool", shape=(2, 16, 7, 7))
    save("batchnorm", [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3)],
         [("x", (2, 6, 5, 5))], ["y"],
         [("s", f32(6)), ("b", f32(6)), ("m", f32(6)), ("v", f32(6, lo=0.5, hi=2.0))], opset=15)
    unary("softmax_last", "Softmax", shape=(4, 37), axis=-1, opset=13)
    unary("softmax_middle", "Softmax", shape=(2, 5, 4), axis=1, opset=13)
    unary("softmax_flat_v11", "Softmax", shape=(2, 3, 4), axis=1, opset=11)
    unary("logsoftmax", "LogSoftmax", shape=(3, 300), axis=-1, opset=13)
    save("layernorm", [helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], epsilon=1e-5)],
         [("x", (2, 7, 48))], ["y"], [("s", f32(48)), ("b", f32(48))])
    save("layernorm_two_axes", [helper.make_node("LayerNormalization", ["x", "s"], ["y"], axis=-2)],
         [("x", (3, 5, 6))], ["y"], [("s", f32(5, 6))])
    # Data movement.
    save("reshape", [helper.make_node("Reshape", ["x", "s"], ["y"])], [("x", (2, 3, 4))], ["y"],
         [("s", np.array([0, -1], np.int64))])
    unary("flatten", "Flatten", shape=(2, 3, 4, 5), axis=2)
    save("squeeze", [helper.make_node("Squeeze", ["x", "a"], ["y"])], [("x", (2, 1, 4))], ["y"],
         [("a", np.array([1], np.int64))])
    save("unsqueeze", [helper.make_node("Unsqueeze", ["x", "a"], ["y"])], [("x", (2, 4))], ["y"],
         [("a", np.array([0, 3], np.int64))])
    unary("transpose_nhwc", "Transpose", shape=(2, 3, 4, 5), perm=[0, 2, 3, 1])
    unary("transpose_default", "Transpose", shape=(3, 4, 5))
    save("concat", [helper.make_node("Concat", ["a", "b", "c"], ["y"], axis=1)],
         [("a", (2, 3, 4)), ("b", (2, 1, 4)), ("c", (2, 5, 4))], ["y"])
    save("gather_rows", [helper.make_node("Gather", ["x", "i"], ["y"])], [("x", (10, 8))], ["y"],
         [("i", np.array([[0, 2], [9, -1]], np.int64))])
    save("gather_axis1", [helper.make_node("Gather", ["x", "i"], ["y"], axis=1)], [("x", (3, 6, 2))], ["y"],
         [("i", np.array([5, 0, 3], np.int64))])
    # Resize: trilinear first (the product's origin asked for it).
    def resize(name, shape, scales=None, sizes=None, opset=19, **attrs):
        inits = [("roi", np.zeros(0, np.float32))]
        names = ["x", "roi"]
        if scales is not None:
            inits.append(("scales", np.array(scales, np.float32)))
            names.append("scales")
        else:
            inits.append(("scales", np.zeros(0, np.float32)))
            inits.append(("sizes", np.array(sizes, np.int64)))
            names += ["scales", "sizes"]
        save(name, [helper.make_node("Resize", names, ["y"], **attrs)], [("x", shape)], ["y"], inits, opset=opset)

    resize("resize_trilinear", (1, 2, 4, 5, 6), scales=[1, 1, 2, 1.5, 2], mode="linear")
    resize("resize_trilinear_align", (2, 1, 3, 4, 5), sizes=[2, 1, 5, 7, 9], mode="linear",
           coordinate_transformation_mode="align_corners")
    resize("resize_bilinear_pytorch", (1, 3, 6, 8), scales=[1, 1, 0.5, 2.5], mode="linear",
           coordinate_transformation_mode="pytorch_half_pixel")
    resize("resize_nearest_floor", (1, 2, 5, 5), scales=[1, 1, 2, 3], mode="nearest",
           coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    resize("resize_nearest_ceil", (1, 2, 6, 6), sizes=[1, 2, 9, 4], mode="nearest", nearest_mode="round_prefer_ceil")
    resize("resize_linear_1d", (2, 8, 9), scales=[1, 1, 2.5], mode="linear",
           coordinate_transformation_mode="asymmetric")
    resize("resize_cubic", (1, 1, 6, 7), scales=[1, 1, 1.5, 2], mode="cubic", exclude_outside=1)
    resize("resize_cubic_asymmetric", (2, 8, 9), scales=[1, 1, 2], mode="cubic",
           coordinate_transformation_mode="asymmetric", cubic_coeff_a=-0.5)
    # Nodes the plugin declines: they run on the CPU.
    resize("decline_resize_antialias", (1, 1, 8, 8), scales=[1, 1, 0.5, 0.5], mode="linear", antialias=1)
    nodes, inputs, inits = conv(2, 3, (3, 3, 3), (1, 2, 5, 5, 5))
    save("decline_conv3d", nodes, inputs, ["y"], inits)
    unary("decline_avgpool_same_pads", "AveragePool", shape=(1, 2, 6, 6), kernel_shape=[3, 3], strides=[2, 2],
          auto_pad="SAME_UPPER", count_include_pad=1)
    save("decline_maxpool_indices", [helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 2])],
         [("x", (1, 2, 4, 4))], ["y"])

    mini_cnn()
    mini_transformer()
    print(json.dumps({"cases": len([f for f in os.listdir(OUT) if f.endswith(".onnx")])}))


def mini_cnn():
    """Conv-BN-ReLU, MaxPool, a residual 1x1 block, GAP, Flatten, Gemm: a ResNet in little."""
    n = []
    inits = []

    def conv_bn_relu(x, y, cin, cout, k, pad, relu=True, stride=1):
        w, b = f"{y}_w", f"{y}_b"
        inits.extend([(w, f32(cout, cin, k, k, lo=-0.5, hi=0.5)), (b, f32(cout))])
        n.append(helper.make_node("Conv", [x, w, b], [y + "_c"], pads=[pad] * 4, strides=[stride] * 2))
        inits.extend([(f"{y}_s", f32(cout, lo=0.5, hi=1.5)), (f"{y}_bb", f32(cout)), (f"{y}_m", f32(cout)),
                      (f"{y}_v", f32(cout, lo=0.5, hi=1.5))])
        n.append(helper.make_node("BatchNormalization", [y + "_c", f"{y}_s", f"{y}_bb", f"{y}_m", f"{y}_v"],
                                  [y + ("_bn" if relu else "")]))
        if relu:
            n.append(helper.make_node("Relu", [y + "_bn"], [y]))

    conv_bn_relu("x", "stem", 3, 16, 3, 1, stride=2)
    n.append(helper.make_node("MaxPool", ["stem"], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    conv_bn_relu("pool", "b1", 16, 16, 3, 1)
    conv_bn_relu("b1", "b2", 16, 16, 1, 0, relu=False)
    n.append(helper.make_node("Add", ["b2", "pool"], ["sum"]))
    n.append(helper.make_node("Relu", ["sum"], ["act"]))
    n.append(helper.make_node("GlobalAveragePool", ["act"], ["gap"]))
    n.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    inits.extend([("fc_w", f32(10, 16)), ("fc_b", f32(10))])
    n.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1))
    n.append(helper.make_node("Softmax", ["logits"], ["y"], axis=-1))
    save("model_mini_cnn", n, [("x", (2, 3, 32, 32))], ["y"], inits, opset=13)


def mini_transformer(seq=16, d=32, heads=4):
    """One BERT-style encoder layer as exporters write it: dense layers as MatMul + Add, heads
    by Reshape/Transpose, masked-free attention, erf-GELU spelled out, LayerNormalization."""
    n = []
    inits = []
    dh = d // heads

    def dense(x, y, fin, fout):
        inits.extend([(y + "_w", f32(fin, fout, lo=-0.3, hi=0.3)), (y + "_b", f32(fout))])
        n.append(helper.make_node("MatMul", [x, y + "_w"], [y + "_mm"]))
        n.append(helper.make_node("Add", [y + "_mm", y + "_b"], [y]))

    inits.extend([("heads_shape", np.array([0, 0, heads, dh], np.int64)), ("merge_shape", np.array([0, 0, d], np.int64)),
                  ("scale", np.float32(np.sqrt(dh))), ("sqrt2", np.float32(np.sqrt(2.0))), ("one", np.float32(1.0)),
                  ("half", np.float32(0.5)), ("ln1_s", f32(d)), ("ln1_b", f32(d)), ("ln2_s", f32(d)), ("ln2_b", f32(d))])
    for p in "qkv":
        dense("x", p, d, d)
        n.append(helper.make_node("Reshape", [p, "heads_shape"], [p + "_h"]))
    n.append(helper.make_node("Transpose", ["q_h"], ["q_t"], perm=[0, 2, 1, 3]))
    n.append(helper.make_node("Transpose", ["k_h"], ["k_t"], perm=[0, 2, 3, 1]))
    n.append(helper.make_node("Transpose", ["v_h"], ["v_t"], perm=[0, 2, 1, 3]))
    n.append(helper.make_node("MatMul", ["q_t", "k_t"], ["scores"]))
    n.append(helper.make_node("Div", ["scores", "scale"], ["scaled"]))
    n.append(helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1))
    n.append(helper.make_node("MatMul", ["probs", "v_t"], ["ctx"]))
    n.append(helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]))
    n.append(helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["merged"]))
    dense("merged", "o", d, d)
    n.append(helper.make_node("Add", ["o", "x"], ["res1"]))
    n.append(helper.make_node("LayerNormalization", ["res1", "ln1_s", "ln1_b"], ["ln1"], axis=-1))
    dense("ln1", "up", d, 4 * d)
    n.append(helper.make_node("Div", ["up", "sqrt2"], ["g_div"]))
    n.append(helper.make_node("Erf", ["g_div"], ["g_erf"]))
    n.append(helper.make_node("Add", ["g_erf", "one"], ["g_add"]))
    n.append(helper.make_node("Mul", ["up", "g_add"], ["g_mul"]))
    n.append(helper.make_node("Mul", ["g_mul", "half"], ["gelu"]))
    dense("gelu", "down", 4 * d, d)
    n.append(helper.make_node("Add", ["down", "ln1"], ["res2"]))
    n.append(helper.make_node("LayerNormalization", ["res2", "ln2_s", "ln2_b"], ["y"], axis=-1))
    save("model_mini_transformer", n, [("x", (2, seq, d))], ["y"], inits)


if __name__ == "__main__":
    main()
