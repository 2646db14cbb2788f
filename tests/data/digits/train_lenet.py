"""Train a small LeNet-5-style CNN on scikit-learn's digits and export it to ONNX.

What it does
------------
* Loads ``sklearn.datasets.load_digits`` (1797 images, 8x8, values 0..16),
  scales pixels to [0, 1] by /16 (float32, NCHW ``[N,1,8,8]``), labels int64.
* Splits deterministically (stratified, seed 0): 1200 train, 128 calibration
  (taken from the train side, never from test), the remaining 469 are test.
  Indices into ``load_digits`` order are written to ``split.json`` (each list
  sorted ascending; ``test/digits.npy`` and the calibration batches follow that order).
* Trains, in pure numpy (hand-written forward and backward, no torch/tf):
      Conv(1->8, 3x3, pad 1)+b -> Relu -> MaxPool 2x2      [8x4x4]
      Conv(8->16, 3x3, pad 1)+b -> Relu -> MaxPool 2x2     [16x2x2]
      Flatten -> Gemm(64->32, transB=1)+b -> Relu -> Gemm(32->10, transB=1)+b
  with He init from ``np.random.default_rng(0)``, Adam, mini-batches of 32,
  softmax cross-entropy, 40 epochs (float64 during training).
* Writes, next to this script:
      lenet.onnx             opset 13, ir_version 7, input "image" float [N,1,8,8],
                             output "logits" float [N,10], float32 initializers
      test/digits.npy / test/digits.labels.npy   float32 [469,1,8,8] / int64 [469]
                                (the layout `opreg quantize --eval` reads: a batch and its labels)
      calib/batch_000.npy .. calib/batch_007.npy   float32 [16,1,8,8] each
      split.json, expected.json
* Checks with onnxruntime (CPUExecutionProvider) that the saved model's test
  accuracy equals that of the float32 numpy model, and prints it.

How to run (from the repository root; needs ``pip install scikit-learn`` in
addition to tests/python/requirements.txt):

    .venv/bin/python tests/data/digits/train_lenet.py

Tests do not run this script; they use the committed output files.
"""

import json
import os
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 0
N_TRAIN, N_CALIB = 1200, 128
EPOCHS, BATCH, LR = 40, 32, 2e-3


# ----------------------------------------------------------------------------
# numpy layers (NCHW). Conv is 3x3, stride 1, pad 1 via im2col.
# ----------------------------------------------------------------------------
def im2col(x):
    """[B,C,H,W] -> [B*H*W, C*9], column order (c, kh, kw) = ONNX weight order."""
    b, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.empty((b, h, w, c, 3, 3), dtype=x.dtype)
    for i in range(3):
        for j in range(3):
            cols[:, :, :, :, i, j] = xp[:, :, i:i + h, j:j + w].transpose(0, 2, 3, 1)
    return cols.reshape(b * h * w, c * 9)


