"""The `awd` recipe parameters, declared once: name, type, default, meaning.

mergekit validates each resolved parameter with its pydantic type while it
plans, before anything is written. A plain constrained type would report
``1 validation error for constrained-float`` without the parameter's name, so
each type here is a plain validator that raises ``AWDParameterError`` (not a
ValueError, which pydantic would rewrap) naming the parameter, the value and
what is allowed, in one line.

``Settings`` is the one typed object the rest of the package works with: the
resolved values of one tensor (``Settings.of(p)``).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable, Mapping, Optional, Tuple

from pydantic import BaseModel, PlainValidator, TypeAdapter, ValidationError
from typing_extensions import Annotated


class AWDParameterError(Exception):
    """An `awd` recipe parameter has a value outside its allowed range."""


class AWDInputError(Exception):
    """An input model cannot be merged as given (NaN/Inf, missing tensor, shapes)."""


def _checked(
    name: str,
    base_type: type,
    expect: str,
    check: Callable[[Any], bool] = lambda value: True,
):
    adapter = TypeAdapter(base_type)

    def validate(value: Any) -> Any:
        try:
            converted = adapter.validate_python(value)
        except ValidationError:
            converted = None
        if converted is None or not check(converted):
            raise AWDParameterError(
                f"awd parameter '{name}' must be {expect}; got {value!r}"
            )
        return converted

    return Annotated[base_type, PlainValidator(validate)]


def _choice(name: str, choices: Tuple[str, ...]):
    return _checked(
        name, str, "one of " + ", ".join(choices), lambda value: value in choices
    )


def _finite(value: float) -> bool:
    return math.isfinite(value)


def _valid_select(value: str) -> bool:
    if value in ("linear", "all"):
        return True
    try:
        re.compile(value)
    except re.error:
        return False
    return True


def _at_least(low: float):
    return lambda v: _finite(v) and v >= low


@dataclass(frozen=True)
class Parameter:
    name: str
    type: Any
    default: Any
    description: str
    per_model: bool = False


# Defaults in relative units (docs/design.md, "Units"): one alpha/lr for any
# model and tensor size. The evidence behind each is in docs/benchmarks.md.
COMMON = (
    Parameter("weight", _checked("weight", float, "a finite number", _finite), 1.0,
              "per-model weight of its task vector", per_model=True),
    Parameter("lambda", _checked("lambda", float, "a finite number", _finite), 1.0,
              "scale of the summed disentangled task vectors"),
    Parameter("alpha", _checked("alpha", float, "a finite number >= 0", _at_least(0)), 0.001,
              "weight of ||delta|| against orthogonality (see units)"),
    Parameter("lr", _checked("lr", float, "a finite number > 0",
                             lambda v: _finite(v) and v > 0), 0.005,
              "step size: plain GD for sgd, Adam's lr for adam (see units)"),
    Parameter("steps", _checked("steps", int, "an integer >= 0", lambda v: v >= 0), 1000,
              "solver steps N; 0 = plain task arithmetic"),
    Parameter("optimizer", _choice("optimizer", ("sgd", "adam")), "sgd",
              "sgd (Algorithm 1, exact in Gram space) or adam (full space)"),
    Parameter("scope", _choice("scope", ("global", "tensor")), "global",
              "global (one delta for the model, the paper) or tensor"),
    Parameter("units", _choice("units", ("relative", "raw")), "relative",
              "relative (scale-free alpha/lr) or raw (the paper's units)"),
    Parameter("select", _checked("select", str, "'linear', 'all' or a valid regular "
                                 "expression on tensor names", _valid_select), "linear",
              "tensors to disentangle: linear, all, or a regex on names"),
    Parameter("others", _choice("others", ("task_arithmetic", "base")), "task_arithmetic",
              "tensors not selected: task_arithmetic or base"),
    Parameter("normalize", _checked("normalize", bool, "true or false"), False,
              "divide by the sum of weights, as task_arithmetic does"),
    Parameter("keep_delta", _checked("keep_delta", float, "a finite number >= 0",
                                     _at_least(0)), 0.0,
              "add keep_delta * delta back to the merge (0 = the paper)"),
    Parameter("adam_max_gb", _checked("adam_max_gb", float, "a finite number of GB > 0",
                                      lambda v: _finite(v) and v > 0), 8.0,
              "memory allowed for adam's resident task vectors (scope: global)"),
)

SPARSIFY = (
    Parameter("density", _checked("density", float, "a number in (0, 1]",
                                  lambda v: _finite(v) and 0 < v <= 1), 1.0,
              "fraction of each disentangled vector kept", per_model=True),
    Parameter("rescale", _checked("rescale", bool, "true or false"), False,
              "rescale kept entries to the original L1 norm"),
    Parameter("int8_mask", _checked("int8_mask", bool, "true or false"), False,
              "store the sign-consensus mask as int8"),
)

def declared(name: str) -> Optional[Parameter]:
    """The declaration of the parameter ``name`` (None: not an awd parameter)."""
    return next((p for p in COMMON + SPARSIFY if p.name == name), None)


# What shapes the one solve of `scope: global`: must not vary per tensor.
SOLVER_PARAMETERS = ("alpha", "lr", "steps", "optimizer", "units", "select", "adam_max_gb")


@dataclass(frozen=True)
class Settings:
    """One tensor's resolved parameters (per-model values as tuples in input order)."""

    weights: Tuple[float, ...]
    lam: float
    alpha: float
    lr: float
    steps: int
    optimizer: str
    scope: str
    units: str
    select: str
    others: str
    normalize: bool
    keep_delta: float
    adam_max_gb: float
    densities: Optional[Tuple[float, ...]] = None
    rescale: bool = False
    int8_mask: bool = False

    @classmethod
    def of(cls, p: Mapping[str, Any], model_ids) -> "Settings":
        values = {
            f.name: p[f.name]
            for f in fields(cls)
            if f.name in p and f.name not in ("weights", "lam", "densities")
        }
        densities = p.get("density")
        return cls(
            weights=tuple(float(p["weight"][m]) for m in model_ids),
            lam=p["lambda"],
            densities=None if densities is None else tuple(densities[m] for m in model_ids),
            **values,
        )

    def solver_key(self) -> Tuple:
        return tuple(getattr(self, name) for name in SOLVER_PARAMETERS)

    def public(self) -> dict:
        """The shared parameters under their recipe names (for the report)."""
        out = {p.name: getattr(self, "lam" if p.name == "lambda" else p.name)
               for p in COMMON if not p.per_model}
        if self.densities is not None:
            out.update(rescale=self.rescale, int8_mask=self.int8_mask)
        return out


