"""The precision audit: what an exported graph really computes in, read from the graph, checked against the plan.

`audit(model.onnx, plan)` walks the graph with inferred dtypes and finds every MatMul/Gemm/Conv and
the format of the DequantizeLinear feeding each operand, every Softmax, normalization
(LayerNormalization, Instance/GroupNormalization, BatchNormalization, the RMSNorm pattern ReduceMean(x²)…Sqrt/Reciprocal) and rotary pattern with the
dtype it computes in, the attention matmuls with and without Q/DQ, and Casts that narrow a protected
op's input. Against a plan it checks that each planned layer has Q/DQ of its format, that no layer
the plan left alone is quantized, and that every protected op computes in FP32. `PrecisionAudit`
is truthy when there is no violation.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import onnx

from quantkit.export.graph import (
    COMPUTE_OPS, DQ_OPS, FLOAT, FLOAT_TYPES, FP4_DYNAMIC_OPS, PASS_THROUGH_OPS, Q_OPS, QUANT_FORMATS, GraphIndex,
    attribute, dtype_name, within_scope,
)

_OPERAND_THROUGH = PASS_THROUGH_OPS | {"Cast", "Mul"}  # Mul: a scale moved between DQ and MatMul (FP8 exporter)
_NARROW = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
FP8_SOFTMAX_SCALE = 1.0 / 448.0


@dataclasses.dataclass
class PrecisionAudit:
    """The audit of one graph. Truthy when it has no violation."""

    path: str
    counts: dict[str, Any]
    compute: list[dict[str, Any]]
    softmax: list[dict[str, Any]]
    norms: list[dict[str, Any]]
    rope: list[dict[str, Any]]
    attention: list[dict[str, Any]]
    narrowing_casts: list[dict[str, Any]]
    exporter_added: list[str]
    violations: list[str]
    checked_against_plan: bool
    # Planned quantized layers with no node in the graph: no graph output depends on them (e.g. a
    # pooler when only last_hidden_state is exported), so the exporter removed them.
    planned_but_absent: list[str] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return not self.violations

    @property
    def passed(self) -> bool:
        return bool(self)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passed"] = self.passed
        return d


# ---------------------------------------------------------------------------------------------
# graph reading


def _format_of_dq(index: GraphIndex, dq: onnx.NodeProto) -> str | None:
    """fp8 / int8 / nvfp4 for the element type a DequantizeLinear dequantizes."""
    src = dq.input[0]
    producer = index.producer.get(src)
    if producer is not None and producer.op_type in FP4_DYNAMIC_OPS:
        return "nvfp4"
    elem = index.dtype(src)
    if elem is None and producer is not None and producer.op_type in Q_OPS:
        elem = index.dtype(producer.output[0])
    return QUANT_FORMATS.get(elem)


def _operand(index: GraphIndex, tensor: str) -> dict[str, Any]:
    """What feeds one input of a compute op: the DQ (through data-movement ops), its format, weight or not."""
    node = index.producer.get(tensor)
    hops = 0
    while node is not None and node.op_type in _OPERAND_THROUGH and hops < 12:
        if node.op_type == "Mul":
            data = [i for i in node.input if not index.is_constant(i)]
            if len(data) != 1:
                break
            nxt = data[0]
        else:
            nxt = node.input[0]
        node = index.producer.get(nxt)
        hops += 1
    if node is not None and node.op_type in DQ_OPS:
        fmt = _format_of_dq(index, node)
        return {"format": fmt, "dq": node.name, "constant": index.is_constant(node.input[0]), "dtype": dtype_name(index.dtype(tensor))}
    return {"format": None, "dq": None, "constant": index.is_constant(tensor), "dtype": dtype_name(index.dtype(tensor))}


def _compute_nodes(index: GraphIndex) -> list[dict[str, Any]]:
    rows = []
    for node in index.nodes:
        if node.op_type not in COMPUTE_OPS:
            continue
        a = _operand(index, node.input[0])
        b = _operand(index, node.input[1]) if len(node.input) > 1 else {"format": None, "constant": False}
        if node.op_type in ("Conv", "ConvTranspose") or b["constant"] or not a["constant"]:
            act, weight = a, b
        else:
            act, weight = b, a
        activation_only = not weight.get("constant") and not act.get("constant")
        rows.append({
            "node": node.name, "op": node.op_type, "module": index.module_of(node),
            "weights": weight.get("format"), "activations": act.get("format"),
            "kind": "activation-activation" if activation_only else "weight",
            "operands": [a.get("format"), b.get("format")],
            "dtype": dtype_name(index.dtype(node.output[0])),
        })
    return rows


def _narrowing_cast_upstream(index: GraphIndex, tensor: str) -> onnx.NodeProto | None:
    node = index.producer.get(tensor)
    hops = 0
    while node is not None and hops < 6:
        if node.op_type == "Cast":
            to = int(attribute(node, "to", 0))
            src = index.dtype(node.input[0])
            if to in _NARROW and src not in _NARROW:
                return node
            return None
        if node.op_type not in PASS_THROUGH_OPS | {"Add", "Sub", "Mul", "Div", "Where"}:
            return None
        node = index.producer.get(node.input[0])
        hops += 1
    return None


def _softmaxes(index: GraphIndex) -> list[dict[str, Any]]:
    rows = []
    for node in index.nodes:
        if node.op_type == "Softmax":
            dtype = index.dtype(node.input[0])
            cast = _narrowing_cast_upstream(index, node.input[0]) if dtype != FLOAT else None
            rows.append({"node": node.name, "module": index.module_of(node), "dtype": dtype_name(dtype),
                         "narrowed_by": cast.name if cast is not None else None})
    return rows


def _is_square(index: GraphIndex, node: onnx.NodeProto | None) -> str | None:
    """The tensor squared by `node` (Pow(x, 2) or Mul(x, x)), else None."""
    if node is None:
        return None
    if node.op_type == "Pow" and len(node.input) > 1:
        value = index.constant_value(node.input[1])
        if value is not None and value.size == 1 and float(value.reshape(-1)[0]) == 2.0:
            return node.input[0]
    if node.op_type == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1]:
        return node.input[0]
    return None


def _downstream(index: GraphIndex, tensor: str, ops: set[str], depth: int = 4) -> list[onnx.NodeProto]:
    found, frontier = [], [tensor]
    for _ in range(depth):
        nxt = []
        for t in frontier:
            for c in index.consumers.get(t, []):
                if c.op_type in ops:
                    found.append(c)
                nxt.extend(c.output)
        frontier = nxt
    return found


# torch exports GroupNorm as Reshape -> InstanceNormalization -> Reshape -> affine (opset 9 symbolic).
_NORM_OPS = {"LayerNormalization": "layernorm", "RMSNormalization": "rmsnorm", "SimplifiedLayerNormalization": "rmsnorm",
             "InstanceNormalization": "groupnorm", "GroupNormalization": "groupnorm",
             "BatchNormalization": "batchnorm"}


def _norms(index: GraphIndex) -> list[dict[str, Any]]:
    rows = []
    for node in index.nodes:
        if node.op_type in _NORM_OPS:
            dtype = index.dtype(node.input[0])
            cast = _narrowing_cast_upstream(index, node.input[0]) if dtype != FLOAT else None
            kind = _NORM_OPS[node.op_type]
            rows.append({"node": node.name, "module": index.module_of(node), "kind": kind, "pattern": node.op_type,
                         "dtype": dtype_name(dtype), "narrowed_by": cast.name if cast is not None else None})
        elif node.op_type == "ReduceMean":
            squared = _is_square(index, index.producer.get(node.input[0]))
            if squared is None:
                continue
            tail = _downstream(index, node.output[0], {"Sqrt", "Reciprocal", "Div"})
            if not tail:
                continue
            sub = index.producer.get(squared)
            kind = "layernorm" if sub is not None and sub.op_type == "Sub" else "rmsnorm"
            chain = [index.producer[node.input[0]], node, *tail]
            dtypes = {dtype_name(index.dtype(n.output[0])) for n in chain}
            dtype = index.dtype(squared)
            worst = dtype if all(index.dtype(n.output[0]) == dtype for n in chain) else next(
                (index.dtype(n.output[0]) for n in chain if index.dtype(n.output[0]) != FLOAT), dtype)
            cast = _narrowing_cast_upstream(index, squared) if worst != FLOAT else None
            rows.append({"node": node.name, "module": index.module_of(node), "kind": kind,
                         "pattern": "ReduceMean(x^2)...Sqrt/Reciprocal", "dtype": dtype_name(worst),
                         "dtypes": sorted(dtypes), "narrowed_by": cast.name if cast is not None else None})
    return rows


def _ropes(index: GraphIndex) -> list[dict[str, Any]]:
    """rotate_half(x) = Concat(-x2, x1); RoPE = x*cos + rotate_half(x)*sin: Neg -> Concat -> Mul -> Add."""
    rows = []
    for node in index.nodes:
        if node.op_type != "Neg":
            continue
        for concat in _downstream(index, node.output[0], {"Concat"}, depth=2):
            for mul in _downstream(index, concat.output[0], {"Mul"}, depth=2):
                for add in _downstream(index, mul.output[0], {"Add"}, depth=1):
                    dtype = index.dtype(add.output[0])
                    mul_types = {index.dtype(i) for i in mul.input if index.dtype(i) in FLOAT_TYPES}
                    worst = dtype if dtype != FLOAT else next((t for t in mul_types if t != FLOAT), FLOAT)
                    cast = _narrowing_cast_upstream(index, concat.output[0]) if worst != FLOAT else None
                    rows.append({"node": add.name, "module": index.module_of(add), "dtype": dtype_name(worst),
                                 "narrowed_by": cast.name if cast is not None else None})
    for node in index.nodes:  # the cos/sin tables of a rotary-embedding module
        if node.op_type in ("Cos", "Sin"):
            rows.append({"node": node.name, "module": index.module_of(node), "dtype": dtype_name(index.dtype(node.input[0])),
                         "narrowed_by": None, "table": True})
    seen, out = set(), []
    for r in rows:
        if r["node"] not in seen:
            seen.add(r["node"])
            out.append(r)
    return out


def _exporter_added_qdq(index: GraphIndex) -> dict[str, str]:
    """Q/DQ that ModelOpt's FP8 exporter inserts after a Softmax (fixed scale 1/448), by DQ name -> Softmax."""
    out = {}
    for node in index.nodes:
        if node.op_type not in Q_OPS:
            continue
        producer = index.producer.get(node.input[0])
        if producer is None or producer.op_type != "Softmax" or not node.name.startswith(producer.name + "/"):
            continue
        scale = index.constant_value(node.input[1])
        if scale is None or abs(float(scale.reshape(-1)[0]) - FP8_SOFTMAX_SCALE) > 1e-9:
            continue
        for dq in index.consumers.get(node.output[0], []):
            if dq.op_type in DQ_OPS:
                out[dq.name] = producer.name
    return out


