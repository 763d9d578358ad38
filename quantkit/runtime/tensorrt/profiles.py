"""Build shapes: one input's min/opt/max (`ShapeProfile`), the `--shape` syntax, optimization profiles
(one list of input shapes each; an engine may hold several), and the check that profiles fit the
graph's inputs (every dynamic input has one, fixed dimensions match).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from quantkit.errors import InputError


@dataclass(frozen=True)
class ShapeProfile:
    """Build shapes of one input: min <= opt <= max elementwise, same rank. Validates itself."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "min", _as_dims(self.name, "min", self.min))
        object.__setattr__(self, "opt", _as_dims(self.name, "opt", self.opt))
        object.__setattr__(self, "max", _as_dims(self.name, "max", self.max))
        if not self.name or "," in self.name:
            raise InputError(f"shape profile: input name {self.name!r} must be non-empty and contain no ','")
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise InputError(
                f"shape profile {self.name}: min {dims_text(self.min)}, opt {dims_text(self.opt)} and "
                f"max {dims_text(self.max)} must have the same rank"
            )
        for axis, (lo, mid, hi) in enumerate(zip(self.min, self.opt, self.max)):
            if not lo <= mid <= hi:
                raise InputError(
                    f"shape profile {self.name}: dimension {axis} must satisfy min <= opt <= max, got "
                    f"{lo}, {mid}, {hi} (min {dims_text(self.min)}, opt {dims_text(self.opt)}, "
                    f"max {dims_text(self.max)})"
                )

    @classmethod
    def static(cls, name: str, shape: Sequence[int]) -> "ShapeProfile":
        """The shape the user will run, and nothing else: min = opt = max."""
        return cls(name, tuple(shape), tuple(shape), tuple(shape))

    @property
    def is_static(self) -> bool:
        return self.min == self.opt == self.max

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ShapeProfile":
        try:
            return cls(str(data["name"]), tuple(data["min"]), tuple(data["opt"]), tuple(data["max"]))
        except (KeyError, TypeError) as e:
            raise InputError(f"shape profile {data!r}: needs name, min, opt and max ({e})") from e


def _as_dims(name: str, which: str, dims: Iterable[Any]) -> tuple[int, ...]:
    try:
        dims = tuple(dims)
        out = tuple(int(d) for d in dims)
    except (TypeError, ValueError) as e:
        raise InputError(f"shape profile {name}: {which} shape {dims!r} is not a list of integers") from e
    if any(isinstance(d, bool) or int(d) != d for d in dims) or any(d < 1 for d in out):
        raise InputError(f"shape profile {name}: {which} shape {dims_text(out)} must have dimensions >= 1")
    return out


def dims_text(dims: Sequence[int]) -> str:
    return "x".join(str(d) for d in dims)


SHAPE_SYNTAX = "NAME:DIMS (min = opt = max) or NAME:MIN,OPT,MAX with DIMS like 4x128, e.g. input_ids:1x128,4x128,8x128"
PROFILES_SYNTAX = (SHAPE_SYNTAX + "; several optimization profiles in one engine: NAME:MIN,OPT,MAX;MIN,OPT,MAX;... "
                   "(one ';'-separated entry per profile; an input with one entry has it in every profile)")

# One optimization profile: the build shapes of every input it names.
ProfileSet = list[ShapeProfile]


def parse_shape_spec(text: str) -> ShapeProfile:
    """'input_ids:1x128,4x128,8x128' -> ShapeProfile; 'input_ids:4x128' -> static 4x128.

    The name is everything before the last ':' (as trtexec reads it), so 'input:0:1x3' names
    'input:0'. Two shapes are refused: the opt shape is the one the engine is tuned for, so it is
    said, not guessed.
    """
    text = text.strip()
    name, sep, shapes = text.rpartition(":")
    if not sep or not name or not shapes:
        raise InputError(f"--shape {text!r}: expected {SHAPE_SYNTAX}")
    parts = shapes.split(",")
    dims = []
    for part in parts:
        pieces = part.strip().lower().split("x")
        if not all(p.strip().isdigit() for p in pieces):
            raise InputError(f"--shape {text!r}: {part.strip()!r} is not a shape like 4x128; expected {SHAPE_SYNTAX}")
        dims.append(tuple(int(p) for p in pieces))
    if len(dims) == 1:
        return ShapeProfile.static(name, dims[0])
    if len(dims) == 3:
        return ShapeProfile(name, *dims)
    raise InputError(f"--shape {text!r}: gave {len(dims)} shapes; expected {SHAPE_SYNTAX}")


def parse_shape_specs(texts: Iterable[str]) -> list[ShapeProfile]:
    profiles = [parse_shape_spec(t) for t in texts]
    seen: set[str] = set()
    for p in profiles:
        if p.name in seen:
            raise InputError(f"--shape: input {p.name!r} is given more than once")
        seen.add(p.name)
    return profiles


