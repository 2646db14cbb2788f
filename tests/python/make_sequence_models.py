"""Models that use sequences inside the graph while their inputs and outputs are tensors (what
KServe v2 can carry): split/concat, construct/insert/erase/at/length, a sequence carried
through Loop, sequences out of If branches. Expected outputs are the ONNX reference
evaluator's.

Usage: make_sequence_models.py OUT_DIR  ->  OUT_DIR/<name>/{model.onnx,input_*.npy,output_*.npy}
"""

import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

rng = np.random.default_rng(11)
OPSET = 17


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def model(name, nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, name, inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(m)
    return m


def i64(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def split_concat():
    """SplitToSequence by explicit lengths and per element (keepdims=0), SequenceLength,
    SequenceAt with a negative position, ConcatFromSequence along an axis and stacked."""
    nodes = [
        helper.make_node("SplitToSequence", ["x", "lens"], ["parts"], axis=0),
        helper.make_node("SequenceLength", ["parts"], ["n"]),
        helper.make_node("SequenceAt", ["parts", "minus1"], ["last"]),
        helper.make_node("ConcatFromSequence", ["parts"], ["joined"], axis=0),
        helper.make_node("SplitToSequence", ["x"], ["cols"], axis=1, keepdims=0),
        helper.make_node("ConcatFromSequence", ["cols"], ["stacked"], axis=1, new_axis=1),
    ]
    m = model(
        "split_concat",
        nodes,
        [vi("x", TensorProto.FLOAT, [6, 4])],
        [
            vi("n", TensorProto.INT64, []),
            vi("last", TensorProto.FLOAT, [4, 4]),
            vi("joined", TensorProto.FLOAT, [6, 4]),
            vi("stacked", TensorProto.FLOAT, [6, 4]),
        ],
        [i64("lens", [2, 4]), i64("minus1", -1)],
    )
    return m, {"x": f32(6, 4)}


def construct_insert_erase():
    """SequenceConstruct, SequenceInsert at the front, SequenceErase of the last element,
    SequenceAt, ConcatFromSequence."""
    nodes = [
        helper.make_node("SequenceConstruct", ["a", "b"], ["s0"]),
        helper.make_node("Add", ["a", "b"], ["ab"]),
        helper.make_node("SequenceInsert", ["s0", "ab", "zero"], ["s1"]),
        helper.make_node("SequenceErase", ["s1"], ["s2"]),
        helper.make_node("SequenceAt", ["s2", "one"], ["second"]),
        helper.make_node("ConcatFromSequence", ["s2"], ["y"], axis=0),
    ]
    m = model(
        "construct_insert_erase",
        nodes,
        [vi("a", TensorProto.FLOAT, [2, 3]), vi("b", TensorProto.FLOAT, [2, 3])],
        [vi("second", TensorProto.FLOAT, [2, 3]), vi("y", TensorProto.FLOAT, [4, 3])],
        [i64("zero", [0]), i64("one", 1)],
    )
    return m, {"a": f32(2, 3), "b": f32(2, 3)}


def loop_accumulate():
    """A sequence carried through Loop: each iteration appends x * i; the result is stacked."""
    body = helper.make_graph(
        [
            helper.make_node("Cast", ["i"], ["fi"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["x", "fi"], ["xi"]),
            helper.make_node("SequenceInsert", ["seq_in", "xi"], ["seq_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            vi("i", TensorProto.INT64, []),
            vi("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_sequence_value_info("seq_in", TensorProto.FLOAT, None),
        ],
        [
            vi("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_sequence_value_info("seq_out", TensorProto.FLOAT, None),
        ],
    )
    nodes = [
        helper.make_node("SequenceEmpty", [], ["empty"], dtype=TensorProto.FLOAT),
        helper.make_node("Loop", ["trips", "true", "empty"], ["acc"], body=body),
        helper.make_node("ConcatFromSequence", ["acc"], ["y"], axis=0, new_axis=1),
        helper.make_node("SequenceLength", ["acc"], ["n"]),
    ]
    m = model(
        "loop_accumulate",
        nodes,
        [vi("x", TensorProto.FLOAT, [3]), vi("trips", TensorProto.INT64, [])],
        [vi("y", TensorProto.FLOAT, [None, 3]), vi("n", TensorProto.INT64, [])],
        [numpy_helper.from_array(np.array(True), "true")],
    )
    return m, {"x": f32(3), "trips": np.array(4, np.int64)}


def if_sequences():
    """If branches that return sequences of different lengths, joined after the If."""

    def branch(name, count):
        return helper.make_graph(
            [helper.make_node("SequenceConstruct", ["x"] * count, [f"s_{name}"])],
            name,
            [],
            [helper.make_tensor_sequence_value_info(f"s_{name}", TensorProto.FLOAT, None)],
        )

    nodes = [
        helper.make_node(
            "If", ["c"], ["s"], then_branch=branch("then", 3), else_branch=branch("else", 1)
        ),
        helper.make_node("ConcatFromSequence", ["s"], ["y"], axis=0),
    ]
    m = model(
        "if_sequences",
        nodes,
        [vi("c", TensorProto.BOOL, []), vi("x", TensorProto.FLOAT, [2, 2])],
        [vi("y", TensorProto.FLOAT, [None, 2])],
    )
    return m, {"c": np.array(True), "x": f32(2, 2)}


def sequence_map():
    """SequenceMap over a split: each element scaled by a tensor input, and its shape."""
    body = helper.make_graph(
        [
            helper.make_node("Mul", ["e", "k"], ["scaled"]),
            helper.make_node("Shape", ["e"], ["shape"]),
        ],
        "map_body",
        [vi("e", TensorProto.FLOAT, None), vi("k", TensorProto.FLOAT, [3])],
        [vi("scaled", TensorProto.FLOAT, None), vi("shape", TensorProto.INT64, [2])],
    )
    nodes = [
        helper.make_node("SplitToSequence", ["x", "lens"], ["parts"], axis=0),
        helper.make_node("SequenceMap", ["parts", "k"], ["scaled", "shapes"], body=body),
        helper.make_node("ConcatFromSequence", ["scaled"], ["y"], axis=0),
        helper.make_node("ConcatFromSequence", ["shapes"], ["s"], axis=0, new_axis=1),
    ]
    m = model(
        "sequence_map",
        nodes,
        [vi("x", TensorProto.FLOAT, [5, 3]), vi("k", TensorProto.FLOAT, [3])],
        [vi("y", TensorProto.FLOAT, [5, 3]), vi("s", TensorProto.INT64, [3, 2])],
        [i64("lens", [1, 3, 1])],
    )
    return m, {"x": f32(5, 3), "k": f32(3)}


def optionals():
    """Optional around a tensor and an empty one (declared by type), tested and unwrapped."""
    nodes = [
        helper.make_node("Optional", ["x"], ["ox"]),
        helper.make_node("OptionalHasElement", ["ox"], ["has"]),
        helper.make_node("OptionalGetElement", ["ox"], ["y"]),
        helper.make_node(
            "Optional", [], ["none"], type=helper.make_tensor_type_proto(TensorProto.FLOAT, None)
        ),
        helper.make_node("OptionalHasElement", ["none"], ["has_none"]),
    ]
    m = model(
        "optionals",
        nodes,
        [vi("x", TensorProto.FLOAT, [2])],
        [
            vi("has", TensorProto.BOOL, []),
            vi("y", TensorProto.FLOAT, [2]),
            vi("has_none", TensorProto.BOOL, []),
        ],
    )
    x = f32(2)
    # The reference evaluator's OptionalGetElement returns the optional's list wrapper ([1, 2]
    # here) rather than the tensor; the spec's result is the tensor itself.
    return m, {"x": x}, [np.array(True), x, np.array(False)]


def main():
    out = sys.argv[1]
    for make in (
        split_concat,
        construct_insert_erase,
        loop_accumulate,
        if_sequences,
        sequence_map,
        optionals,
    ):
        m, feeds, *given = make()
        d = os.path.join(out, m.graph.name)
        os.makedirs(d, exist_ok=True)
        onnx.save(m, os.path.join(d, "model.onnx"))
        for i, (name, v) in enumerate(feeds.items()):
            np.save(os.path.join(d, f"input_{i}_{name}.npy"), v)
        expected = given[0] if given else ReferenceEvaluator(m).run(None, feeds)
        for i, v in enumerate(expected):
            np.save(os.path.join(d, f"output_{i}.npy"), np.asarray(v))
        print(m.graph.name)


if __name__ == "__main__":
    main()
