"""tritonclient[grpc] over TLS (and mutual TLS) against opregd, inferring the mlp model.

usage: python tritonclient_tls.py HOST:PORT CA_PEM [CLIENT_CERT CLIENT_KEY]
  -> prints one JSON object on stdout
"""
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

url, ca = sys.argv[1], sys.argv[2]
cert, key = (sys.argv[3], sys.argv[4]) if len(sys.argv) > 4 else (None, None)
client = grpcclient.InferenceServerClient(
    url=url, ssl=True, root_certificates=ca, private_key=key, certificate_chain=cert
)
out = {}
try:
    out["live"] = client.is_server_live()
    x = grpcclient.InferInput("x", [1, 3], "FP32")
    x.set_data_from_numpy(np.array([[1.0, 2.0, 3.0]], dtype=np.float32))
    out["y"] = client.infer("mlp", [x]).as_numpy("y").tolist()
except InferenceServerException as e:
    out["error"] = str(e.status() or e.message())
print(json.dumps(out))
