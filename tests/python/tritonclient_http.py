"""Drives opreg's KServe v2 REST endpoint with tritonclient.http (unchanged, as for Triton):
health, metadata, a model upload, inference with binary and with JSON tensors compared with
onnxruntime, statistics, an error, and unload.

usage: python tritonclient_http.py HOST:PORT  -> prints one JSON object on stdout
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import tritonclient.http as httpclient
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

rng = np.random.default_rng(3)
w = rng.standard_normal((4, 3)).astype(np.float32)
graph = helper.make_graph(
    [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Softmax", ["h"], ["y"], axis=-1),
        helper.make_node("ArgMax", ["h"], ["k"], axis=-1, keepdims=0),
    ],
    "rest",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
    [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
        helper.make_tensor_value_info("k", TensorProto.INT64, ["N"]),
    ],
    [numpy_helper.from_array(w, "w")],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
data = model.SerializeToString()
sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])

c = httpclient.InferenceServerClient(url=sys.argv[1])
out = {"live": c.is_server_live(), "ready": c.is_server_ready()}
out["server"] = c.get_server_metadata()["name"]
c.load_model("rest", files={"file:1/model.onnx": data})
out["model_ready"] = c.is_model_ready("rest")
meta = c.get_model_metadata("rest")
out["inputs"] = [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]]

x = rng.standard_normal((6, 4)).astype(np.float32)
want_y, want_k = sess.run(["y", "k"], {"x": x})
for binary in (True, False):
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outs = [
        httpclient.InferRequestedOutput("y", binary_data=binary),
        httpclient.InferRequestedOutput("k", binary_data=binary),
    ]
    r = c.infer("rest", [inp], outputs=outs)
    tag = "binary" if binary else "json"
    out[f"{tag}_diff"] = float(np.abs(r.as_numpy("y") - want_y).max())
    out[f"{tag}_argmax_equal"] = bool((r.as_numpy("k") == want_k).all())
# No outputs named: every output comes back.
inp = httpclient.InferInput("x", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
r = c.infer("rest", [inp])
out["default_outputs"] = sorted(o["name"] for o in r.get_response()["outputs"])

stats = c.get_inference_statistics("rest")
out["inference_count"] = stats["model_stats"][0]["inference_count"]

bad = httpclient.InferInput("x", [2, 5], "FP32")
bad.set_data_from_numpy(np.zeros((2, 5), np.float32))
try:
    c.infer("rest", [bad])
    out["bad_shape_error"] = None
except InferenceServerException as e:
    out["bad_shape_error"] = str(e)

c.unload_model("rest")
out["ready_after_unload"] = c.is_model_ready("rest")
print(json.dumps(out))
