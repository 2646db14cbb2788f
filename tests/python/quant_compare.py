"""opreg's quantizers side by side with ONNX Runtime's, on the same models and the same data.

For each model, every configuration of both sides calibrates on the same calibration folder
and is measured on the same held-out folder; the script prints one markdown table per model
with opreg's rows and onnxruntime's rows together (never one side's figures alone), a summary
line per model (opreg's default, `opreg quantize --method auto`, against ORT's best), and writes
everything as JSON to target/quant-compare.json.

Models (generated here, nothing large is committed; seeded, so reruns give the same data):

- lenet:   tests/data/digits/lenet.onnx, real data: calibration tests/data/digits/calib (8
           batches of 16), held out tests/data/digits/test (469 labelled images: accuracy);
- cnn-bn:  a small CNN with BatchNormalization (3 x Conv3x3+BN+Relu, GlobalAveragePool,
           Flatten, Gemm 32->10), input [N,3,32,32]; seeded standard-normal images,
           8 calibration batches of 8, 2 held-out batches (no labels: SQNR);
- encoder: one transformer encoder block (opset 17) with two inputs, x [N,16,64] and mask
           [N,16] (1 keep / 0 pad), the additive mask (1 - mask) * float32 min (the value
           that breaks onnxruntime's calibrators), 4-head attention, LayerNormalization, a
           tanh-GELU MLP; one subfolder per sample (x.npy, mask.npy), 8 calibration samples
           of batch 4, 2 held out;
- crnn:    a CRNN-style text-line recognizer (3 x Conv3x3+BN+Relu with MaxPool, the 25
           columns as a sequence into a bidirectional LSTM of 64, a dense head to 37 classes,
           LogSoftmax per frame), input [N,1,32,100]; seeded synthetic text lines (strokes and
           crossbars on a noisy background), 8 calibration batches of 8, 2 held out (SQNR).

Rows:
- opreg auto (default): `opreg quantize --method auto` with no options, what a user gets
  without choosing: the daemon picks quant-static for models containing a Conv and
  quant-dynamic otherwise (the strategy it resolved, from the report's `strategy` field, is
  in the summary line and the JSON);
- opreg quant-static with calibrator kl, minmax, percentile (percentile is quant-static's
  default calibrator; the other options are opreg's defaults: uint8 asymmetric activations,
  int8 symmetric per-channel weights), and quant-dynamic;
- ORT quantize_static (QDQ, after quant_pre_process) with MinMax / Entropy / Percentile x
  per_channel False / True (QUInt8 asymmetric activations, as opreg's default; QInt8
  symmetric weights), and quantize_dynamic (QInt8 weights, per tensor and per channel).
  --full adds int8 activations on both sides, opreg's per-tensor weights, and ORT restricted
  to the operator types opreg quantizes (op_types_to_quantize Conv, MatMul, Gemm).
Each tool keeps its own calibrator defaults (opreg percentile 99.99 and KL over 2048 bins;
ORT percentile 99.999, Entropy 128 bins), as a user gets them.

Columns: ok (FAIL rows are footnoted with the error message), top-1 accuracy float -> quantized
(models with labels), SQNR dB / max abs / cosine of the quantized model's outputs against the
float model's over all held-out outputs concatenated (opreg: from its report.json, measured by
opreg running the models; ORT: computed here running both models in onnxruntime, the same
formulas), calibration seconds (opreg: the report's, from the job's start to the last sample
fed, thresholds are computed afterwards in planning; ORT: create_calibrator through
compute_data, thresholds included), total seconds (opreg: the `opreg quantize` call, from
streaming the samples to the report, held-out evaluation included; ORT: quantize_static /
quantize_dynamic plus the same held-out evaluation in onnxruntime, pre-processing excluded), and
peak RSS (opreg: the daemon's VmHWM after the job, one fresh daemon per row; ORT: the worker
subprocess's VmHWM after quantizing, one subprocess per row), each with the RSS it started
from in parentheses (opreg: once the daemon serves the float model; ORT: after importing
onnxruntime and opening the data). The peak is reset to that RSS first (/proc/PID/clear_refs),
so start-up peaks do not hide the job's; where the kernel refuses, the figures fall back to
the whole process's peak (ru_maxrss / VmHWM since start), flagged in the JSON (peak_reset).

Summary line per model: opreg's default (auto, with the strategy it resolved to) against ORT's
best configuration: SQNR against ORT's best SQNR and, for models with labels, quantized top-1
accuracy against ORT's best quantized accuracy (each best taken over all successful ORT rows,
not necessarily the same row), each saying whether ours >= theirs (strictly; the SQNR gap in dB
follows, with the digits it needs when the two decimals hide it). Calibration time is compared
like for like, calibrator against the same kind of calibrator: opreg quant-static kl against ORT
Entropy per-channel (both entropy calibrators) and opreg quant-static percentile against ORT
Percentile per-channel (uint8 activations on both sides); opreg's calibration figure excludes
its threshold search (KL or percentile), which runs afterwards in planning. For the same pairs
the line also gives the end-to-end ratio (total seconds: quantize + held-out evaluation).

--memory adds the memory experiment: cnn-bn calibrated on 32 and on 512 samples of batch 1
(--memory-samples), opreg quant-static kl on a fresh daemon each time (VmHWM) against ORT
Entropy per-channel in a fresh subprocess each time (VmHWM; ru_maxrss where the peak cannot be
reset): histogram calibrators on both sides.

Binaries: $OPREG_BIN_DIR (default target/release; target/debug when the release folder lacks
any of opregd, opreg, libopreg_{onnx_ops,blas_cpu,quant_static,quant_dynamic}.so). Nothing is
built. Debug binaries are slow: --quick uses fewer samples (LeNet keeps its real data).

Usage (from the repo root, or scripts/compare-quant):
    .venv/bin/python tests/python/quant_compare.py [--quick] [--full] [--memory]
        [--models lenet,cnn-bn,encoder] [--memory-samples 32,512] [--json PATH] [--keep]
"""
import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PLUGINS = ["libopreg_onnx_ops.so", "libopreg_blas_cpu.so", "libopreg_quant_static.so",
           "libopreg_quant_dynamic.so"]
RESULT_TAG = "@@QUANT_COMPARE_RESULT "


# ---------------------------------------------------------------------------------------------
# Data folders (the layout `opreg quantize --data/--eval` reads; the ORT side reads the same)
# ---------------------------------------------------------------------------------------------

