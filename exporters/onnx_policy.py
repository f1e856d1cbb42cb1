"""The policy graph: one ONNX graph for POA steps and one-pass steps, every weight still stored once.

Running POA on part of the steps means some denoising steps run both passes and others only the dense or
only the pruned one (or one pass plus a cached difference). A policy graph has one more input than the dual
graph, ``poa_pass`` (int64, shape ``[1]``), and two outputs, ``out_sample`` and ``poa_delta``:

- ``0``: the dual graph's output (:class:`~crdiff_cli.exporters.onnx_graph.DualGraph` at the artifact's k),
  and ``e_p - e_d``;
- ``1``: the dense pass alone, and zeros;
- ``2``: the pruned pass alone, and zeros (the graph computes this for every value but 0 and 1;
  :func:`~crdiff_cli.exporters.onnx_runtime.run_session` refuses them).

Why ``If`` nodes: a branch of an ``If`` may read the outer graph's initializers, so all steps share one copy
of the weights, and a step computes only the passes it asks for. Each pass is in the graph once::

    poa:dense  = If(poa_pass != 2, dense pass, empty)
    poa:pruned = If(poa_pass != 1, pruned pass, empty)
    out_sample, poa_delta = If(poa_pass == 0, (combination, poa:pruned - poa:dense),
                               If(poa_pass == 1, (poa:dense, zeros), (poa:pruned, zeros)))

rather than one branch per kind of step holding the passes it runs: ONNX Runtime optimizes every branch on
its own, so a pass in two branches gets two sets of folded masks and prepacked weights. Measured on a 320 MB
fp32 UNet with mask folding (external weights, after running every step kind): that form 640 MB resident,
the dual graph 430 MB, this one 455 MB; its both-passes step runs as fast as the dual graph (CPU).

How it is built: the dense pass is traced with its weights, the pruned pass without (``export_params=False``:
they are graph inputs named as the dense trace's initializers), and the combination
(:class:`~crdiff_cli.exporters.onnx_graph.Combination`) on inputs named ``poa:dense`` and ``poa:pruned``. In
each branch every name its trace defines gets the branch's prefix (``dense:``, ``pruned:``, ``both:``), so
no two branches define the same name; names of the outer inputs, initializers and pass outputs stay. The
initializers are the dense trace's, the same names, dtypes, shapes and bytes as the dual graph's, so the
:func:`~crdiff_cli.exporters.onnx_artifact.initializers_sha256` of the two graphs is the same.
"""

from __future__ import annotations

from collections.abc import Callable

from crdiff_cli.exporters.onnx_graph import DELTA, OUTPUT, PASS, PASS_BOTH, PASS_DENSE, PASS_PRUNED, PASS_VALUES

_IS = {PASS_BOTH: "poa:is_both", PASS_DENSE: "poa:is_dense", PASS_PRUNED: "poa:is_pruned"}


def make_policy(model, pruned, combination) -> None:
    """Turn ``model``, the dense pass's trace (with every weight), into the policy graph, in place.

    ``pruned`` is the pruned pass's trace without weights, ``combination`` the trace of the combination. The
    initializers stay where they are (a 2 GiB graph is not copied); raises RuntimeError if the pruned trace
    reads a weight ``model`` does not store alike.
    """
    from onnx import TensorProto, helper

    graph = model.graph
    inputs = [value.name for value in graph.input]
    weights = {tensor.name: (tensor.data_type, list(tensor.dims)) for tensor in graph.initializer}
    _check_parameters(pruned.graph, inputs, weights)
    outer = {*inputs, *weights, *PASS_VALUES, PASS}
    out = graph.output[0]
    dense_value, pruned_value = PASS_VALUES
    nodes = [*_conditions(),
             _if("poa:run_dense", [dense_value], _branch(graph, "dense", outer), _empty("no_dense", out)),
             _if("poa:run_pruned", [pruned_value], _branch(pruned.graph, "pruned", outer), _empty("no_pruned", out)),
             _if(_IS[PASS_BOTH], [OUTPUT, DELTA], _branch(combination.graph, "both", outer), _one_pass(out))]
    del graph.node[:], graph.value_info[:]
    graph.node.extend(nodes)
    graph.input.append(helper.make_tensor_value_info(PASS, TensorProto.INT64, [1]))
    graph.output.append(_value(out, DELTA))


def _conditions() -> list:
    """Nodes computing ``poa:is_both``, ``poa:is_dense``, ``poa:is_pruned`` (``poa_pass`` is 0, 1, 2) and
    ``poa:run_dense``, ``poa:run_pruned`` (the step needs that pass: it is not the other pass alone)."""
    from onnx import helper

    nodes = []
    for value, name in _IS.items():
        equal = helper.make_node("Equal", [PASS, f"poa:{value}"], [name], name=name)
        nodes += [_constant(f"poa:{value}", value), equal]
    return nodes + [helper.make_node("Not", [_IS[PASS_PRUNED]], ["poa:run_dense"], name="poa:run_dense"),
                    helper.make_node("Not", [_IS[PASS_DENSE]], ["poa:run_pruned"], name="poa:run_pruned")]


