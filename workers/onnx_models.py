"""ONNX submissions: a graph read as data, checked operator by operator, run as torch.

An ONNX file is a protobuf: parsing it runs no code of the submitter's. It is turned
into a torch module by onnx2torch, so white-box attacks get gradients exactly as they
do from a built-in architecture. What the graph may contain is an allow-list of plain
tensor operators from the default ONNX domain: no custom domains (they name code that
would have to be installed), no control flow or subgraphs (If, Loop, Scan), no random
operators (they would make the model randomized behind the evaluator's back), and no
external data (tensor data stored in other files, named by a path the submitter
chooses). Anything else is refused before conversion, naming the operator.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from gauntlet.cluster.errors import GauntletError

ARCH = "onnx"

# Operators onnx2torch converts to plain torch code, enough for CNNs, MLPs and ViTs.
ALLOWED_OPERATORS = frozenset(
    {
        "Add", "AveragePool", "BatchNormalization", "Clip", "Concat", "Constant", "Conv",
        "Div", "Erf", "Flatten", "Gemm", "GlobalAveragePool", "Identity",
        "LayerNormalization", "LeakyRelu", "MatMul", "MaxPool", "Mul", "Pad", "Pow",
        "ReduceMean", "Relu", "Reshape", "Sigmoid", "Softmax", "Sqrt", "Squeeze", "Sub",
        "Tanh", "Transpose", "Unsqueeze",
    }
)  # fmt: skip
# A graph larger than this is not a classifier we can attack in reasonable time, and a
# huge node list only costs the submit check memory.
MAX_NODES = 10_000
# onnx2torch converts operator versions up to this opset; newer graphs are re-exported.
MAX_OPSET = 17


def is_onnx(path: str | os.PathLike, arch: str | None) -> bool:
    return arch == ARCH or Path(path).suffix.lower() == ".onnx"


def _load(path: Path):
    import onnx

    try:
        # load_external_data=False: never open a file the graph names.
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError types
        raise GauntletError(f"{path} is not a readable ONNX file: {exc}") from None


def check_onnx(path: str | os.PathLike, max_parameters: int):
    """Check the graph against the allow-list and caps; return the parsed model."""
    path = Path(path)
    model = _load(path)
    graph = model.graph
    for opset in model.opset_import:
        if opset.domain not in ("", "ai.onnx"):
            raise GauntletError(
                f"{path}: operator domain {opset.domain!r} is not accepted; only standard "
                "ONNX operators are"
            )
        if opset.version > MAX_OPSET:
            raise GauntletError(
                f"{path}: opset {opset.version} is newer than the {MAX_OPSET} gauntlet "
                f"converts; export with opset_version={MAX_OPSET}"
            )
    if len(graph.node) > MAX_NODES:
        raise GauntletError(
            f"{path}: the graph has {len(graph.node):,} nodes, above the cap of {MAX_NODES:,}"
        )
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ALLOWED_OPERATORS:
            raise GauntletError(
                f"{path}: operator {node.op_type!r} (node {node.name!r}) is not accepted; "
                f"ONNX submissions may use {', '.join(sorted(ALLOWED_OPERATORS))}"
            )
        if any(attr.g.node or attr.graphs for attr in node.attribute):
            raise GauntletError(f"{path}: node {node.name!r} holds a subgraph, not accepted")
    for tensor in graph.initializer:
        if tensor.data_location == tensor.EXTERNAL or tensor.external_data:
            raise GauntletError(
                f"{path}: tensor {tensor.name!r} keeps its data in another file; save the "
                "model as one file (no external data)"
            )
    count = sum(_numel(t.dims) for t in graph.initializer)
    if count > max_parameters:
        raise GauntletError(
            f"{path}: the graph has {count:,} parameters, above the cap of "
            f"{max_parameters:,} (GAUNTLET_MAX_PARAMETERS)"
        )
    if len(graph.input) - _initializer_inputs(graph) != 1 or len(graph.output) != 1:
        raise GauntletError(f"{path}: a classifier graph takes one input and gives one output")
    return model


def _numel(dims) -> int:
    total = 1
    for d in dims:
        total *= int(d)
    return total


def _initializer_inputs(graph) -> int:
    # Old exporters list initializers among the inputs too; they are not data inputs.
    names = {t.name for t in graph.initializer}
    return sum(i.name in names for i in graph.input)


def load_onnx(path: str | os.PathLike, max_parameters: int = 500_000_000) -> nn.Module:
    """The checked graph as a torch module (the caller wraps, freezes and test-runs it)."""
    from onnx2torch import convert

    model = check_onnx(path, max_parameters)
    try:
        net = convert(model)
    except Exception as exc:  # onnx2torch raises NotImplementedError and others
        raise GauntletError(f"{path}: cannot convert the ONNX graph to torch: {exc}") from None
    # Conversion gives float32 modules; a float16 export would break the float32 rule.
    return net.float()


def forward_check(net: nn.Module, shape: tuple[int, ...]) -> None:
    """A graph that cannot run a batch of 2 (a batch size fixed at export) is refused."""
    try:
        with torch.no_grad():
            net(torch.zeros((2, *shape[1:])))
    except Exception as exc:
        raise GauntletError(
            f"the ONNX graph fails on a batch of 2 inputs of shape {shape[1:]}: {exc}; export "
            "it with a dynamic batch axis (dynamic_axes={'input': {0: 'batch'}})"
        ) from None