def list_samples(folder):
    """The samples of a data folder, sorted: for single-input models each `*.npy` file (not
    `*.labels.npy`) is a batch {"": path, "labels": path|None}; for multi-input models each
    subfolder is a sample {input name: path}."""
    out = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            out.append({"inputs": {f[:-4]: os.path.join(path, f) for f in sorted(os.listdir(path))
                                   if f.endswith(".npy") and not f.endswith(".labels.npy")},
                        "labels": None})
        elif name.endswith(".npy") and not name.endswith(".labels.npy"):
            labels = path[:-4] + ".labels.npy"
            out.append({"inputs": {"": path}, "labels": labels if os.path.exists(labels) else None})
    return out


def feeds_of(sample, input_names):
    if "" in sample["inputs"]:
        assert len(input_names) == 1, "a single .npy batch for a multi-input model"
        return {input_names[0]: np.load(sample["inputs"][""])}
    return {n: np.load(sample["inputs"][n]) for n in input_names}


def write_batches(folder, batches, labels=None):
    os.makedirs(folder, exist_ok=True)
    for i, b in enumerate(batches):
        np.save(os.path.join(folder, f"batch_{i:04d}.npy"), np.ascontiguousarray(b))
        if labels is not None:
            np.save(os.path.join(folder, f"batch_{i:04d}.labels.npy"), labels[i])


def write_samples(folder, samples):
    for i, s in enumerate(samples):
        d = os.path.join(folder, f"sample_{i:04d}")
        os.makedirs(d, exist_ok=True)
        for name, arr in s.items():
            np.save(os.path.join(d, f"{name}.npy"), np.ascontiguousarray(arr))


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

class Builder:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, base):
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, base, array):
        from onnx import numpy_helper
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, base, shape, fan_in, gain=2.0):
        return self.const(base, (self.rng.standard_normal(shape) * np.sqrt(gain / fan_in)).astype(np.float32))

    def op(self, op_type, inputs, out=None, **attrs):
        from onnx import helper
        out = out or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type), **attrs))
        return out

    def model(self, inputs, outputs, name, opset):
        from onnx import helper
        g = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="opreg-quant-compare")
        m.ir_version = 8
        return m


def cnn_bn():
    from onnx import TensorProto, helper
    b = Builder(11)

    def conv_bn_relu(x, cin, cout, stride):
        w = b.weight("conv_w", (cout, cin, 3, 3), cin * 9)
        y = b.op("Conv", [x, w], kernel_shape=[3, 3], strides=[stride, stride], pads=[1, 1, 1, 1])
        bn = [b.const("bn_scale", (1 + 0.1 * b.rng.standard_normal(cout)).astype(np.float32)),
              b.const("bn_bias", (0.1 * b.rng.standard_normal(cout)).astype(np.float32)),
              b.const("bn_mean", (0.1 * b.rng.standard_normal(cout)).astype(np.float32)),
              b.const("bn_var", (1 + 0.1 * np.abs(b.rng.standard_normal(cout))).astype(np.float32))]
        return b.op("Relu", [b.op("BatchNormalization", [y] + bn, epsilon=1e-5)])

    y = conv_bn_relu("x", 3, 16, 1)
    y = conv_bn_relu(y, 16, 32, 2)
    y = conv_bn_relu(y, 32, 32, 1)
    y = b.op("Flatten", [b.op("GlobalAveragePool", [y])], axis=1)
    b.op("Gemm", [y, b.weight("fc_w", (10, 32), 32), b.const("fc_b", np.zeros(10, np.float32))],
         out="logits", transB=1)
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                   [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                   "cnn_bn", 13)


def encoder(seq=16, hidden=64, heads=4, ffn=128):
    from onnx import TensorProto, helper
    b = Builder(17)
    head = hidden // heads

    def dense(x, cin, cout):
        return b.op("Add", [b.op("MatMul", [x, b.weight("w", (cin, cout), cin, gain=1.0)]),
                            b.const("b", (0.02 * b.rng.standard_normal(cout)).astype(np.float32))])

    def layer_norm(x):
        return b.op("LayerNormalization",
                    [x, b.const("ln_g", (1 + 0.1 * b.rng.standard_normal(hidden)).astype(np.float32)),
                     b.const("ln_b", (0.1 * b.rng.standard_normal(hidden)).astype(np.float32))],
                    axis=-1, epsilon=1e-5)

    # The additive mask, as Hugging Face exports it: (1 - mask) * finfo(float32).min, [N,1,1,S].
    m = b.op("Mul", [b.op("Sub", [b.const("one", np.float32(1)), "mask"]),
                     b.const("fmin", np.float32(np.finfo(np.float32).min))])
    m = b.op("Unsqueeze", [m, b.const("ax12", np.array([1, 2], np.int64))])
    split = b.const("split_shape", np.array([0, 0, heads, head], np.int64))
    merge = b.const("merge_shape", np.array([0, 0, hidden], np.int64))
    q = b.op("Transpose", [b.op("Reshape", [dense("x", hidden, hidden), split])], perm=[0, 2, 1, 3])
    kt = b.op("Transpose", [b.op("Reshape", [dense("x", hidden, hidden), split])], perm=[0, 2, 3, 1])
    v = b.op("Transpose", [b.op("Reshape", [dense("x", hidden, hidden), split])], perm=[0, 2, 1, 3])
    s = b.op("Div", [b.op("MatMul", [q, kt]), b.const("scale", np.float32(np.sqrt(head)))])
    p = b.op("Softmax", [b.op("Add", [s, m])], axis=-1)
    ctx = b.op("Reshape", [b.op("Transpose", [b.op("MatMul", [p, v])], perm=[0, 2, 1, 3]), merge])
    x = layer_norm(b.op("Add", [dense(ctx, hidden, hidden), "x"]))
    h = dense(x, hidden, ffn)
    # tanh GELU: 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3))).
    cube = b.op("Mul", [b.op("Mul", [h, h]), h])
    inner = b.op("Mul", [b.op("Add", [h, b.op("Mul", [cube, b.const("c", np.float32(0.044715))])]),
                         b.const("k", np.float32(np.sqrt(2 / np.pi)))])
    g = b.op("Mul", [b.op("Mul", [h, b.op("Add", [b.op("Tanh", [inner]), b.const("one", np.float32(1))])]),
                     b.const("half", np.float32(0.5))])
    y = layer_norm(b.op("Add", [dense(g, ffn, hidden), x]))
    b.op("Identity", [y], out="y")
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", seq, hidden]),
                    helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", seq])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", seq, hidden])],
                   "encoder", 17)


