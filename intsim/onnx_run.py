"""Executing and inspecting exported graphs: the ``onnx`` level of ``intsim run``, the qonnx
executor for the QONNX flavour, and ``intsim inspect model.onnx``.

    from intsim.onnx_run import run_qonnx
    logits = run_qonnx("model_qonnx.onnx", images)     # qonnx.core.onnx_exec.execute_onnx, node by node

The exporter is ``intsim.onnx_export``; this module adds what the command line needs around it
(dependency checks that fail before any work, the temporary export of ``intsim run --onnx``, the
comparison with the engine, the readable summary of a ``.onnx`` file).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .onnx_export import INPUT, OUTPUT, build_onnx, run_onnx, session, summary


def require(qonnx: bool = False, what: str = "this command") -> None:
    """Raise ``UserError`` (exit 2, one line) unless onnx and onnxruntime (and qonnx) import."""
    names = ["onnx", "onnxruntime"] + (["qonnx"] if qonnx else [])
    for name in names:
        try:
            __import__(name)
        except ImportError as e:
            raise UserError(f"{what} needs {' and '.join(names)} (pip install 'intsim[onnx]'): {e}") from None


# ---- the qonnx executor ----------------------------------------------------------------------

def run_qonnx(model: Any, images: np.ndarray) -> np.ndarray:
    """int64 logits (B, classes) of an exported graph (either flavour, a path or a ``ModelProto``)
    executed by the qonnx package's own executor (``execute_onnx`` on a ``ModelWrapper``: each
    standard node in its own onnxruntime session, ``MultiThreshold`` by qonnx's numpy code).

    qonnx's executor needs every tensor shape fixed, so the batch dimension is set to ``len(images)``
    and shapes are inferred (``InferShapes``) before the run; one run for the whole batch (the cost
    is per node, not per image)."""
    import onnx
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    m = onnx.load(str(model)) if isinstance(model, (str, os.PathLike)) else model
    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    for vi in (m2.graph.input[0], m2.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_value = len(images)
    w = ModelWrapper(m2).transform(InferShapes())
    out = execute_onnx(w, {INPUT: np.ascontiguousarray(images, dtype=np.uint8)})[OUTPUT]
    return np.asarray(out, dtype=np.int64)


# ---- the fifth level of ``intsim run`` ------------------------------------------------------------

@dataclass
class _Logits:
    logits: np.ndarray
    counts: dict | None = None


class OnnxLevel:
    """The exported program (standard flavour) in onnxruntime, as a level of ``intsim run``.

    The graph is built in memory (``build_onnx``, the model ``intsim export`` serializes) and handed
    to onnxruntime as those bytes, so the level evaluates exactly what ``intsim export`` writes.
    Calling it on a batch returns an object with ``.logits`` (int64) like the engine's results."""

    def __init__(self, prog, batch_size: int = 64):
        m = build_onnx(prog)
        self.info, self.sess = summary(m), session(m)
        self.batch_size = batch_size

    def __call__(self, images: np.ndarray) -> _Logits:
        return _Logits(run_onnx(self.sess, images, self.batch_size))


def engine_vs_onnx(evaluation, level: OnnxLevel | None = None) -> dict | None:
    """Logits that differ between the ``onnx`` level and the engine on the images both ran (the
    ``onnx`` level may run on a prefix, ``--onnx-images``), as ``engine_vs_golden`` does; with the
    ``level``, also the exported graph's node and initializer figures."""
    L = evaluation.levels
    if "onnx" not in L or "engine" not in L:
        return None
    n = L["onnx"].images
    e, o = L["engine"].int_logits[:n], L["onnx"].int_logits
    out = {"images": n, "logits_compared": int(o.size), "logits_differing": int((e != o).sum()),
           "max_abs_diff": int(np.abs(e - o).max()) if o.size else 0}
    if level is not None:
        out["graph"] = {k: level.info[k] for k in ("nodes", "initializers", "initializer_bytes", "opset")}
        out["graph"]["node_count"] = sum(level.info["nodes"].values())
    return out


def format_engine_vs_onnx(r: dict) -> str:
    return (f"engine vs onnxruntime: {r['logits_differing']} of {r['logits_compared']} logits differ "
            f"(exported graph on the first {r['images']} images)")


# ---- intsim inspect model.onnx ------------------------------------------------------------------

def is_onnx_path(path: str | os.PathLike) -> bool:
    """Whether ``intsim inspect`` treats ``path`` as an ONNX graph (its name ends in ``.onnx``)."""
    return Path(path).suffix.lower() == ".onnx"


def load_onnx(path: str | os.PathLike):
    """The ``ModelProto`` at ``path``, checked; any unreadable, truncated or invalid file is a
    ``UserError`` with one line."""
    import onnx
    p = Path(path)
    if not p.is_file():
        raise UserError(f"cannot read {p}: no such file")
    try:
        m = onnx.load(str(p))
    except Exception as e:                                   # protobuf DecodeError and friends
        raise UserError(f"{p} is not a readable ONNX model ({type(e).__name__}: {e})") from None
    if not m.graph.node or not m.opset_import:
        raise UserError(f"{p} is not a readable ONNX model (no graph nodes or no opset)")
    try:
        onnx.checker.check_model(m)
    except Exception as e:
        raise UserError(f"{p} is not a valid ONNX model: {e}") from None
    return m


def inspect_onnx(path: str | os.PathLike) -> dict[str, Any]:
    """``summary`` of the model at ``path`` plus its inputs, outputs and node count."""
    m = load_onnx(path)
    info = summary(m)

    def io(vi):
        t = vi.type.tensor_type
        import onnx
        return {"name": vi.name, "type": onnx.TensorProto.DataType.Name(t.elem_type).lower(),
                "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}

    info.update({"file": str(path), "bytes": Path(path).stat().st_size, "graph": m.graph.name,
                 "producer": m.producer_name, "ir_version": int(m.ir_version),
                 "inputs": [io(v) for v in m.graph.input], "outputs": [io(v) for v in m.graph.output],
                 "node_count": len(m.graph.node)})
    return info


def format_inspect(info: dict[str, Any]) -> str:
    def shape(v):
        return f"{v['name']} {v['type']} ({', '.join(map(str, v['shape']))})"

    lines = [f"{info['file']}: ONNX graph {info['graph']!r} ({info['bytes'] / 1e6:.2f} MB), flavour {info['flavor']}, "
             f"producer {info['producer'] or '?'}, IR version {info['ir_version']}",
             "opset: " + ", ".join(f"{d} {v}" for d, v in info["opset"].items()),
             "inputs: " + "; ".join(shape(v) for v in info["inputs"]),
             "outputs: " + "; ".join(shape(v) for v in info["outputs"])]
    meta = {k: v for k, v in info["metadata"].items() if k != "intsim.flavor"}
    if meta:
        lines.append("metadata: " + ", ".join(f"{k}={v}" for k, v in meta.items()))
    lines.append(f"{info['node_count']} nodes, {info['initializers']} initializers ({info['initializer_bytes']} bytes)")
    w = max(len(k) for k in info["nodes"])
    lines += [f"  {k.ljust(w)}  {n}" for k, n in info["nodes"].items()]
    return "\n".join(lines)


__all__ = ["require", "run_qonnx", "OnnxLevel", "engine_vs_onnx", "format_engine_vs_onnx", "is_onnx_path",
           "load_onnx", "inspect_onnx", "format_inspect"]