def check_profiles_against_inputs(
    graph_shapes: Mapping[str, Sequence[int]], profiles: Mapping[str, ShapeProfile], source: str
) -> None:
    """Every input with a dynamic dimension (-1) has a profile; every profile fits its input."""
    unknown = sorted(set(profiles) - set(graph_shapes))
    if unknown:
        raise InputError(
            f"{source}: --shape names {', '.join(unknown)}, which the graph does not take as input "
            f"(its inputs: {', '.join(graph_shapes) or 'none'})"
        )
    missing = []
    for name, shape in graph_shapes.items():
        shape = tuple(shape)
        p = profiles.get(name)
        if p is None:
            if any(d < 0 for d in shape):
                missing.append(f"{name} {graph_dims_text(shape)}")
            continue
        if len(p.min) != len(shape):
            raise InputError(
                f"{source}: input {name} has rank {len(shape)} ({graph_dims_text(shape)}) but --shape gives "
                f"rank {len(p.min)} ({dims_text(p.opt)})"
            )
        for axis, d in enumerate(shape):
            if d >= 0 and not (p.min[axis] == p.opt[axis] == p.max[axis] == d):
                raise InputError(
                    f"{source}: input {name} dimension {axis} is fixed at {d} ({graph_dims_text(shape)}); "
                    f"--shape gives min/opt/max {p.min[axis]}/{p.opt[axis]}/{p.max[axis]}"
                )
    if missing:
        raise InputError(
            f"{source}: inputs with dynamic dimensions need build shapes: {'; '.join(missing)}. "
            f"Give each as --shape {SHAPE_SYNTAX}"
        )


def graph_dims_text(shape: Sequence[int]) -> str:
    return "x".join("?" if d < 0 else str(d) for d in shape)


def graph_input_shapes(model) -> dict[str, tuple[int, ...]]:
    initializers = {t.name for t in model.graph.initializer}
    shapes = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in dims)
    return shapes


def parse_profile_specs(texts: Iterable[str]) -> list[ProfileSet]:
    """--shape values -> one list of input shapes per optimization profile.

    'x:1x16,1x64,1x128;8x16,8x64,8x128' gives x two profiles; every input with more than one entry
    must have as many as the others, and an input with one entry has it in every profile.
    """
    per_input: dict[str, list[ShapeProfile]] = {}
    for text in texts:
        name, sep, shapes = text.strip().rpartition(":")
        if not sep or not name:
            raise InputError(f"--shape {text!r}: expected {PROFILES_SYNTAX}")
        if name in per_input:
            raise InputError(f"--shape: input {name!r} is given more than once (several profiles go in one "
                             f"--shape, separated by ';')")
        per_input[name] = [parse_shape_spec(f"{name}:{part}") for part in shapes.split(";")]
    return profile_sets(per_input)


def profile_sets(per_input: Mapping[str, Sequence[ShapeProfile]]) -> list[ProfileSet]:
    """{input: [its shapes in profile 0, 1, ...]} -> [[profile 0's shapes], [profile 1's], ...]."""
    counts = {name: len(shapes) for name, shapes in per_input.items()}
    n = max(counts.values(), default=0)
    uneven = {name: c for name, c in counts.items() if c not in (1, n)}
    if uneven:
        raise InputError(
            "build profiles: every input needs one set of shapes, or as many as the others ("
            + ", ".join(f"{name} has {c}" for name, c in counts.items()) + f"; the most is {n})"
        )
    return [[shapes[i if len(shapes) > 1 else 0] for shapes in per_input.values()] for i in range(n)]


def as_profile_sets(profiles: Sequence[ShapeProfile] | Sequence[Sequence[ShapeProfile]] | None) -> list[ProfileSet]:
    """A flat list of input shapes is one profile; a list of lists is one profile each."""
    profiles = list(profiles or [])
    if not profiles:
        return []
    if all(isinstance(p, ShapeProfile) for p in profiles):
        sets = [profiles]
    else:
        sets = [list(s) for s in profiles]
    for i, shapes in enumerate(sets):
        names = [p.name for p in shapes]
        if len(set(names)) != len(names):
            raise InputError(f"build profile {i}: an input is given more than once ({', '.join(names)})")
    return sets


def profile_fits(shapes: Sequence[ShapeProfile], inputs: Mapping[str, Sequence[int]]) -> bool:
    """Whether every input shape lies within this profile's min..max."""
    by_name = {p.name: p for p in shapes}
    for name, shape in inputs.items():
        p = by_name.get(name)
        if p is None:
            continue
        if len(shape) != len(p.min) or not all(lo <= d <= hi for lo, d, hi in zip(p.min, shape, p.max)):
            return False
    return True