def _if(condition: str, outputs: list[str], then_branch, else_branch):
    from onnx import helper

    return helper.make_node("If", [condition], outputs, name=f"{condition}:If", then_branch=then_branch,
                            else_branch=else_branch)


def _one_pass(out):
    """The both-passes ``If``'s else branch: ``(poa:dense, zeros)`` if ``poa_pass`` is 1, else the pruned pair."""
    from onnx import helper

    dense_value, pruned_value = PASS_VALUES
    outputs = [f"one:{OUTPUT}", f"one:{DELTA}"]
    node = _if(_IS[PASS_DENSE], outputs, _alone(dense_value, "dense_only", out),
               _alone(pruned_value, "pruned_only", out))
    return helper.make_graph([node], "one_pass", [], [_value(out, name) for name in outputs])


def _check_parameters(graph, inputs: list[str], weights: dict) -> None:
    """The pruned trace's parameters (its inputs beyond the UNet's) must be initializers of the dense trace."""
    params = {value.name: (value.type.tensor_type.elem_type, [d.dim_value for d in value.type.tensor_type.shape.dim])
              for value in graph.input if value.name not in inputs}
    wrong = sorted(name for name, kind in params.items() if weights.get(name) != kind)
    if wrong:
        raise RuntimeError(f"the pruned pass's trace reads weights the dense trace does not store alike: {wrong[:5]}")


def _branch(graph, prefix: str, outer: set[str]):
    """``graph``'s nodes and outputs as an ``If`` branch: every name it defines prefixed, ``outer`` names kept."""
    import onnx

    branch = onnx.GraphProto(name=prefix)
    branch.node.extend(graph.node)
    branch.output.extend(graph.output)
    branch.value_info.extend(graph.value_info)
    _rename(branch, lambda name: name if not name or name in outer else f"{prefix}:{name}")
    return branch


def _rename(graph, rename: Callable[[str], str]) -> None:
    """Apply ``rename`` to every value and node name of ``graph`` and of the graphs nested in its nodes."""
    for node in graph.node:
        for names in (node.input, node.output):
            renamed = [rename(name) for name in names]
            del names[:]
            names.extend(renamed)
        node.name = rename(node.name)
        for attribute in node.attribute:
            for nested in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                _rename(nested, rename)
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        value.name = rename(value.name)


def _alone(value: str, prefix: str, out):
    """A branch for a one-pass step: ``(value, zeros like it)``."""
    from onnx import helper

    zero = helper.make_tensor("zero", out.type.tensor_type.elem_type, [1], [0])
    nodes = [helper.make_node("Identity", [value], [f"{prefix}:{OUTPUT}"], name=f"{prefix}:Identity"),
             helper.make_node("Shape", [value], [f"{prefix}:shape"], name=f"{prefix}:Shape"),
             helper.make_node("ConstantOfShape", [f"{prefix}:shape"], [f"{prefix}:{DELTA}"],
                              name=f"{prefix}:ConstantOfShape", value=zero)]
    return helper.make_graph(nodes, prefix, [], [_value(out, f"{prefix}:{OUTPUT}"), _value(out, f"{prefix}:{DELTA}")])


def _empty(prefix: str, out):
    """A branch for a pass a step does not run: an empty tensor (all dimensions 0) of the output's type and rank."""
    from onnx import TensorProto, helper

    dtype, rank = out.type.tensor_type.elem_type, len(out.type.tensor_type.shape.dim)
    shape = helper.make_tensor(f"{prefix}:shape", TensorProto.INT64, [rank], [0] * rank)
    nodes = [helper.make_node("Constant", [], [f"{prefix}:shape"], name=f"{prefix}:shape", value=shape),
             helper.make_node("ConstantOfShape", [f"{prefix}:shape"], [f"{prefix}:empty"], name=f"{prefix}:empty",
                              value=helper.make_tensor("zero", dtype, [1], [0]))]
    return helper.make_graph(nodes, prefix, [], [helper.make_tensor_value_info(f"{prefix}:empty", dtype, [0] * rank)])


def _value(out, name: str):
    """``out``'s type and shape under another name."""
    import onnx

    value = onnx.ValueInfoProto()
    value.CopyFrom(out)
    value.name = name
    return value


def _constant(name: str, value: int):
    from onnx import TensorProto, helper

    tensor = helper.make_tensor(name, TensorProto.INT64, [1], [value])
    return helper.make_node("Constant", [], [name], name=name, value=tensor)
