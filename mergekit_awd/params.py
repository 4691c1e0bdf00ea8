"""Typed `awd` parameters: bad YAML fails at planning time, with a useful message.

mergekit validates each resolved parameter with its pydantic type while it plans,
before anything is written. A plain constrained type would report
``1 validation error for constrained-float`` without the parameter's name, so
each type here is a plain validator that raises ``AWDParameterError`` (not a
ValueError, which pydantic would rewrap) naming the parameter, the value and
what is allowed, in one line.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Tuple

from pydantic import PlainValidator, TypeAdapter, ValidationError
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


Weight = _checked("weight", float, "a finite number", _finite)
Lambda = _checked("lambda", float, "a finite number", _finite)
Alpha = _checked(
    "alpha", float, "a finite number >= 0", lambda v: _finite(v) and v >= 0
)
LearningRate = _checked(
    "lr", float, "a finite number > 0", lambda v: _finite(v) and v > 0
)
Steps = _checked("steps", int, "an integer >= 0", lambda v: v >= 0)
Optimizer = _choice("optimizer", ("sgd", "adam"))
Scope = _choice("scope", ("global", "tensor"))
Units = _choice("units", ("relative", "raw"))
Others = _choice("others", ("task_arithmetic", "base"))
Select = _checked(
    "select",
    str,
    "'linear', 'all' or a valid regular expression on tensor names",
    _valid_select,
)
Normalize = _checked("normalize", bool, "true or false")
AdamMaxGB = _checked(
    "adam_max_gb", float, "a finite number of GB > 0", lambda v: _finite(v) and v > 0
)
Density = _checked(
    "density", float, "a number in (0, 1]", lambda v: _finite(v) and 0 < v <= 1
)
Rescale = _checked("rescale", bool, "true or false")
Int8Mask = _checked("int8_mask", bool, "true or false")