# ---------------------------------------------------------------------------------------------
# the plan


def _check_plan(plan: Mapping[str, Any], compute: list[dict], softmax: list[dict], norms: list[dict],
                rope: list[dict], exporter_added: dict[str, str], index: GraphIndex) -> tuple[list[str], list[dict]]:
    violations: list[str] = []
    absent: list[str] = []
    layers = {row["name"]: row for row in plan.get("layers", [])}
    by_module: dict[str, list[dict]] = {}
    for row in compute:
        by_module.setdefault(row["module"], []).append(row)

    for name, row in layers.items():
        if row.get("kind") not in ("linear", "conv"):
            continue
        nodes = [c for c in compute if c["kind"] == "weight" and (c["module"] == name)]
        want_w, want_a = row.get("weights"), row.get("activations")
        if want_w or want_a:
            if not nodes:
                absent.append(name)  # its output feeds no graph output: the exporter dropped it as dead code
                continue
            for c in nodes:
                if want_w and c["weights"] != want_w:
                    violations.append(f"{name}: planned {want_w} weights, but {c['op']} '{c['node']}' has "
                                      f"{c['weights'] or 'unquantized'} weights (no {want_w} DequantizeLinear)")
                if want_a and c["activations"] != want_a:
                    violations.append(f"{name}: planned {want_a} activations, but {c['op']} '{c['node']}' has "
                                      f"{c['activations'] or 'unquantized'} activations")
        else:
            for c in nodes:
                if c["weights"] or c["activations"]:
                    violations.append(f"{name}: the plan leaves it unquantized ({row.get('precision')}), but "
                                      f"{c['op']} '{c['node']}' has {c['weights'] or c['activations']} Q/DQ")

    # Quantized weight matmuls that belong to no planned layer.
    for c in compute:
        if c["kind"] == "weight" and (c["weights"] or c["activations"]) and c["module"] not in layers:
            violations.append(f"{c['op']} '{c['node']}' is quantized ({c['weights'] or c['activations']}) but its "
                              f"module '{c['module']}' is not a layer of the plan")

    # Attention matmuls.
    attention_rows = []
    conversions = plan.get("attention", [])
    for c in compute:
        if c["kind"] != "activation-activation":
            continue
        # The innermost conversion holding the matmul; "" is attention computed by the model's top module.
        entry = max((a for a in conversions if a.get("name") == "" or within_scope(c["module"], a.get("name", ""))),
                    key=lambda a: len(a.get("name", "")), default=None)
        added = [fmt for fmt in c["operands"] if fmt]
        exporter = any(dq for dq in exporter_added if _operand_dq_is(index, c["node"], dq))
        row = {"node": c["node"], "module": c["module"], "operands": c["operands"], "dtype": c["dtype"],
               "attention": entry.get("name") if entry else None, "quantized": bool(added),
               "exporter_added_qdq": exporter}
        attention_rows.append(row)
        if entry and entry.get("converted") and entry.get("quantizers"):
            if not added:
                violations.append(f"attention {entry['name']}: converted with quantizers "
                                  f"{sorted(entry['quantizers'])}, but MatMul '{c['node']}' has no Q/DQ")
        elif added and not exporter:
            violations.append(f"MatMul '{c['node']}' has {'/'.join(added)} Q/DQ but the plan quantizes no attention "
                              f"matmul there")

    # Protected ops compute in FP32.
    protected = plan.get("protected", [])
    ops = Counter(p.get("op") for p in protected)

    def guarded(module: str, op: str) -> bool:
        for p in protected:
            if p.get("op") != op:
                continue
            name = p.get("name", "")
            if ":" in name:  # a protected function: applies wherever its pattern appears
                return True
            if within_scope(module, name) or module == name:
                return True
        return False

    checks = [("softmax", softmax, "Softmax")]
    checks += [("layernorm", [n for n in norms if n["kind"] == "layernorm"], "normalization")]
    checks += [("rmsnorm", [n for n in norms if n["kind"] == "rmsnorm"], "RMSNorm")]
    checks += [(kind, [n for n in norms if n["kind"] == kind], kind) for kind in ("groupnorm", "batchnorm")]
    checks += [("rope", rope, "rotary")]
    for op, rows, label in checks:
        if not ops.get(op):
            continue
        for r in rows:
            if r["dtype"] != "float32" and guarded(r["module"], op):
                why = f"; Cast '{r['narrowed_by']}' narrows its input" if r.get("narrowed_by") else ""
                violations.append(f"protected {op} '{r['node']}' ({r['module']}) computes in {r['dtype']}, not float32{why}")
    return violations, attention_rows, absent