def check_known(method: str, known: Iterable[str], given: Mapping[str, Iterable[str]]) -> None:
    """Refuse recipe parameters the method does not have, naming the closest one.

    mergekit silently ignores unknown parameter names, so a typo such as
    ``alhpa`` would merge with the default.
    """
    known = sorted(set(known))
    for where, names in given.items():
        for name in names:
            if name in known:
                continue
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise AWDParameterError(
                f"{method} has no parameter '{name}' (in {where}); {hint}"
                f"its parameters are: {', '.join(known)}"
            )


def parameter_blocks(node, path: str = ""):
    """(place, parameters dict) of every `parameters:` block in a mergekit config."""
    if isinstance(node, BaseModel):
        for key in type(node).model_fields:
            value = getattr(node, key)
            if key == "parameters" and isinstance(value, dict):
                model = getattr(node, "model", None)
                yield (f"the parameters of {model}" if model is not None
                       else f"{path}.parameters" if path else "parameters"), value
            elif value is not None:
                yield from parameter_blocks(value, f"{path}.{key}" if path else key)
    elif isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            yield from parameter_blocks(item, f"{path}[{i}]")
    elif isinstance(node, dict):
        for key, item in node.items():
            yield from parameter_blocks(item, f"{path}.{key}")


def names_in_recipe(config) -> frozenset:
    """Every parameter name that some `parameters:` block of the recipe sets."""
    return frozenset(name for _, values in parameter_blocks(config) for name in values or {})