def crnn(height=32, width=100, classes=37, hidden=64):
    """A CRNN-style text-line recognizer: a conv backbone (Conv3x3 + BatchNormalization + Relu,
    pooling the height away), the columns as a sequence into a bidirectional LSTM, a dense
    head and LogSoftmax per frame (what a CTC decoder reads): x [N,1,32,100] -> [25,N,37]."""
    from onnx import TensorProto, helper
    b = Builder(23)

    def conv_bn_relu(x, cin, cout):
        w = b.weight("conv_w", (cout, cin, 3, 3), cin * 9)
        y = b.op("Conv", [x, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        bn = [b.const("bn_scale", (1 + 0.1 * b.rng.standard_normal(cout)).astype(np.float32)),
              b.const("bn_bias", (0.1 * b.rng.standard_normal(cout)).astype(np.float32)),
              b.const("bn_mean", (0.1 * b.rng.standard_normal(cout)).astype(np.float32)),
              b.const("bn_var", (1 + 0.1 * np.abs(b.rng.standard_normal(cout))).astype(np.float32))]
        return b.op("Relu", [b.op("BatchNormalization", [y] + bn, epsilon=1e-5)])

    y = b.op("MaxPool", [conv_bn_relu("x", 1, 32)], kernel_shape=[2, 2], strides=[2, 2])
    y = b.op("MaxPool", [conv_bn_relu(y, 32, 64)], kernel_shape=[2, 2], strides=[2, 2])
    y = b.op("MaxPool", [conv_bn_relu(y, 64, 128)], kernel_shape=[2, 1], strides=[2, 1])
    # [N, 128, 4, 25] -> the 25 columns as time steps: [25, N, 512].
    keep2 = b.const("keep2", np.array([0, 0, -1], np.int64))
    seq = b.op("Reshape", [b.op("Transpose", [y], perm=[3, 0, 1, 2]), keep2])
    feat = 128 * (height // 8)
    w = b.weight("lstm_w", (2, 4 * hidden, feat), feat, gain=1.0)
    r = b.weight("lstm_r", (2, 4 * hidden, hidden), hidden, gain=1.0)
    bias = b.const("lstm_b", (0.05 * b.rng.standard_normal((2, 8 * hidden))).astype(np.float32))
    lstm = b.op("LSTM", [seq, w, r, bias], direction="bidirectional", hidden_size=hidden)
    # Y [25, 2, N, 64] -> [25, N, 128].
    frames = b.op("Reshape", [b.op("Transpose", [lstm], perm=[0, 2, 1, 3]), keep2])
    logits = b.op("Add", [b.op("MatMul", [frames, b.weight("head_w", (2 * hidden, classes), 2 * hidden, gain=1.0)]),
                          b.const("head_b", (0.02 * b.rng.standard_normal(classes)).astype(np.float32))])
    b.op("LogSoftmax", [logits], out="y", axis=2)
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, height, width])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [width // 4, "N", classes])],
                   "crnn", 17)


def text_lines(rng, batch, height=32, width=100):
    """Synthetic text-line images: dark background, glyph-like strokes (bars and blocks of
    random width and height) in a band, sensor noise."""
    x = 0.05 * rng.standard_normal((batch, 1, height, width)).astype(np.float32)
    for i in range(batch):
        col = int(rng.integers(2, 8))
        while col < width - 4:
            w, top = int(rng.integers(2, 7)), int(rng.integers(4, 10))
            h = int(rng.integers(10, height - top - 2))
            x[i, 0, top:top + h, col:col + w] += rng.uniform(0.6, 1.0)
            if rng.random() < 0.5:  # a crossbar
                y = int(rng.integers(top, top + h))
                x[i, 0, y:y + 2, col:col + w + 3] += rng.uniform(0.6, 1.0)
            col += w + int(rng.integers(2, 6))
    return x


def encoder_sample(rng, batch, seq=16, hidden=64):
    x = rng.standard_normal((batch, seq, hidden)).astype(np.float32)
    lengths = rng.integers(seq // 2, seq + 1, size=batch)
    lengths[0] = seq // 2  # at least one padded row per sample
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.float32)
    return {"x": x, "mask": mask}


def prepare_models(work, names, quick):
    """Writes each model and its data folders under `work`; returns {name: spec}."""
    import onnx
    specs = {}
    for name in names:
        d = os.path.join(work, "models", name)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "model.onnx")
        calib, heldout = os.path.join(d, "calib"), os.path.join(d, "eval")
        if name == "lenet":
            shutil.copy(os.path.join(ROOT, "tests/data/digits/lenet.onnx"), path)
            calib = os.path.join(ROOT, "tests/data/digits/calib")
            heldout = os.path.join(ROOT, "tests/data/digits/test")
        elif name == "cnn-bn":
            onnx.save(cnn_bn(), path)
            rng = np.random.default_rng(5)
            n_cal, batch = (4, 4) if quick else (8, 8)
            write_batches(calib, [rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
                                  for _ in range(n_cal)])
            write_batches(heldout, [rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
                                    for _ in range(2)])
        elif name == "encoder":
            onnx.save(encoder(), path)
            rng = np.random.default_rng(6)
            n_cal = 4 if quick else 8
            write_samples(calib, [encoder_sample(rng, 4) for _ in range(n_cal)])
            write_samples(heldout, [encoder_sample(rng, 4) for _ in range(2)])
        elif name == "crnn":
            onnx.save(crnn(), path)
            rng = np.random.default_rng(7)
            n_cal, batch = (4, 4) if quick else (8, 8)
            write_batches(calib, [text_lines(rng, batch) for _ in range(n_cal)])
            write_batches(heldout, [text_lines(rng, batch) for _ in range(2)])
        else:
            raise SystemExit(f"unknown model {name!r} (lenet, cnn-bn, encoder, crnn)")
        specs[name] = {"name": name, "path": path, "calib": calib, "eval": heldout, "dir": d}
    return specs