def _plan_module_names(plan: Mapping[str, Any] | None) -> list[str]:
    """The module names a plan knows (layers, protections, attention): graph scopes resolve to them."""
    if not plan:
        return []
    names = [row.get("name", "") for row in plan.get("layers", [])]
    names += [p.get("name", "") for p in plan.get("protected", []) if ":" not in p.get("name", "")]
    names += [a.get("name", "") for a in plan.get("attention", [])]
    return [n for n in names if n]


def _operand_dq_is(index: GraphIndex, node_name: str, dq_name: str) -> bool:
    node = next((n for n in index.nodes if n.name == node_name), None)
    if node is None:
        return False
    return any(_operand(index, t).get("dq") == dq_name for t in node.input[:2])


# ---------------------------------------------------------------------------------------------
# entry points


def audit(onnx_path: str | os.PathLike | onnx.ModelProto, plan_dict: Mapping[str, Any] | None = None) -> PrecisionAudit:
    """Audit a graph (a path: external data is not loaded) against an optional plan (plan.json content)."""
    if isinstance(onnx_path, onnx.ModelProto):
        model, label = onnx_path, "<model>"
    else:
        model, label = load_graph(onnx_path), os.fspath(onnx_path)
    if plan_dict is not None:
        check_plan_shape(plan_dict, label)
    index = GraphIndex.build(model, module_names=_plan_module_names(plan_dict))
    compute = _compute_nodes(index)
    softmax, norms, rope = _softmaxes(index), _norms(index), _ropes(index)
    exporter_added = _exporter_added_qdq(index)

    by_format: dict[str, Counter] = {}
    for c in compute:
        fmt = c["weights"] or c["activations"] or next((f for f in c["operands"] if f), None) or "unquantized"
        by_format.setdefault(fmt, Counter())[c["op"]] += 1
    narrowing = []
    for node in index.nodes:
        if node.op_type == "Cast" and int(attribute(node, "to", 0)) in _NARROW and index.dtype(node.input[0]) == FLOAT:
            targets = {c.op_type for c in index.consumers.get(node.output[0], [])}
            protected_ops = targets & {"Softmax", "LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Reciprocal",
                                       "InstanceNormalization", "GroupNormalization", "BatchNormalization"}
            if protected_ops:
                narrowing.append({"node": node.name, "to": dtype_name(int(attribute(node, "to"))),
                                  "feeds": sorted(protected_ops)})

    violations: list[str] = []
    absent: list[str] = []
    attention_rows = [{"node": c["node"], "module": c["module"], "operands": c["operands"], "dtype": c["dtype"],
                       "attention": None, "quantized": any(c["operands"]),
                       "exporter_added_qdq": False} for c in compute if c["kind"] == "activation-activation"]
    if plan_dict is not None:
        violations, attention_rows, absent = _check_plan(plan_dict, compute, softmax, norms, rope, exporter_added, index)
    exporter_notes = sorted({f"FP8 Q/DQ (scale 1/448) after Softmax '{s}' added by ModelOpt's FP8 exporter"
                             for s in exporter_added.values()})
    counts = {
        "compute_by_format": {fmt: dict(ops) for fmt, ops in sorted(by_format.items())},
        "compute_nodes": len(compute),
        "qdq": {"QuantizeLinear": sum(1 for n in index.nodes if n.op_type in Q_OPS),
                "DequantizeLinear": sum(1 for n in index.nodes if n.op_type in DQ_OPS),
                "TRT_FP4DynamicQuantize": sum(1 for n in index.nodes if n.op_type in FP4_DYNAMIC_OPS)},
        "softmax": dict(Counter(r["dtype"] for r in softmax)),
        "norms": dict(Counter(f"{r['kind']}:{r['dtype']}" for r in norms)),
        "rope": dict(Counter(r["dtype"] for r in rope if not r.get("table"))),
        "attention_matmuls": {"with_qdq": sum(1 for r in attention_rows if r["quantized"]),
                              "without_qdq": sum(1 for r in attention_rows if not r["quantized"])},
        "casts": sum(1 for n in index.nodes if n.op_type == "Cast"),
    }
    return PrecisionAudit(path=label, counts=counts, compute=compute, softmax=softmax, norms=norms, rope=rope,
                          attention=attention_rows, narrowing_casts=narrowing, exporter_added=exporter_notes,
                          violations=violations, checked_against_plan=plan_dict is not None,
                          planned_but_absent=absent)


