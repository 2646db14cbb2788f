"""Uploads a model through tritonclient's RepositoryModelLoad, infers, and compares the result
with onnxruntime on the same input.

usage: python tritonclient_model.py HOST:PORT  -> prints one JSON object on stdout
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper

rng = np.random.default_rng(7)
w1 = rng.standard_normal((8, 16)).astype(np.float32)
b1 = rng.standard_normal((16,)).astype(np.float32)
w2 = rng.standard_normal((16, 4)).astype(np.float32)

# x[N,8] -> MatMul -> Add -> Relu -> MatMul -> Softmax -> y[N,4]
graph = helper.make_graph(
    [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="bias1"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu1"),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="fc2"),
        helper.make_node("Softmax", ["h3"], ["y"], name="softmax", axis=-1),
    ],
    "mlp",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")],
)
# IR version 9 so that the pinned onnxruntime (IR <= 10) loads what the newer onnx writes.
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
onnx.checker.check_model(model)
data = model.SerializeToString()

client = grpcclient.InferenceServerClient(url=sys.argv[1])
client.load_model("mlp", files={"file:1/model.onnx": data})
x = rng.standard_normal((5, 8)).astype(np.float32)
inp = grpcclient.InferInput("x", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
result = client.infer("mlp", [inp], outputs=[grpcclient.InferRequestedOutput("y")])
got = result.as_numpy("y")

sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
want = sess.run(["y"], {"x": x})[0]
meta = client.get_model_metadata("mlp", as_json=True)
print(json.dumps({
    "ready": client.is_model_ready("mlp"),
    "shape": list(got.shape),
    "max_abs_diff": float(np.max(np.abs(got - want))),
    "input_shape": meta["inputs"][0]["shape"],
}))
