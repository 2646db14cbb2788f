"""Writes the demo model served by scripts/serve: demo/1/model.onnx, a small classifier
x[N,4] -> MatMul+Add -> Relu -> MatMul+Add -> Softmax -> probs[N,3], with fixed weights.

usage: python make_demo.py   (needs `pip install onnx numpy`)
"""
import os

import numpy as np
from onnx import TensorProto, checker, helper, numpy_helper, save

rng = np.random.default_rng(2026)
w1 = rng.standard_normal((4, 16)).astype(np.float32)
b1 = rng.standard_normal((16,)).astype(np.float32) * 0.1
w2 = rng.standard_normal((16, 3)).astype(np.float32)
b2 = rng.standard_normal((3,)).astype(np.float32) * 0.1
graph = helper.make_graph(
    [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="fc2"),
        helper.make_node("Add", ["h3", "b2"], ["logits"], name="fc2_bias"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ],
    "demo",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
    [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])],
    [numpy_helper.from_array(v, n) for n, v in [("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)]],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="opreg-demo", ir_version=9)
checker.check_model(model)
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo", "1")
os.makedirs(out, exist_ok=True)
save(model, os.path.join(out, "model.onnx"))
print("wrote", os.path.join(out, "model.onnx"))
