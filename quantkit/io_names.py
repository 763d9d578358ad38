"""The names a graph gives the model's outputs.

An ONNX value has one name, so an output named like an input (diffusers' UNet2DConditionModel:
`sample` in, `sample` out) cannot keep its name in the graph: it becomes `<name>_out`. Export names
the graph's outputs with `graph_output_names`; whatever pairs a graph's outputs with the model's (the
ONNX Runtime reference, compare) maps them back with `to_model_outputs`, from the same two lists.
"""

from __future__ import annotations

from typing import Mapping, TypeVar

T = TypeVar("T")
OUTPUT_NAMES_KEY = "quantkit.output_names"  # graph metadata: JSON {graph output name: model output name}


def graph_output_names(input_names: list[str], output_names: list[str]) -> list[str]:
    """The graph name of each output: its own, or `<name>_out` (`_out2`, ...) where an input has it."""
    taken = set(input_names) | set(output_names)
    out = []
    for name in output_names:
        if name in input_names:
            candidate, i = f"{name}_out", 1
            while candidate in taken:
                i += 1
                candidate = f"{name}_out{i}"
            taken.add(candidate)
            name = candidate
        out.append(name)
    return out


def renamed_outputs(input_names: list[str], output_names: list[str]) -> dict[str, str]:
    """{graph output name: model output name} for the outputs whose graph name differs."""
    return {g: m for g, m in zip(graph_output_names(input_names, output_names), output_names) if g != m}


def to_model_outputs(values: Mapping[str, T], input_names: list[str], output_names: list[str]) -> dict[str, T]:
    """A graph's outputs keyed by the model's output names (other values keep theirs)."""
    renamed = renamed_outputs(input_names, output_names)
    return {renamed.get(k, k): v for k, v in values.items()}