def col2im(dcols, shape):
    b, c, h, w = shape
    d = dcols.reshape(b, h, w, c, 3, 3)
    dxp = np.zeros((b, c, h + 2, w + 2), dtype=dcols.dtype)
    for i in range(3):
        for j in range(3):
            dxp[:, :, i:i + h, j:j + w] += d[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return dxp[:, :, 1:-1, 1:-1]


def conv_fwd(x, w, bias):
    b, _, h, wd = x.shape
    o = w.shape[0]
    cols = im2col(x)
    out = cols @ w.reshape(o, -1).T + bias
    return out.reshape(b, h, wd, o).transpose(0, 3, 1, 2), cols


def conv_bwd(dout, cols, w, xshape):
    o = w.shape[0]
    d = dout.transpose(0, 2, 3, 1).reshape(-1, o)
    dw = (d.T @ cols).reshape(w.shape)
    db = d.sum(0)
    dx = col2im(d @ w.reshape(o, -1), xshape)
    return dx, dw, db


def pool_fwd(x):
    b, c, h, w = x.shape
    r = x.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5)
    r = r.reshape(b, c, h // 2, w // 2, 4)
    arg = r.argmax(-1)
    return np.take_along_axis(r, arg[..., None], -1)[..., 0], arg


def pool_bwd(dout, arg, xshape):
    b, c, h, w = xshape
    d = np.zeros((b, c, h // 2, w // 2, 4), dtype=dout.dtype)
    np.put_along_axis(d, arg[..., None], dout[..., None], -1)
    d = d.reshape(b, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5)
    return d.reshape(xshape)


def forward(p, x, keep=False):
    c1, cols1 = conv_fwd(x, p["conv1.w"], p["conv1.b"])
    r1 = np.maximum(c1, 0)
    p1, a1 = pool_fwd(r1)
    c2, cols2 = conv_fwd(p1, p["conv2.w"], p["conv2.b"])
    r2 = np.maximum(c2, 0)
    p2, a2 = pool_fwd(r2)
    f = p2.reshape(len(x), -1)
    h = f @ p["fc1.w"].T + p["fc1.b"]
    r3 = np.maximum(h, 0)
    logits = r3 @ p["fc2.w"].T + p["fc2.b"]
    if not keep:
        return logits
    return logits, (x, cols1, c1, r1, a1, p1, cols2, c2, r2, a2, p2, f, h, r3)


def backward(p, cache, dlogits):
    x, cols1, c1, r1, a1, p1, cols2, c2, r2, a2, p2, f, h, r3 = cache
    g = {}
    g["fc2.w"] = dlogits.T @ r3
    g["fc2.b"] = dlogits.sum(0)
    dh = (dlogits @ p["fc2.w"]) * (h > 0)
    g["fc1.w"] = dh.T @ f
    g["fc1.b"] = dh.sum(0)
    dp2 = (dh @ p["fc1.w"]).reshape(p2.shape)
    dc2 = pool_bwd(dp2, a2, r2.shape) * (c2 > 0)
    dp1, g["conv2.w"], g["conv2.b"] = conv_bwd(dc2, cols2, p["conv2.w"], p1.shape)
    dc1 = pool_bwd(dp1, a1, r1.shape) * (c1 > 0)
    _, g["conv1.w"], g["conv1.b"] = conv_bwd(dc1, cols1, p["conv1.w"], x.shape)
    return g


def init_params(rng):
    def he(shape, fan_in):
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)

    return {
        "conv1.w": he((8, 1, 3, 3), 9), "conv1.b": np.zeros(8),
        "conv2.w": he((16, 8, 3, 3), 72), "conv2.b": np.zeros(16),
        "fc1.w": he((32, 64), 64), "fc1.b": np.zeros(32),
        "fc2.w": he((10, 32), 32), "fc2.b": np.zeros(10),
    }


def softmax_xent(logits, y):
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    prob = e / e.sum(1, keepdims=True)
    loss = -np.log(prob[np.arange(len(y)), y] + 1e-12).mean()
    d = prob
    d[np.arange(len(y)), y] -= 1.0
    return loss, d / len(y)


# ----------------------------------------------------------------------------
# ONNX export
# ----------------------------------------------------------------------------
def export_onnx(p32, path):
    inits = [numpy_helper.from_array(v, name=k) for k, v in p32.items()]
    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    pool = dict(kernel_shape=[2, 2], strides=[2, 2])
    nodes = [
        helper.make_node("Conv", ["image", "conv1.w", "conv1.b"], ["conv1_out"], name="conv1", **conv),
        helper.make_node("Relu", ["conv1_out"], ["relu1_out"], name="relu1"),
        helper.make_node("MaxPool", ["relu1_out"], ["pool1_out"], name="pool1", **pool),
        helper.make_node("Conv", ["pool1_out", "conv2.w", "conv2.b"], ["conv2_out"], name="conv2", **conv),
        helper.make_node("Relu", ["conv2_out"], ["relu2_out"], name="relu2"),
        helper.make_node("MaxPool", ["relu2_out"], ["pool2_out"], name="pool2", **pool),
        helper.make_node("Flatten", ["pool2_out"], ["flatten_out"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flatten_out", "fc1.w", "fc1.b"], ["fc1_out"], name="fc1", transB=1),
        helper.make_node("Relu", ["fc1_out"], ["relu3_out"], name="relu3"),
        helper.make_node("Gemm", ["relu3_out", "fc2.w", "fc2.b"], ["logits"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "lenet_digits",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)],
        producer_name="opreg-tests-train_lenet", producer_version="1",
        doc_string="LeNet-5-style CNN on sklearn digits (8x8, x/16); see tests/data/digits/README.md",
    )
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)


def main():
    t0 = time.perf_counter()
    d = load_digits()
    x_all = (d.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y_all = d.target.astype(np.int64)
    idx = np.arange(len(y_all))

    n_test = len(idx) - N_TRAIN - N_CALIB
    side, test = train_test_split(idx, test_size=n_test, stratify=y_all, random_state=SEED)
    train, calib = train_test_split(side, test_size=N_CALIB, stratify=y_all[side], random_state=SEED)
    train, calib, test = np.sort(train), np.sort(calib), np.sort(test)
    assert len(train) == N_TRAIN and len(calib) == N_CALIB
    assert not (set(train) | set(calib)) & set(test) and not set(train) & set(calib)

    rng = np.random.default_rng(SEED)
    p = init_params(rng)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(w) for k, w in p.items()}
    b1, b2, eps, step = 0.9, 0.999, 1e-8, 0
    xtr, ytr = x_all[train].astype(np.float64), y_all[train]
    for epoch in range(EPOCHS):
        lr = LR * 0.5 * (1 + np.cos(np.pi * epoch / EPOCHS))  # cosine decay
        perm = rng.permutation(N_TRAIN)
        tot = 0.0
        for s in range(0, N_TRAIN, BATCH):
            bi = perm[s:s + BATCH]
            logits, cache = forward(p, xtr[bi], keep=True)
            loss, dl = softmax_xent(logits, ytr[bi])
            tot += loss * len(bi)
            g = backward(p, cache, dl)
            step += 1
            for k in p:
                m[k] = b1 * m[k] + (1 - b1) * g[k]
                v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
                mh, vh = m[k] / (1 - b1 ** step), v[k] / (1 - b2 ** step)
                p[k] -= lr * mh / (np.sqrt(vh) + eps)
        if epoch % 5 == 4 or epoch == EPOCHS - 1:
            acc = (forward(p, x_all[test].astype(np.float64)).argmax(1) == y_all[test]).mean()
            print(f"epoch {epoch + 1:3d}  loss {tot / N_TRAIN:.4f}  test acc {acc:.4f}")
    train_s = time.perf_counter() - t0

    p32 = {k: np.ascontiguousarray(w, dtype=np.float32) for k, w in p.items()}
    x_test, y_test = np.ascontiguousarray(x_all[test]), y_all[test]
    np_pred = forward(p32, x_test).argmax(1)
    np_acc = float((np_pred == y_test).mean())
    train_acc = float((forward(p32, x_all[train]).argmax(1) == y_all[train]).mean())

    onnx_path = os.path.join(HERE, "lenet.onnx")
    export_onnx(p32, onnx_path)
    os.makedirs(os.path.join(HERE, "test"), exist_ok=True)
    np.save(os.path.join(HERE, "test", "digits.npy"), x_test)
    np.save(os.path.join(HERE, "test", "digits.labels.npy"), y_test)
    os.makedirs(os.path.join(HERE, "calib"), exist_ok=True)
    x_cal = x_all[calib]
    for i in range(N_CALIB // 16):
        np.save(os.path.join(HERE, "calib", f"batch_{i:03d}.npy"),
                np.ascontiguousarray(x_cal[i * 16:(i + 1) * 16]))
    with open(os.path.join(HERE, "split.json"), "w") as fh:
        json.dump({"train": train.tolist(), "calibration": calib.tolist(), "test": test.tolist()}, fh, separators=(",", ":"))
        fh.write("\n")

    import onnxruntime as ort
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    ort_logits = sess.run(["logits"], {"image": np.load(os.path.join(HERE, "test", "digits.npy"))})[0]
    ort_pred = ort_logits.argmax(1)
    ort_acc = float((ort_pred == y_test).mean())
    max_diff = float(np.abs(ort_logits - forward(p32, x_test)).max())
    print(f"train acc {train_acc:.4f}  numpy f32 test acc {np_acc:.4f}  onnxruntime test acc {ort_acc:.4f}"
          f"  (pred mismatches {int((ort_pred != np_pred).sum())}, max |dlogit| {max_diff:.2e})")
    assert ort_acc == np_acc, "onnxruntime and numpy accuracies differ"

    with open(os.path.join(HERE, "expected.json"), "w") as fh:
        json.dump({"f32_test_accuracy": ort_acc, "n_test": int(len(test)),
                   "onnxruntime": ort.__version__}, fh, indent=2)
        fh.write("\n")
    print(f"training {train_s:.1f}s, total {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
