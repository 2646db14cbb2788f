"""PyTorch on the GPU, the peer of `opreg bench --backends cuda,cpu`: the same architectures
(torchvision ResNet-50 and MobileNetV2, a 6-layer BERT-base-width encoder at sequence 128) and
trilinear interpolation, in f32 with TF32 off (opreg's kernels and cuBLAS calls are plain f32).
Prints one JSON line per case: {"case", "batch", "median_ms", "p90_ms", "device_only_ms"}:
the first two with the inputs copied from host memory and the outputs back (as opreg's
numbers are), the last with everything already on the GPU.

    python bench_torch_gpu.py [--runs 30]
    python bench_torch_gpu.py --write-resize resize.onnx   # the same Resize as an ONNX model
"""

import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def timed(fn, runs):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2], times[min(len(times) - 1, int(len(times) * 0.9))]


class Encoder(nn.Module):
    """Embeddings + LayerNorm and `layers` post-norm encoder layers with erf GELU, as
    make_models.py's bert6."""

    def __init__(self, layers=6, hidden=768, heads=12, vocab=30522, max_pos=512):
        super().__init__()
        self.words = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_pos, hidden)
        self.types = nn.Embedding(2, hidden)
        self.ln = nn.LayerNorm(hidden, eps=1e-12)
        layer = nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout=0.0, activation="gelu",
                                           batch_first=True, layer_norm_eps=1e-12)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, ids, mask):
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        x = self.ln(self.words(ids) + self.pos(pos) + self.types(ids * 0))
        return self.layers(x, src_key_padding_mask=mask == 0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--write-resize", metavar="PATH")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 (as opreg's cuda:tf32=true)")
    args = ap.parse_args()
    if args.write_resize:
        write_resize(args.write_resize)
        return
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    dev = torch.device("cuda")
    import torchvision

    # (case, batch, host inputs, the model): each timed with inputs from and outputs to host
    # memory, as a server (and `opreg bench`) runs, and with everything already on the GPU.
    cases = []
    for name, make in [("resnet50", torchvision.models.resnet50), ("mobilenetv2", torchvision.models.mobilenet_v2)]:
        model = make().eval().to(dev)
        for batch in (1, 8, 32):
            cases.append((name, batch, [torch.randn(batch, 3, 224, 224)], model))
    enc = Encoder().eval().to(dev)
    for batch in (1, 8):
        ids = torch.randint(0, 30522, (batch, 128))
        cases.append(("bert6", batch, [ids, torch.ones(batch, 128, dtype=torch.int64)], enc))
    trilinear = lambda x: F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
    cases.append(("resize_trilinear", 1, [torch.randn(1, 16, 32, 64, 64)], trilinear))
    with torch.inference_mode():
        for name, batch, host, fn in cases:
            on_gpu = [t.to(dev) for t in host]
            median, p90 = timed(lambda: fn(*[t.to(dev) for t in host]).cpu(), args.runs)
            device_ms, _ = timed(lambda: fn(*on_gpu), args.runs)
            print(json.dumps({"case": name, "batch": batch, "tf32": args.tf32, "median_ms": median,
                              "p90_ms": p90, "device_only_ms": device_ms}), flush=True)


def write_resize(path):
    """x[1, 16, 32, 64, 64] -> trilinear x2 (half_pixel: interpolate's align_corners=False)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("Resize", ["x", "roi", "scales"], ["y"], mode="linear")
    graph = helper.make_graph(
        [node], "resize_trilinear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 32, 64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 64, 128, 128])],
        [numpy_helper.from_array(np.zeros(0, np.float32), "roi"),
         numpy_helper.from_array(np.array([1, 1, 2, 2, 2], np.float32), "scales")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    m.ir_version = 8
    onnx.save(m, path)


if __name__ == "__main__":
    main()
