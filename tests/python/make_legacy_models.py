"""Models written at legacy opsets (1-6), as older converters emitted them, with inputs and
expected outputs. onnxruntime refuses these opsets and ONNX's own version converter fails on
legacy broadcasts whose shapes it cannot infer, so each model comes with its modern twin
written by hand (opset 13, the same computation in today's operators); the expected outputs
are the ONNX reference evaluator's on the twin.

Usage: make_legacy_models.py OUT_DIR  ->  OUT_DIR/<name>/{model.onnx,input_*.npy,output_*.npy}
"""

import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

rng = np.random.default_rng(7)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def legacy(nodes, name, inputs, outputs, inits, opset):
    # IR 3, as converters of that time wrote: initializers are listed as graph inputs too.
    g = helper.make_graph(nodes, name, inputs, outputs, inits)
    for t in inits:
        g.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 3
    return m


def modern(nodes, inputs, outputs, inits):
    g = helper.make_graph(nodes, "twin", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def cnn_opset6():
    """Conv without bias, then the bias as a legacy broadcast Add (axis=1), BatchNorm with
    is_test, Relu, Flatten, Gemm with broadcast=1, Dropout with is_test, Softmax."""
    c = 4
    w, b = f32(c, 3, 3, 3), f32(c)
    s, bb, m, v = np.abs(f32(c)) + 0.5, f32(c), f32(c) * 0.1, np.abs(f32(c)) + 0.5
    gw, gb = f32(5, c * 6 * 6), f32(5)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])
    conv = helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    tail = [
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
    ]
    old = legacy(
        [conv, helper.make_node("Add", ["c", "b"], ["cb"], broadcast=1, axis=1),
         helper.make_node("BatchNormalization", ["cb", "s", "bb", "m", "v"], ["bn"],
                          is_test=1, epsilon=1e-5),
         *tail,
         helper.make_node("Gemm", ["f", "gw", "gb"], ["g"], broadcast=1, transB=1),
         helper.make_node("Dropout", ["g"], ["d"], is_test=1),
         helper.make_node("Softmax", ["d"], ["y"])],
        "cnn_opset6", [x], [y],
        [init("w", w), init("b", b), init("s", s), init("bb", bb), init("m", m),
         init("v", v), init("gw", gw), init("gb", gb)],
        6,
    )
    new = modern(
        [conv, helper.make_node("Add", ["c", "b3"], ["cb"]),
         helper.make_node("BatchNormalization", ["cb", "s", "bb", "m", "v"], ["bn"],
                          epsilon=1e-5),
         *tail,
         helper.make_node("Gemm", ["f", "gw", "gb"], ["g"], transB=1),
         helper.make_node("Softmax", ["g"], ["y"], axis=1)],
        [x], [y],
        [init("w", w), init("b3", b.reshape(c, 1, 1)), init("s", s), init("bb", bb),
         init("m", m), init("v", v), init("gw", gw), init("gb", gb)],
    )
    return old, new, {"x": f32(2, 3, 6, 6)}


def ops_opset1():
    """Opset-1 forms: consumed_inputs, Reshape's shape attribute, Concat without axis, Cast to
    a named type, Mul broadcasting a suffix, Sum."""
    k = f32(4)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 4])
    y = helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2, 6, 4])
    old = legacy(
        [helper.make_node("Relu", ["x"], ["r"], consumed_inputs=[0]),
         helper.make_node("Reshape", ["r"], ["rs"], shape=[2, 3, 4]),
         helper.make_node("Concat", ["rs", "rs"], ["cat"]),
         helper.make_node("Mul", ["cat", "k"], ["m"], broadcast=1),
         helper.make_node("Sum", ["m", "cat"], ["s"]),
         helper.make_node("Cast", ["s"], ["y"], to="DOUBLE")],
        "ops_opset1", [x], [y], [init("k", k)], 1,
    )
    new = modern(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("Reshape", ["r", "shape"], ["rs"]),
         helper.make_node("Concat", ["rs", "rs"], ["cat"], axis=1),
         helper.make_node("Mul", ["cat", "k"], ["m"]),
         helper.make_node("Sum", ["m", "cat"], ["s"]),
         helper.make_node("Cast", ["s"], ["y"], to=TensorProto.DOUBLE)],
        [x], [y], [init("k", k), init("shape", np.array([2, 3, 4], np.int64))],
    )
    return old, new, {"x": f32(6, 4)}


def broadcast_axis_runtime():
    """A legacy broadcast whose second operand is computed (not a constant), aligned at
    axis 0 of a rank-3 first operand."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2, 4])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [3, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2, 4])
    old = legacy(
        [helper.make_node("Abs", ["v"], ["va"]),
         helper.make_node("Sub", ["x", "va"], ["y"], broadcast=1, axis=0)],
        "broadcast_axis_runtime", [x, v], [y], [], 6,
    )
    new = modern(
        [helper.make_node("Abs", ["v"], ["va"]),
         helper.make_node("Unsqueeze", ["va", "ax"], ["vu"]),
         helper.make_node("Sub", ["x", "vu"], ["y"])],
        [x, v], [y], [init("ax", np.array([2], np.int64))],
    )
    return old, new, {"x": f32(3, 2, 4), "v": f32(3, 2)}


def main():
    out = sys.argv[1]
    for make in (cnn_opset6, ops_opset1, broadcast_axis_runtime):
        old, new, feeds = make()
        d = os.path.join(out, old.graph.name)
        os.makedirs(d, exist_ok=True)
        onnx.save(old, os.path.join(d, "model.onnx"))
        for i, (name, v) in enumerate(feeds.items()):
            np.save(os.path.join(d, f"input_{i}_{name}.npy"), v)
        for i, v in enumerate(ReferenceEvaluator(new).run(None, feeds)):
            np.save(os.path.join(d, f"output_{i}.npy"), v)
        print(old.graph.name)


if __name__ == "__main__":
    main()