MAX_GRAPH_BYTES = 2 << 30  # protobuf's own limit: larger weights live in external data


def load_graph(path: str | os.PathLike) -> onnx.ModelProto:
    """The graph at `path` without its weights, refused (InputError naming the file) when it is not
    ONNX, is truncated, or names external weights that are missing or lie outside its folder."""
    from quantkit.errors import InputError
    from quantkit.textlimits import first_line

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such ONNX file")
    size = path.stat().st_size
    if size > MAX_GRAPH_BYTES:
        raise InputError(f"{path}: {size} bytes is over protobuf's 2 GiB limit; not an ONNX graph quantkit reads")
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends for a file that is not (all) ONNX
        raise InputError(f"{path}: not a readable ONNX graph (truncated or another format: {type(e).__name__}: "
                         f"{first_line(e)})") from None
    if not model.graph.node and not model.graph.input and not model.graph.output:
        raise InputError(f"{path}: not an ONNX graph (it parses as an empty model: truncated or another format)")
    check_external_data(model, path)
    return model


def check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Every external weight lives in a file inside the graph's folder that is long enough to hold it."""
    from quantkit.errors import InputError
    from quantkit.textlimits import shorten

    folder = path.resolve().parent
    for tensor in _all_initializers(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entry = {e.key: e.value for e in tensor.external_data}
        location = entry.get("location", "")
        target = (folder / location).resolve()
        if not location or os.path.isabs(location) or folder not in target.parents:
            raise InputError(f"{path}: initializer {shorten(tensor.name)} keeps its data at {shorten(location)}, "
                             f"outside the graph's folder {folder}; quantkit reads external weights only from beside "
                             "the graph")
        if not target.is_file():
            raise InputError(f"{path}: initializer {shorten(tensor.name)} needs the external data file "
                             f"{shorten(location)}, which is missing (copy it beside the graph)")
        try:
            end = int(entry.get("offset", 0) or 0) + int(entry.get("length", 0) or 0)
        except ValueError:
            raise InputError(f"{path}: initializer {shorten(tensor.name)}: external data offset/length are not "
                             "numbers") from None
        if end > target.stat().st_size:
            raise InputError(f"{path}: initializer {shorten(tensor.name)} reads bytes up to {end} of {location}, "
                             f"which holds {target.stat().st_size}: the external data is truncated")


def _all_initializers(model: onnx.ModelProto):
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        yield from g.initializer
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    graphs.append(a.g)
                graphs.extend(a.graphs)


def check_plan_shape(plan: Any, label: str) -> None:
    """plan.json is a mapping whose `layers` (and protections/attention) are lists of mappings."""
    from quantkit.errors import InputError

    if not isinstance(plan, Mapping):
        raise InputError(f"{label}: the plan to audit against is a JSON {type(plan).__name__}, not an object with "
                         "`layers` (pass the plan.json of the run, or --no-plan)")
    for key in ("layers", "protected", "protections", "attention"):
        value = plan.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, Mapping) for v in value)):
            raise InputError(f"{label}: the plan's `{key}` must be a list of objects (is the plan.json from quantkit?)")