def check_float(spec):
    """onnx.checker (full) and one onnxruntime run of the float model on the held-out data."""
    import onnx
    import onnxruntime as ort
    model = onnx.load(spec["path"])
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(spec["path"], providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    samples = list_samples(spec["eval"])
    outs = [sess.run(None, feeds_of(s, names)) for s in samples]
    finite = all(np.isfinite(o).all() for out in outs for o in out)
    if not finite:
        raise RuntimeError("the float model's outputs are not finite")
    return {"nodes": len(model.graph.node), "opset": model.opset_import[0].version,
            "inputs": names, "calib_samples": len(list_samples(spec["calib"])),
            "eval_samples": len(samples),
            "eval_rows": int(sum(np.asarray(o[0]).shape[0] for o in outs))}


# ---------------------------------------------------------------------------------------------
# Measuring a quantized model against the float one in onnxruntime (the ORT side)
# ---------------------------------------------------------------------------------------------

def figures(float_path, quant_path, heldout):
    """SQNR / max abs / cosine over all f32 outputs concatenated, and top-1 accuracy of the
    first output when labels exist; the same formulas as opreg's report."""
    import onnxruntime as ort
    out = {"loads": False}
    try:
        qs = ort.InferenceSession(quant_path, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        out["error"] = f"onnxruntime cannot load the quantized model: {one_line(e)}"
        return out
    out["loads"] = True
    fs = ort.InferenceSession(float_path, providers=["CPUExecutionProvider"])
    names = [i.name for i in fs.get_inputs()]
    signal_, noise, dot, norm_q, max_abs = 0.0, 0.0, 0.0, 0.0, 0.0
    correct_f = correct_q = total = 0
    try:
        for s in list_samples(heldout):
            feeds = feeds_of(s, names)
            ref = fs.run(None, feeds)
            got = qs.run(None, feeds)
            for r, g in zip(ref, got):
                if r.dtype != np.float32:
                    continue
                r64, g64 = r.astype(np.float64).ravel(), np.asarray(g, np.float64).ravel()
                signal_ += float(r64 @ r64)
                noise += float((r64 - g64) @ (r64 - g64))
                dot += float(r64 @ g64)
                norm_q += float(g64 @ g64)
                max_abs = max(max_abs, float(np.abs(r64 - g64).max(initial=0.0)))
            if s["labels"]:
                y = np.load(s["labels"])
                correct_f += int((ref[0].argmax(axis=1) == y).sum())
                correct_q += int((got[0].argmax(axis=1) == y).sum())
                total += len(y)
    except Exception as e:  # noqa: BLE001
        out["error"] = f"onnxruntime cannot run the quantized model: {one_line(e)}"
        return out
    out["sqnr_db"] = float("inf") if noise == 0 else 10 * np.log10(signal_ / noise) if signal_ > 0 else float("-inf")
    out["cosine"] = dot / np.sqrt(signal_ * norm_q) if signal_ > 0 and norm_q > 0 else (1.0 if signal_ == norm_q else 0.0)
    out["max_abs"] = max_abs
    if total:
        out["accuracy"] = {"float": correct_f / total, "quantized": correct_q / total}
    if not (np.isfinite(out["sqnr_db"]) and np.isfinite(out["cosine"])):
        out["note"] = "non-finite figures (NaN/inf outputs)"
    return out


def one_line(e, limit=300):
    s = " ".join(str(e).split())
    return s if len(s) <= limit else s[:limit] + " ..."


# ---------------------------------------------------------------------------------------------
# ORT side: pre-processing once per model, then one worker subprocess per configuration
# ---------------------------------------------------------------------------------------------

def ort_preprocess(spec):
    """quant_pre_process (shape inference + optimization, folds BatchNormalization) as
    make_models.py does; with symbolic shape inference first, without it if that fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process
    out = os.path.join(spec["dir"], "ort_pre.onnx")
    notes = []
    for skip_symbolic in (False, True):
        try:
            t = time.perf_counter()
            quant_pre_process(spec["path"], out, skip_symbolic_shape=skip_symbolic)
            return out, {"seconds": time.perf_counter() - t, "skip_symbolic_shape": skip_symbolic,
                         "notes": notes}
        except Exception as e:  # noqa: BLE001
            notes.append(f"quant_pre_process(skip_symbolic_shape={skip_symbolic}) failed: {one_line(e)}")
    notes.append("ORT quantizes the model without pre-processing")
    return spec["path"], {"seconds": None, "notes": notes}


def ort_configs(full):
    acts = ["uint8", "int8"] if full else ["uint8"]
    out = []
    for act in acts:
        for method in ["MinMax", "Entropy", "Percentile"]:
            for pc in (False, True):
                label = f"ORT static {method}" + (" per-channel" if pc else " per-tensor")
                if full:
                    label += f" {act}"
                out.append({"label": label, "kind": "static", "method": method, "per_channel": pc,
                            "activation": act})
    if full:
        # opreg quantizes the activations of Conv / MatMul / Gemm only: ORT restricted to the
        # same operator types tells its calibrators apart from its wider operator coverage.
        for method in ["MinMax", "Entropy", "Percentile"]:
            out.append({"label": f"ORT static {method} per-channel uint8, Conv/MatMul/Gemm only",
                        "kind": "static", "method": method, "per_channel": True, "activation": "uint8",
                        "op_types": ["Conv", "MatMul", "Gemm"]})
    for pc in (False, True):
        out.append({"label": "ORT dynamic" + (" per-channel" if pc else " per-tensor"),
                    "kind": "dynamic", "per_channel": pc})
    return out


def ort_worker(spec):
    """Runs in a subprocess: quantizes with onnxruntime and prints one JSON result line."""
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_dynamic, quantize_static)
    ort.set_default_logger_severity(3)
    import onnx
    # The module (the package exports a function of the same name that hides it).
    ortq = sys.modules["onnxruntime.quantization.quantize"]
    input_names = [i.name for i in onnx.load(spec["model"], load_external_data=False).graph.input]

    class Reader(CalibrationDataReader):
        """Reads the calibration folder one sample at a time (nothing held in memory)."""

        def __init__(self):
            self.samples = list_samples(spec["calib"])
            self.i = 0

        def get_next(self):
            if self.i >= len(self.samples):
                return None
            self.i += 1
            return feeds_of(self.samples[self.i - 1], input_names)

        def __len__(self):
            return len(self.samples)

        def set_range(self, start_index, end_index):
            self.samples = self.samples[start_index:end_index]
            self.i = 0

    reader = Reader()
    result = {"startup_peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    baseline = reset_peak("self")
    result["peak_reset"] = baseline is not None
    result["baseline_rss_kb"] = baseline if baseline is not None else result["startup_peak_rss_kb"]
    timing = {}
    original = ortq.create_calibrator

    def timed_calibrator(*a, **k):
        timing["start"] = time.perf_counter()
        cal = original(*a, **k)
        compute = cal.compute_data

        def compute_data():
            r = compute()
            timing["end"] = time.perf_counter()
            return r
        cal.compute_data = compute_data
        return cal

    ortq.create_calibrator = timed_calibrator
    t = time.perf_counter()
    try:
        if spec["kind"] == "static":
            act = QuantType.QUInt8 if spec["activation"] == "uint8" else QuantType.QInt8
            quantize_static(spec["model"], spec["out"], reader, quant_format=QuantFormat.QDQ,
                            per_channel=spec["per_channel"], activation_type=act,
                            weight_type=QuantType.QInt8, op_types_to_quantize=spec.get("op_types"),
                            calibrate_method=getattr(CalibrationMethod, spec["method"]))
        else:
            quantize_dynamic(spec["model"], spec["out"], per_channel=spec["per_channel"],
                             weight_type=QuantType.QInt8)
        result["ok"] = True
    except Exception as e:  # noqa: BLE001
        result["ok"] = False
        result["error"] = f"{type(e).__name__}: {one_line(e)}"
    result["total_seconds"] = time.perf_counter() - t
    if "end" in timing:
        result["calibration_seconds"] = timing["end"] - timing["start"]
    peak = vm_hwm_kb("self") if result["peak_reset"] else None
    result["peak_rss_kb"] = peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_ort_worker(spec, timeout=1800):
    cmd = [sys.executable, os.path.abspath(__file__), "--_ort-worker", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout} s"}
    for line in p.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-3:])
    return {"ok": False, "error": f"worker exited {p.returncode}: {one_line(tail)}"}


def ort_row(spec, pre_path, cfg, work):
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in cfg["label"])
    out = os.path.join(work, f"{spec['name']}-{safe}.onnx")
    w = dict(cfg, model=pre_path, calib=spec["calib"], out=out)
    r = run_ort_worker(w)
    row = {"side": "ORT", "method": cfg["label"], "config": cfg, "ok": r.get("ok", False),
           "error": r.get("error"), "calibration_seconds": r.get("calibration_seconds"),
           "total_seconds": r.get("total_seconds"),
           "peak_rss_mb": kb_mb(r.get("peak_rss_kb")), "baseline_rss_mb": kb_mb(r.get("baseline_rss_kb")),
           "startup_peak_rss_mb": kb_mb(r.get("startup_peak_rss_kb")), "peak_reset": r.get("peak_reset")}
    if row["ok"]:
        t = time.perf_counter()
        f = figures(spec["path"], out, spec["eval"])
        # opreg's total includes its held-out evaluation: so does this one.
        row["quantize_seconds"] = row["total_seconds"]
        row["evaluate_seconds"] = time.perf_counter() - t
        row["total_seconds"] = row["quantize_seconds"] + row["evaluate_seconds"]
        try:
            import onnx
            ops = {}
            for n in onnx.load(out).graph.node:
                ops[n.op_type] = ops.get(n.op_type, 0) + 1
            row["quantized_model_ops"] = ops
        except Exception:  # noqa: BLE001
            pass
        row["loads"] = f["loads"]
        for k in ("sqnr_db", "max_abs", "cosine", "accuracy", "note"):
            if k in f:
                row[k] = f[k]
        if "error" in f:
            row["ok"] = False
            row["error"] = f["error"]
    return row


def kb_mb(kb):
    return None if kb is None else kb / 1024.0


# ---------------------------------------------------------------------------------------------
# opreg side: a fresh daemon per configuration
# ---------------------------------------------------------------------------------------------

def bin_dir():
    need = ["opregd", "opreg"] + PLUGINS
    env = os.environ.get("OPREG_BIN_DIR")
    if env:
        d = env if os.path.isabs(env) else os.path.join(ROOT, env)
        missing = [f for f in need if not os.path.exists(os.path.join(d, f))]
        if missing:
            raise SystemExit(f"OPREG_BIN_DIR={env} lacks {', '.join(missing)} (this script builds nothing)")
        return d
    for d in ("target/release", "target/debug"):
        d = os.path.join(ROOT, d)
        if all(os.path.exists(os.path.join(d, f)) for f in need):
            return d
    raise SystemExit("no opreg binaries in target/release nor target/debug "
                     f"({', '.join(need)}); build them first (this script builds nothing)")


def proc_status_kb(pid, field):
    """A memory field of /proc/PID/status (VmHWM, VmRSS) in kB, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def vm_hwm_kb(pid):
    return proc_status_kb(pid, "VmHWM")


def reset_peak(pid):
    """Resets the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0: writing 5 to
    clear_refs), so that the peak measured afterwards is the job's, not start-up's (loading
    the plugins, importing onnxruntime). Returns the RSS it starts from, or None when the
    kernel refuses (the peak then includes start-up)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return proc_status_kb(pid, "VmRSS")


class Daemon:
    """opregd serving one model (version 1) from a private repository."""

    def __init__(self, bins, work, model_name, model_path, startup_timeout=300):
        self.dir = tempfile.mkdtemp(prefix="opregd-", dir=work)
        plugins = os.path.join(self.dir, "plugins")
        os.makedirs(plugins)
        for p in PLUGINS:
            shutil.copy(os.path.join(bins, p), plugins)
        self.repo = os.path.join(self.dir, "repo")
        os.makedirs(os.path.join(self.repo, model_name, "1"))
        shutil.copy(model_path, os.path.join(self.repo, model_name, "1", "model.onnx"))
        runtime = os.path.join(self.dir, "runtime")
        os.makedirs(runtime)
        self.out_path, self.err_path = os.path.join(self.dir, "stdout"), os.path.join(self.dir, "stderr")
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [os.path.join(bins, "opregd"), "--plugin-dir", plugins, "--model-repo", self.repo,
                 "--listen", "127.0.0.1:0", "--runtime-dir", runtime],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + startup_timeout
        self.addr = None
        while time.monotonic() < deadline:
            with open(self.out_path) as f:
                for line in f:
                    if line.startswith("listening on "):
                        self.addr = line.split()[-1].strip()
            if self.addr:
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"opregd exited {self.proc.returncode}: {self.log_tail()}")
            time.sleep(0.05)
        if not self.addr:
            self.stop()
            raise RuntimeError(f"opregd did not listen within {startup_timeout} s: {self.log_tail()}")
        self.startup_peak_kb = vm_hwm_kb(self.proc.pid)
        self.baseline_kb = reset_peak(self.proc.pid)
        self.peak_reset = self.baseline_kb is not None
        if not self.peak_reset:
            self.baseline_kb = self.startup_peak_kb

    def log_tail(self, n=3):
        try:
            with open(self.err_path) as f:
                lines = [l.strip() for l in f if l.strip()]
        except OSError:
            return ""
        return one_line(" | ".join(lines[-n:]))

    def quantize(self, model_name, method, calib, heldout, options, timeout=3600):
        cmd = [os.path.join(os.path.dirname(self.proc.args[0]), "opreg"), "--addr", f"http://{self.addr}",
               "quantize", model_name, "--method", method, "--data", calib, "--eval", heldout]
        for o in options:
            cmd += ["--option", o]
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"opreg quantize timed out after {timeout} s",
                    "total_seconds": time.perf_counter() - t}
        res = {"total_seconds": time.perf_counter() - t, "peak_kb": vm_hwm_kb(self.proc.pid)}
        if p.returncode != 0:
            msg = (p.stderr or p.stdout).strip()
            if self.proc.poll() is not None:
                msg += f" (opregd exited {self.proc.returncode}: {self.log_tail()})"
            res.update(ok=False, error=f"opreg quantize exited {p.returncode}: {one_line(msg)}")
            return res
        versions = sorted(int(v) for v in os.listdir(os.path.join(self.repo, model_name)) if v.isdigit())
        vdir = os.path.join(self.repo, model_name, str(versions[-1]))
        report_path = os.path.join(vdir, "quantization", "report.json")
        if versions[-1] < 2 or not os.path.exists(report_path):
            res.update(ok=False, error=f"no new version with a report in {vdir}")
            return res
        with open(report_path) as f:
            res["report"] = json.load(f)
        res["model_path"] = os.path.join(vdir, "model.onnx")
        res["ok"] = True
        return res

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def opreg_configs(full):
    # `--method auto` with no options: opreg's default (quant-static for models with a Conv,
    # quant-dynamic otherwise; the report names the strategy it resolved to).
    out = [{"label": "opreg auto (default)", "method": "auto", "options": [], "default": True}]
    out += [{"label": f"opreg static {c}", "method": "quant-static",
             "options": [f"calibrator={c}"]} for c in ("kl", "minmax", "percentile")]
    if full:
        out += [{"label": f"opreg static {c} int8", "method": "quant-static",
                 "options": [f"calibrator={c}", "activation_type=int8"]} for c in ("kl", "minmax", "percentile")]
        out += [{"label": "opreg static kl per-tensor", "method": "quant-static",
                 "options": ["calibrator=kl", "per_channel=false"]}]
    out.append({"label": "opreg dynamic", "method": "quant-dynamic", "options": []})
    return out


def opreg_row(bins, work, spec, cfg, calib=None, heldout=None):
    row = {"side": "opreg", "method": cfg["label"], "config": cfg, "ok": False}
    try:
        d = Daemon(bins, work, spec["name"], spec["path"])
    except Exception as e:  # noqa: BLE001
        row["error"] = one_line(e)
        return row
    try:
        row["baseline_rss_mb"] = kb_mb(d.baseline_kb)
        row["startup_peak_rss_mb"] = kb_mb(d.startup_peak_kb)
        row["peak_reset"] = d.peak_reset
        r = d.quantize(spec["name"], cfg["method"], calib or spec["calib"], heldout or spec["eval"], cfg["options"])
        row["total_seconds"] = r.get("total_seconds")
        row["peak_rss_mb"] = kb_mb(r.get("peak_kb"))
        row["ok"] = r["ok"]
        row["error"] = r.get("error")
        if r["ok"]:
            rep = r["report"]
            row["strategy"] = rep.get("strategy")  # the resolved one when the method is auto
            err = rep.get("error") or {}
            row["sqnr_db"] = err.get("sqnr_db")
            row["max_abs"] = err.get("max_abs")
            row["cosine"] = err.get("cosine")
            acc = rep.get("accuracy")
            if acc:
                row["accuracy"] = {"float": acc.get("float"), "quantized": acc.get("quantized")}
            row["calibration_seconds"] = (rep.get("calibration") or {}).get("seconds")
            row["report"] = {k: rep.get(k) for k in ("strategy", "error", "accuracy", "calibration", "notes",
                                                     "strategy_notes", "options")}
            nodes = rep.get("nodes") or {}
            row["report"]["nodes"] = {"total": nodes.get("total"), "quantized": len(nodes.get("quantized") or []),
                                      "excluded": len(nodes.get("excluded") or [])}
            # Not a table column: whether onnxruntime accepts the model file opreg wrote.
            try:
                import onnxruntime as ort
                ort.InferenceSession(r["model_path"], providers=["CPUExecutionProvider"])
                row["loads_in_ort"] = True
            except Exception as e:  # noqa: BLE001
                row["loads_in_ort"] = False
                row["loads_in_ort_error"] = one_line(e)
            if row["sqnr_db"] is None:  # the report's null: identical outputs
                row["sqnr_db"] = float("inf")
                row["note"] = "identical outputs (SQNR null in the report)"
    finally:
        d.stop()
        shutil.rmtree(d.dir, ignore_errors=True)
    return row


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def fmt(v, spec):
    if v is None:
        return "-"
    if isinstance(v, float) and not np.isfinite(v):
        return str(v)
    return format(v, spec)


def table(name, rows, labelled):
    head = ["method", "ok"] + (["top-1 f32 -> q"] if labelled else []) + \
        ["SQNR dB", "max abs", "cosine", "calib s", "total s", "peak RSS MB (base)"]
    lines = [f"### {name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for r in rows:
        ok = "yes" if r["ok"] else f"FAIL[{len(notes) + 1}]"
        if not r["ok"]:
            notes.append(f"[{len(notes) + 1}] {r['method']}: {r.get('error')}")
        elif r.get("note"):
            notes.append(f"({r['method']}: {r['note']})")
        cells = [r["method"], ok]
        if labelled:
            a = r.get("accuracy")
            cells.append(f"{a['float']:.4f} -> {a['quantized']:.4f}" if a else "-")
        rss = fmt(r.get("peak_rss_mb"), ".1f")
        if r.get("baseline_rss_mb") is not None:
            rss += f" ({r['baseline_rss_mb']:.1f})"
        cells += [fmt(r.get("sqnr_db"), ".2f"), fmt(r.get("max_abs"), ".4g"), fmt(r.get("cosine"), ".6f"),
                  fmt(r.get("calibration_seconds"), ".3f"), fmt(r.get("total_seconds"), ".2f"), rss]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + notes)


def summary(name, rows):
    """One line per model: opreg's default (auto, and the strategy it resolved to) against ORT's
    best SQNR and, with labels, ORT's best accuracy; then calibration and end-to-end time, like
    for like (opreg kl vs ORT Entropy, opreg percentile vs ORT Percentile, per-channel)."""
    def good(r):
        return r["ok"] and r.get("sqnr_db") is not None and not np.isnan(r["sqnr_db"])

    def quantized_acc(r):
        a = r.get("accuracy")
        return a.get("quantized") if a else None

    def yes(ge):
        return "yes" if ge else "no"

    ours = next((r for r in rows if r["side"] == "opreg" and r["config"].get("default")), None)
    ort_ok = [r for r in rows if r["side"] == "ORT" and good(r)]
    best = max(ort_ok, key=lambda r: r["sqnr_db"]) if ort_ok else None
    ort_static = [r for r in ort_ok if r["config"]["kind"] == "static"]
    best_static = max(ort_static, key=lambda r: r["sqnr_db"]) if ort_static else None
    ort_acc = [r for r in rows if r["side"] == "ORT" and r["ok"] and quantized_acc(r) is not None]
    best_acc = max(ort_acc, key=quantized_acc) if ort_acc else None
    labelled = any(r.get("accuracy") for r in rows)
    resolved = ours.get("strategy") if ours and ours["ok"] else None
    label = f"opreg default (auto → {resolved or 'n/a'})"
    s = {"opreg_default": ours and {k: ours.get(k) for k in ("ok", "strategy", "sqnr_db", "accuracy",
                                                            "calibration_seconds", "error")},
         "ort_best": best and {"method": best["method"], "sqnr_db": best["sqnr_db"]},
         "ort_best_static": best_static and {"method": best_static["method"], "sqnr_db": best_static["sqnr_db"]}}
    ours_good = bool(ours and good(ours))
    ours_sq = fmt(ours.get("sqnr_db"), ".2f") + " dB" if ours_good else \
        f"FAIL ({ours.get('error') if ours else 'not run'})"
    best_sq = f"{best['sqnr_db']:.2f} dB ({best['method']})" if best else "no ORT configuration succeeded"
    line = f"- {name}: {label} SQNR vs ORT best SQNR: {ours_sq} vs {best_sq}"
    if ours_good and best:
        s["sqnr_ours_ge_theirs"] = bool(ours["sqnr_db"] >= best["sqnr_db"])
        line += f", ours ≥ theirs: {yes(s['sqnr_ours_ge_theirs'])}"
        gap = ours["sqnr_db"] - best["sqnr_db"]
        if np.isfinite(gap):
            # Strict: a gap hidden by the two decimals above still decides (each side measures
            # in its own runtime), so the gap is shown, with the digits it needs.
            s["sqnr_gap_db"] = gap
            line += f" ({gap:+.2f} dB)" if abs(gap) >= 0.005 or gap == 0 else f" ({gap:+.1e} dB)"
    if best_static and best_static is not best:
        line += f"; ORT best static: {best_static['sqnr_db']:.2f} dB ({best_static['method']})"
    if labelled:
        oa = quantized_acc(ours) if ours and ours["ok"] else None
        s["ort_best_accuracy"] = best_acc and {"method": best_acc["method"], "accuracy": best_acc["accuracy"]}
        ours_a = f"{oa:.4f}" if oa is not None else "n/a"
        best_a = f"{quantized_acc(best_acc):.4f} ({best_acc['method']})" if best_acc else "n/a"
        line += f"; top-1 accuracy {label} vs ORT best accuracy: {ours_a} vs {best_a}"
        if oa is not None and best_acc:
            # Both are fractions of the same held-out images: equal counts compare equal.
            s["accuracy_ours_ge_theirs"] = bool(oa >= quantized_acc(best_acc) - 1e-9)
            line += f", ours ≥ theirs: {yes(s['accuracy_ours_ge_theirs'])}"
    # Calibration time, like for like: the same kind of calibrator on both sides.
    calib, total, searched = [], [], []
    for cal, ort_method, what in (("kl", "Entropy", "KL"), ("percentile", "Percentile", "percentile")):
        mine = next((r for r in rows if r["side"] == "opreg" and r["config"].get("method") == "quant-static"
                     and r["config"].get("options") == [f"calibrator={cal}"]), None)
        theirs = next((r for r in rows if r["side"] == "ORT" and r["config"].get("method") == ort_method
                       and r["config"].get("per_channel") and r["config"].get("activation") == "uint8"
                       and not r["config"].get("op_types")), None)
        if mine is None or theirs is None:
            continue
        pair = f"opreg {cal} / ORT {ort_method} per-channel"
        key = f"opreg_{cal}_over_ort_{ort_method.lower()}"
        oc = mine.get("calibration_seconds") if mine["ok"] else None
        ec = theirs.get("calibration_seconds") if theirs["ok"] else None
        after = ""
        if ec is None and not theirs["ok"] and theirs.get("calibration_seconds"):
            # ORT calibrated, but its model failed afterwards: the time still compares.
            ec, after = theirs["calibration_seconds"], " (ORT's model then failed)"
        if oc is not None and ec:
            s[f"calibration_time_ratio_{key}"] = oc / ec
            calib.append(f"{pair}: {oc:.3f} s / {ec:.3f} s = {oc / ec:.2f}x{after}")
            searched.append(what)
        else:
            why = f"opreg {cal} failed" if oc is None else f"ORT {ort_method} per-channel failed"
            calib.append(f"{pair}: n/a ({why})")
        ot = mine.get("total_seconds") if mine["ok"] else None
        et = theirs.get("total_seconds") if theirs["ok"] else None
        if ot is not None and et:
            s[f"total_time_ratio_{key}"] = ot / et
            total.append(f"{pair}: {ot:.2f} s / {et:.2f} s = {ot / et:.2f}x")
    if calib:
        line += "; calibration time " + ", ".join(calib)
        if searched:
            runs = "search runs" if len(searched) == 1 else "searches run"
            line += (f" (opreg's figures stop at the last sample fed: its {' and '.join(searched)} threshold"
                     f" {runs} later, in planning)")
    if total:
        line += "; end to end (quantize + held-out evaluation) " + ", ".join(total)
    return line, s


# ---------------------------------------------------------------------------------------------
# Memory experiment
# ---------------------------------------------------------------------------------------------

def memory_experiment(bins, work, counts):
    import onnx
    d = os.path.join(work, "memory")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "model.onnx")
    onnx.save(cnn_bn(), path)
    spec = {"name": "cnn-bn", "path": path, "dir": d}
    pre, _ = ort_preprocess(spec)
    rng = np.random.default_rng(9)
    heldout = os.path.join(d, "eval")
    write_batches(heldout, [rng.standard_normal((8, 3, 32, 32)).astype(np.float32)])
    results = []
    for n in counts:
        calib = os.path.join(d, f"calib-{n}")
        write_batches(calib, [rng.standard_normal((1, 3, 32, 32)).astype(np.float32) for _ in range(n)])
        o = opreg_row(bins, d, spec, {"label": "opreg static kl", "method": "quant-static",
                                      "options": ["calibrator=kl"]}, calib=calib, heldout=heldout)
        w = run_ort_worker({"kind": "static", "method": "Entropy", "per_channel": True, "activation": "uint8",
                            "model": pre, "calib": calib, "out": os.path.join(d, f"ort-{n}.onnx")})
        results.append({
            "samples": n,
            "opreg": {k: o.get(k) for k in ("ok", "error", "peak_rss_mb", "baseline_rss_mb",
                                            "calibration_seconds", "total_seconds")},
            "ort_entropy": {"ok": w.get("ok"), "error": w.get("error"), "peak_rss_mb": kb_mb(w.get("peak_rss_kb")),
                            "baseline_rss_mb": kb_mb(w.get("baseline_rss_kb")),
                            "calibration_seconds": w.get("calibration_seconds"),
                            "total_seconds": w.get("total_seconds")}})
        shutil.rmtree(calib, ignore_errors=True)
    lines = ["### memory: cnn-bn calibrated on batches of 1 (opreg quant-static kl vs ORT Entropy per-channel)", "",
             "| samples | opreg peak RSS MB (base) | ORT peak RSS MB (base) | opreg growth MB | ORT growth MB "
             "| opreg calib s | ORT calib s |", "|---|---|---|---|---|---|---|"]

    def cell(x):
        if not x["ok"] and x.get("peak_rss_mb") is None:
            return "FAIL"
        s = fmt(x.get("peak_rss_mb"), ".1f") + (f" ({x['baseline_rss_mb']:.1f})" if x.get("baseline_rss_mb") else "")
        return s + ("" if x["ok"] else " FAIL")

    def growth(x):
        if x.get("peak_rss_mb") is None or x.get("baseline_rss_mb") is None:
            return "-"
        return f"{x['peak_rss_mb'] - x['baseline_rss_mb']:.1f}"
    for r in results:
        lines.append(f"| {r['samples']} | {cell(r['opreg'])} | {cell(r['ort_entropy'])} | {growth(r['opreg'])} "
                     f"| {growth(r['ort_entropy'])} | {fmt(r['opreg'].get('calibration_seconds'), '.3f')} "
                     f"| {fmt(r['ort_entropy'].get('calibration_seconds'), '.3f')} |")
    for r in results:
        for side in ("opreg", "ort_entropy"):
            if not r[side]["ok"]:
                lines.append(f"- {r['samples']} samples, {side}: {r[side].get('error')}")
    if len(results) >= 2:
        a, b = results[0], results[-1]

        def delta(x, y):
            if x.get("peak_rss_mb") is None or y.get("peak_rss_mb") is None:
                return None
            return y["peak_rss_mb"] - x["peak_rss_mb"]
        do, de = delta(a["opreg"], b["opreg"]), delta(a["ort_entropy"], b["ort_entropy"])
        lines.append(f"- peak RSS growth from {a['samples']} to {b['samples']} samples: opreg "
                     f"{fmt(do, '+.1f')} MB vs ORT Entropy {fmt(de, '+.1f')} MB")
    return "\n".join(lines), results


# ---------------------------------------------------------------------------------------------

def plain(o):
    """Strict JSON: numpy scalars as Python numbers, non-finite floats as strings."""
    if isinstance(o, dict):
        return {str(k): plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [plain(v) for v in o]
    if hasattr(o, "item") and not isinstance(o, (str, bytes)):
        o = o.item()
    if isinstance(o, float) and not np.isfinite(o):
        return str(o)
    return o


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--_ort-worker":
        ort_worker(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lenet,cnn-bn,encoder,crnn")
    ap.add_argument("--quick", action="store_true", help="fewer synthetic samples (debug binaries)")
    ap.add_argument("--full", action="store_true",
                    help="also int8 activations (both sides), opreg per-tensor weights, ORT on "
                         "Conv/MatMul/Gemm only")
    ap.add_argument("--memory", action="store_true", help="run the memory experiment too")
    ap.add_argument("--memory-samples", default="32,512")
    ap.add_argument("--json", default=os.path.join(ROOT, "target", "quant-compare.json"))
    ap.add_argument("--keep", action="store_true", help="keep the work folder (models, data, outputs)")
    args = ap.parse_args()

    import onnxruntime as ort
    ort.set_default_logger_severity(3)
    started = time.perf_counter()
    bins = bin_dir()
    print(f"opreg binaries: {os.path.relpath(bins, ROOT)}; onnxruntime {ort.__version__}; "
          f"{os.cpu_count()} CPUs{'; quick' if args.quick else ''}", flush=True)
    # Page the client and daemon binaries in once, so that the first row does not pay for it.
    for b in ("opreg", "opregd"):
        subprocess.run([os.path.join(bins, b), "--version"], capture_output=True)
    os.makedirs(os.path.join(ROOT, "target"), exist_ok=True)
    work = tempfile.mkdtemp(prefix="quant-compare-", dir=os.path.join(ROOT, "target"))
    result = {"opreg_bin_dir": os.path.relpath(bins, ROOT), "onnxruntime": ort.__version__,
              "quick": args.quick, "full": args.full, "cpus": os.cpu_count(), "models": {}}
    tables, lines = [], []
    try:
        specs = prepare_models(work, [m.strip() for m in args.models.split(",") if m.strip()], args.quick)
        for name, spec in specs.items():
            t = time.perf_counter()
            entry = {"float": None, "rows": []}
            result["models"][name] = entry
            try:
                entry["float"] = check_float(spec)
            except Exception as e:  # noqa: BLE001
                entry["float_error"] = one_line(e)
                print(f"{name}: the float model fails its checks: {entry['float_error']}", flush=True)
                continue
            labelled = any(s["labels"] for s in list_samples(spec["eval"]))
            for cfg in opreg_configs(args.full):
                row = opreg_row(bins, work, spec, cfg)
                entry["rows"].append(row)
                print(f"  {name}: {cfg['label']}: {'ok' if row['ok'] else 'FAIL'}", file=sys.stderr, flush=True)
            pre, entry["ort_preprocess"] = ort_preprocess(spec)
            for cfg in ort_configs(args.full):
                row = ort_row(spec, pre, cfg, work)
                entry["rows"].append(row)
                print(f"  {name}: {cfg['label']}: {'ok' if row['ok'] else 'FAIL'}", file=sys.stderr, flush=True)
            entry["seconds"] = time.perf_counter() - t
            f = entry["float"]
            title = (f"{name} ({f['nodes']} nodes, opset {f['opset']}; calibration {f['calib_samples']} "
                     f"samples, held out {f['eval_samples']} samples / {f['eval_rows']} rows)")
            tab = table(title, entry["rows"], labelled)
            for n in entry["ort_preprocess"].get("notes", []):
                tab += f"\n(ORT pre-processing: {n})"
            tables.append(tab)
            print("\n" + tab + "\n", flush=True)
            line, entry["summary"] = summary(name, entry["rows"])
            lines.append(line)
        if args.memory:
            counts = [int(c) for c in args.memory_samples.split(",")]
            mem_table, result["memory"] = memory_experiment(bins, work, counts)
            tables.append(mem_table)
            print("\n" + mem_table + "\n", flush=True)
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("## summary\n")
    for line in lines:
        print(line)
    result["seconds"] = time.perf_counter() - started
    result["tables"] = tables
    result["summary_lines"] = lines
    with open(args.json, "w") as f:
        json.dump(plain(result), f, indent=1)
    print(f"\n{time.perf_counter() - started:.1f} s; JSON in {os.path.relpath(args.json, ROOT)}")


if __name__ == "__main__":
    main()
