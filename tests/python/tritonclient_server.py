"""Drives opregd with Python's tritonclient[grpc] (a real client written by others).

usage: python tritonclient_server.py HOST:PORT  -> prints one JSON object on stdout
"""
import json
import sys

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

url = sys.argv[1]
client = grpcclient.InferenceServerClient(url=url)
meta = client.get_server_metadata(as_json=True)
out = {
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "name": meta["name"],
    "version": meta["version"],
    "extensions": meta.get("extensions", []),
}
try:
    client.get_model_metadata("nope")
    out["model_metadata_error"] = None
except InferenceServerException as e:
    out["model_metadata_error"] = e.status()
print(json.dumps(out))