def read_plan(path: str | os.PathLike) -> dict[str, Any]:
    """plan.json, bounded and checked (check_plan_shape)."""
    from quantkit.textlimits import read_json_limited

    plan = read_json_limited(path, "plan")
    check_plan_shape(plan, os.fspath(path))
    return plan


def write_audit(result: PrecisionAudit, path: str | os.PathLike) -> Path:
    from quantkit.outdir import atomic_write_json

    return atomic_write_json(path, result.to_dict())


def print_audit(result: PrecisionAudit) -> None:
    from quantkit import console

    rows = [(fmt, ", ".join(f"{op} {n}" for op, n in ops.items())) for fmt, ops in result.counts["compute_by_format"].items()]
    att = result.counts["attention_matmuls"]
    rows.append(("attention matmuls", f"{att['with_qdq']} with Q/DQ, {att['without_qdq']} without"))
    rows.append(("softmax", ", ".join(f"{k} {v}" for k, v in result.counts["softmax"].items()) or "none"))
    rows.append(("norms", ", ".join(f"{k} {v}" for k, v in result.counts["norms"].items()) or "none"))
    rows.append(("rope", ", ".join(f"{k} {v}" for k, v in result.counts["rope"].items()) or "none"))
    console.show(console.rows_table(f"precision audit of {result.path}", ("what", "nodes"), rows))
    for note in result.exporter_added:
        console.info(note)
    if result.planned_but_absent:
        console.info(f"not in the graph (no output depends on them): {', '.join(result.planned_but_absent)}")
    if result.violations:
        console.warn(f"{len(result.violations)} violation(s):")
        for v in result.violations:
            console.warn(f"  {v}")
    else:
        console.info("audit passed" + (" (checked against the plan)" if result.checked_against_plan else ""))
