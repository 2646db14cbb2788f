"""Writes real-size models with seeded random weights (no model hub needed), in the shapes
torch's ONNX exporter produces:

- resnet50.onnx: ResNet-50 v1.5 (Conv + BatchNormalization + Relu, bottlenecks [3, 4, 6, 3],
  global average pool, Gemm to 1000 classes), input x [N, 3, 224, 224];
- resnet18.onnx: ResNet-18 (basic blocks [2, 2, 2, 2]), input x [N, 3, 224, 224];
- mobilenetv2.onnx: MobileNetV2 (inverted residuals with depthwise convolutions, Clip as ReLU6);
- efficientnet_b0.onnx: EfficientNet-B0 as torchvision's (MBConv blocks: 1x1 expansion,
  depthwise 3x3/5x5, squeeze-and-excitation, 1x1 projection; SiLU exported as Sigmoid + Mul),
  input x [N, 3, 224, 224];
- squeezenet.onnx: SqueezeNet 1.1 as torchvision's (Fire modules: 1x1 squeeze, 1x1 and 3x3
  expand concatenated; ceil-mode max pools; no BatchNormalization), input x [N, 3, 224, 224];
- crnn.onnx: a CRNN text-line recognizer (Conv3x3 + BatchNormalization + Relu backbone
  pooling the height away, two bidirectional LSTMs of hidden 256, a dense CTC head and
  LogSoftmax per frame), input x [N, 1, 32, 128], output log_probs [32, N, 37];
- resnet50_qdq.onnx, mobilenetv2_qdq.onnx: the two quantized to QDQ by onnxruntime;
- bert.onnx: a BERT-style encoder (embeddings + LayerNormalization, L layers of multi-head
  self-attention and an erf-GELU feed-forward, as exported from PyTorch), inputs
  input_ids [N, S] (int64) and attention_mask [N, S] (int64), output [N, S, H];
- bert6.onnx: the same encoder with 6 layers (the benchmark table's).

Usage: make_models.py OUTDIR [--bert-layers L] [--bert-hidden H] [--only NAME,NAME,...]
(--only builds a subset, by the file names above without .onnx; a *_qdq model builds its
float source too.)
Prints one JSON line: {name: {"path": ..., "nodes": ..., "params": ...}}.
"""
import argparse
import json
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class Builder:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.n = [], [], 0
        self.params = 0

    def name(self, base):
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, base, array):
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        self.params += int(np.asarray(array).size)
        return name

    def weight(self, base, shape, fan_in):
        return self.const(base, (self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32))

    def op(self, op_type, inputs, n_out=1, **attrs):
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def model(self, inputs, outputs, name):
        g = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="opreg-make-models")
        m.ir_version = 8
        return m

    # Convolution + BatchNormalization (+ activation), as torchvision's models export.
    def conv_bn(self, x, cin, cout, k, stride=1, groups=1, act="relu"):
        w = self.weight("conv_w", (cout, cin // groups, k, k), cin // groups * k * k)
        y = self.op("Conv", [x, w], kernel_shape=[k, k], strides=[stride, stride],
                    pads=[k // 2] * 4, group=groups)
        bn = [self.const("bn_scale", (1 + 0.1 * self.rng.standard_normal(cout)).astype(np.float32)),
              self.const("bn_bias", (0.1 * self.rng.standard_normal(cout)).astype(np.float32)),
              self.const("bn_mean", (0.1 * self.rng.standard_normal(cout)).astype(np.float32)),
              self.const("bn_var", (1 + 0.1 * np.abs(self.rng.standard_normal(cout))).astype(np.float32))]
        y = self.op("BatchNormalization", [y] + bn, epsilon=1e-5)
        if act == "relu":
            y = self.op("Relu", [y])
        elif act == "relu6":
            y = self.op("Clip", [y, self.const("zero", np.float32(0)), self.const("six", np.float32(6))])
        elif act == "silu":
            y = self.silu(y)
        return y

    # SiLU as torch exports it: x * sigmoid(x).
    def silu(self, x):
        return self.op("Mul", [x, self.op("Sigmoid", [x])])


def resnet50():
    b = Builder(50)
    x = "x"
    y = b.conv_bn(x, 3, 64, 7, stride=2)
    y = b.op("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, (blocks, width) in enumerate(zip([3, 4, 6, 3], [64, 128, 256, 512])):
        for i in range(blocks):
            stride = 2 if i == 0 and stage > 0 else 1
            out = width * 4
            h = b.conv_bn(y, cin, width, 1)
            h = b.conv_bn(h, width, width, 3, stride=stride)
            h = b.conv_bn(h, width, out, 1, act=None)
            short = y if (i > 0) else b.conv_bn(y, cin, out, 1, stride=stride, act=None)
            y = b.op("Relu", [b.op("Add", [h, short])])
            cin = out
    y = b.op("GlobalAveragePool", [y])
    y = b.op("Flatten", [y], axis=1)
    w = b.weight("fc_w", (1000, 2048), 2048)
    bias = b.const("fc_b", np.zeros(1000, np.float32))
    b.nodes.append(helper.make_node("Gemm", [y, w, bias], ["logits"], name="fc", transB=1))
    return b, b.model(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        "resnet50",
    )


def resnet18():
    """ResNet-18: basic blocks (two 3x3 convolutions) [2, 2, 2, 2], as torchvision's."""
    b = Builder(18)
    y = b.conv_bn("x", 3, 64, 7, stride=2)
    y = b.op("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, width in enumerate([64, 128, 256, 512]):
        for i in range(2):
            stride = 2 if i == 0 and stage > 0 else 1
            h = b.conv_bn(y, cin, width, 3, stride=stride)
            h = b.conv_bn(h, width, width, 3, act=None)
            short = y if (stride == 1 and cin == width) else b.conv_bn(
                y, cin, width, 1, stride=stride, act=None)
            y = b.op("Relu", [b.op("Add", [h, short])])
            cin = width
    y = b.op("GlobalAveragePool", [y])
    y = b.op("Flatten", [y], axis=1)
    w = b.weight("fc_w", (1000, 512), 512)
    bias = b.const("fc_b", np.zeros(1000, np.float32))
    b.nodes.append(helper.make_node("Gemm", [y, w, bias], ["logits"], name="fc", transB=1))
    return b, b.model(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        "resnet18",
    )


def mobilenetv2():
    b = Builder(2)
    y = b.conv_bn("x", 3, 32, 3, stride=2, act="relu6")
    cin = 32
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    for t, c, n, s in settings:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            h = y if t == 1 else b.conv_bn(y, cin, hidden, 1, act="relu6")
            h = b.conv_bn(h, hidden, hidden, 3, stride=stride, groups=hidden, act="relu6")
            h = b.conv_bn(h, hidden, c, 1, act=None)
            y = b.op("Add", [y, h]) if stride == 1 and cin == c else h
            cin = c
    y = b.conv_bn(y, cin, 1280, 1, act="relu6")
    y = b.op("GlobalAveragePool", [y])
    y = b.op("Flatten", [y], axis=1)
    w = b.weight("fc_w", (1000, 1280), 1280)
    bias = b.const("fc_b", np.zeros(1000, np.float32))
    b.nodes.append(helper.make_node("Gemm", [y, w, bias], ["logits"], name="fc", transB=1))
    return b, b.model(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        "mobilenetv2",
    )


def efficientnet_b0():
    """EfficientNet-B0 as torchvision's: stem 3x3/2 to 32, 16 MBConv blocks, head 1x1 to 1280."""
    b = Builder(0)
    y = b.conv_bn("x", 3, 32, 3, stride=2, act="silu")
    cin = 32
    # (expand ratio, kernel, stride, out channels, repeats)
    settings = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
    for t, k, s, c, n in settings:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            h = y if t == 1 else b.conv_bn(y, cin, hidden, 1, act="silu")
            h = b.conv_bn(h, hidden, hidden, k, stride=stride, groups=hidden, act="silu")
            # Squeeze-and-excitation, squeezing to a quarter of the block's input channels.
            sq = max(1, cin // 4)
            e = b.op("GlobalAveragePool", [h])
            e = b.op("Conv", [e, b.weight("se_w1", (sq, hidden, 1, 1), hidden),
                              b.const("se_b1", np.zeros(sq, np.float32))], kernel_shape=[1, 1])
            e = b.silu(e)
            e = b.op("Conv", [e, b.weight("se_w2", (hidden, sq, 1, 1), sq),
                              b.const("se_b2", np.zeros(hidden, np.float32))], kernel_shape=[1, 1])
            h = b.op("Mul", [b.op("Sigmoid", [e]), h])
            h = b.conv_bn(h, hidden, c, 1, act=None)
            y = b.op("Add", [h, y]) if stride == 1 and cin == c else h
            cin = c
    y = b.conv_bn(y, cin, 1280, 1, act="silu")
    y = b.op("GlobalAveragePool", [y])
    y = b.op("Flatten", [y], axis=1)
    w = b.weight("fc_w", (1000, 1280), 1280)
    bias = b.const("fc_b", np.zeros(1000, np.float32))
    b.nodes.append(helper.make_node("Gemm", [y, w, bias], ["logits"], name="fc", transB=1))
    return b, b.model(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        "efficientnet_b0",
    )


def squeezenet():
    """SqueezeNet 1.1 as torchvision's: convolutions with bias and Relu, no BatchNormalization."""
    b = Builder(11)

    def conv_relu(x, cin, cout, k, stride=1, pad=0):
        w = b.weight("conv_w", (cout, cin, k, k), cin * k * k)
        bias = b.const("conv_b", np.zeros(cout, np.float32))
        return b.op("Relu", [b.op("Conv", [x, w, bias], kernel_shape=[k, k], strides=[stride, stride],
                                  pads=[pad] * 4)])

    def pool(x):
        return b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)

    def fire(x, cin, squeeze, expand):
        s = conv_relu(x, cin, squeeze, 1)
        return b.op("Concat", [conv_relu(s, squeeze, expand, 1), conv_relu(s, squeeze, expand, 3, pad=1)],
                    axis=1)

    y = pool(conv_relu("x", 3, 64, 3, stride=2))  # 224 -> 111 -> 55
    y = pool(fire(fire(y, 64, 16, 64), 128, 16, 64))  # -> 27
    y = pool(fire(fire(y, 128, 32, 128), 256, 32, 128))  # -> 13
    y = fire(fire(y, 256, 48, 192), 384, 48, 192)
    y = fire(fire(y, 384, 64, 256), 512, 64, 256)
    # The classifier (its Dropout is the identity at inference): 1x1 to 1000 + Relu, average pool.
    y = conv_relu(y, 512, 1000, 1)
    y = b.op("GlobalAveragePool", [y])
    b.nodes.append(helper.make_node("Flatten", [y], ["logits"], name="flatten", axis=1))
    return b, b.model(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        "squeezenet",
    )


def crnn(height=32, width=128, classes=37, hidden=256):
    """A CRNN text-line recognizer: Conv3x3 + BatchNormalization + Relu (64, 128, 256, 256, 512,
    512 channels), 2x2 max pools then (2, 1) pools that take the height to 1 and keep the
    width/4 columns, the columns as time steps [T, N, 512] into two bidirectional LSTMs (ONNX
    gate order i, o, f, c; torch-style uniform(+-1/sqrt(H)) weights), a dense head and
    LogSoftmax per frame (what a CTC decoder reads): x [N, 1, 32, 128] -> [32, N, 37]."""
    b = Builder(23)

    def pool(x, kh, kw):
        return b.op("MaxPool", [x], kernel_shape=[kh, kw], strides=[kh, kw])

    y = pool(b.conv_bn("x", 1, 64, 3), 2, 2)  # 32x128 -> 16x64
    y = pool(b.conv_bn(y, 64, 128, 3), 2, 2)  # -> 8x32
    y = pool(b.conv_bn(y, 128, 256, 3), 2, 1)  # -> 4x32
    y = pool(b.conv_bn(y, 256, 256, 3), 2, 1)  # -> 2x32
    y = b.conv_bn(y, 256, 512, 3)
    y = pool(b.conv_bn(y, 512, 512, 3), 2, 1)  # -> 1x32
    assert height // 32 == 1
    # [N, 512, 1, T] -> [T, N, 512].
    y = b.op("Squeeze", [y, b.const("ax2", np.array([2], np.int64))])
    seq = b.op("Transpose", [y], perm=[2, 0, 1])
    merge = b.const("merge_shape", np.array([0, 0, -1], np.int64))
    bound = 1 / np.sqrt(hidden)

    def uniform(base, shape):
        return b.const(base, b.rng.uniform(-bound, bound, shape).astype(np.float32))

    feat = 512
    for _ in range(2):
        # W [2, 4H, I], R [2, 4H, H], B [2, 8H] (Wb then Rb), gates i, o, f, c.
        lstm = b.op("LSTM", [seq, uniform("lstm_w", (2, 4 * hidden, feat)),
                             uniform("lstm_r", (2, 4 * hidden, hidden)),
                             uniform("lstm_b", (2, 8 * hidden))],
                    direction="bidirectional", hidden_size=hidden)
        # Y [T, 2, N, H] -> [T, N, 2H].
        seq = b.op("Reshape", [b.op("Transpose", [lstm], perm=[0, 2, 1, 3]), merge])
        feat = 2 * hidden
    logits = b.op("Add", [b.op("MatMul", [seq, b.weight("head_w", (feat, classes), feat)]),
                          b.const("head_b", np.zeros(classes, np.float32))])
    b.nodes.append(helper.make_node("LogSoftmax", [logits], ["log_probs"], name="log_softmax", axis=2))
    return b, b.model(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, height, width])],
        [helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, [width // 4, "N", classes])],
        "crnn",
    )


def bert(layers, hidden, heads=None, vocab=30522, max_pos=512):
    heads = heads or hidden // 64
    head = hidden // heads
    ffn = hidden * 4
    b = Builder(7)

    def dense(x, cin, cout):
        return b.op("Add", [b.op("MatMul", [x, b.weight("w", (cin, cout), cin)]),
                            b.const("b", np.zeros(cout, np.float32))])

    def layer_norm(x):
        return b.op("LayerNormalization", [x, b.const("ln_g", np.ones(hidden, np.float32)),
                                           b.const("ln_b", np.zeros(hidden, np.float32))],
                    axis=-1, epsilon=1e-12)

    def shape_of(x, idx):
        return b.op("Gather", [b.op("Shape", [x]), b.const("idx", np.array([idx], np.int64))], axis=0)

    ids, mask = "input_ids", "attention_mask"
    words = b.op("Gather", [b.weight("word_emb", (vocab, hidden), hidden), ids], axis=0)
    seq = shape_of(ids, 1)
    positions = b.op("Unsqueeze", [b.op("Range", [b.const("start", np.int64(0)),
                                                  b.op("Squeeze", [seq, b.const("ax0", np.array([0], np.int64))]),
                                                  b.const("step", np.int64(1))]),
                                   b.const("ax0", np.array([0], np.int64))])
    pos = b.op("Gather", [b.weight("pos_emb", (max_pos, hidden), hidden), positions], axis=0)
    types = b.op("Gather", [b.weight("type_emb", (2, hidden), hidden), b.op("Mul", [ids, b.const("zero", np.int64(0))])], axis=0)
    x = layer_norm(b.op("Add", [b.op("Add", [words, pos]), types]))
    # The additive mask: (1 - mask) * -10000, shaped [N, 1, 1, S].
    m = b.op("Cast", [b.op("Unsqueeze", [mask, b.const("ax12", np.array([1, 2], np.int64))])], to=TensorProto.FLOAT)
    m = b.op("Mul", [b.op("Sub", [b.const("one", np.float32(1)), m]), b.const("neg", np.float32(-10000))])
    split = b.const("split_shape", np.array([0, 0, heads, head], np.int64))
    merge = b.const("merge_shape", np.array([0, 0, hidden], np.int64))
    scale = b.const("scale", np.float32(np.sqrt(head)))
    for _ in range(layers):
        def heads_of(t):
            return b.op("Transpose", [b.op("Reshape", [t, split])], perm=[0, 2, 1, 3])
        q, k, v = (heads_of(dense(x, hidden, hidden)) for _ in range(3))
        kt = b.op("Transpose", [k], perm=[0, 1, 3, 2])
        s = b.op("Add", [b.op("Div", [b.op("MatMul", [q, kt]), scale]), m])
        p = b.op("Softmax", [s], axis=-1)
        ctx = b.op("Reshape", [b.op("Transpose", [b.op("MatMul", [p, v])], perm=[0, 2, 1, 3]), merge])
        x = layer_norm(b.op("Add", [dense(ctx, hidden, hidden), x]))
        h = dense(x, hidden, ffn)
        # erf GELU, as torch exports it: x * 0.5 * (1 + erf(x / sqrt(2))).
        g = b.op("Erf", [b.op("Div", [h, b.const("sqrt2", np.float32(np.sqrt(2)))])])
        h = b.op("Mul", [b.op("Mul", [h, b.op("Add", [g, b.const("one", np.float32(1))])]), b.const("half", np.float32(0.5))])
        x = layer_norm(b.op("Add", [dense(h, ffn, hidden), x]))
    b.nodes.append(helper.make_node("Identity", [x], ["hidden_states"], name="out"))
    return b, b.model(
        [helper.make_tensor_value_info(ids, TensorProto.INT64, ["N", "S"]),
         helper.make_tensor_value_info(mask, TensorProto.INT64, ["N", "S"])],
        [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, ["N", "S", hidden])],
        "bert",
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--bert-layers", type=int, default=12)
    ap.add_argument("--bert-hidden", type=int, default=768)
    ap.add_argument("--only", help="comma-separated model names to build (default: all)")
    args = ap.parse_args()
    makers = [("resnet50", resnet50), ("resnet18", resnet18), ("mobilenetv2", mobilenetv2),
              ("bert", lambda: bert(args.bert_layers, args.bert_hidden)),
              # The benchmark table's encoder: 6 layers (DistilBERT's depth) at the same width.
              ("bert6", lambda: bert(6, args.bert_hidden)),
              ("efficientnet_b0", efficientnet_b0), ("squeezenet", squeezenet), ("crnn", crnn)]
    quantized = ["resnet50", "mobilenetv2"]
    known = [name for name, _ in makers] + [f"{name}_qdq" for name in quantized]
    only = set(known) if args.only is None else {n.strip() for n in args.only.split(",") if n.strip()}
    if only - set(known):
        ap.error(f"unknown model(s) {', '.join(sorted(only - set(known)))}; known: {', '.join(known)}")
    os.makedirs(args.out, exist_ok=True)
    report = {}
    for name, make in makers:
        # A quantized model is made from its float one, so that one is built too.
        if name not in only and f"{name}_qdq" not in only:
            continue
        builder, model = make()
        onnx.checker.check_model(model)
        path = os.path.join(args.out, f"{name}.onnx")
        onnx.save(model, path)
        report[name] = {"path": path, "nodes": len(model.graph.node), "params": builder.params}
    # ResNet-50 and MobileNetV2 quantized to QDQ by onnxruntime's own static quantizer (u8
    # activations, i8 per-channel weights), calibrated on seeded random images: the QDQ form
    # opreg fuses into integer operators.
    for name in quantized:
        if f"{name}_qdq" not in only:
            continue
        path = os.path.join(args.out, f"{name}_qdq.onnx")
        quantize_qdq(os.path.join(args.out, f"{name}.onnx"), path)
        report[f"{name}_qdq"] = {"path": path, "nodes": len(onnx.load(path).graph.node)}
    print(json.dumps(report))


def quantize_qdq(src, dst):
    import tempfile

    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Images(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(1)
            self.batches = iter([{"x": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)}
                                 for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    # The pre-processing onnxruntime recommends before quantizing (folds BatchNormalization).
    with tempfile.TemporaryDirectory() as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        quantize_static(pre, dst, Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


if __name__ == "__main__":
    main()
