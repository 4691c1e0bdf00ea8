"""The `awd` recipe parameters, declared once: name, type, default, meaning.

mergekit validates each resolved parameter with its pydantic type while it
plans, before anything is written. A plain constrained type would report
``1 validation error for constrained-float`` without the parameter's name, so
each type here is a plain validator that raises ``AWDParameterError`` (not a
ValueError, which pydantic would rewrap) naming the parameter, the value and
what is allowed, in one line.

``Settings`` is the one typed object the rest of the package works with: the
resolved values of one tensor (``Settings.of(p)``), one field per declaration.
The method's spec gives mergekit ``None`` as every default, so ``Settings``
knows which parameters the recipe set (``given``) without reading the recipe.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Tuple

from pydantic import BaseModel, PlainValidator, TypeAdapter, ValidationError
from typing_extensions import Annotated


class AWDParameterError(Exception):
    """An `awd` recipe parameter has a value outside its allowed range."""


class AWDInputError(Exception):
    """An input model cannot be merged as given (NaN/Inf, missing tensor, shapes)."""


def _kind(base_type: type, expect: str, check: Callable[[Any], bool] = lambda v: True):
    """A parameter's type: a base type, what is allowed (in words) and the check."""
    return base_type, expect, check


def _choice(*choices: str):
    return _kind(str, "one of " + ", ".join(choices), lambda value: value in choices)


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
    """One recipe parameter: everything else (mergekit's ParameterSpec, ``Settings``,
    the solver key, the report's and card's keys, grid checks) is derived from it.

    ``role``: ``solver`` shapes the solve of delta (one value for a whole
    `scope: global` solve); ``combine`` shapes how the disentangled vectors are
    combined (handed on to mergekit's combining method when it has the parameter).
    ``attr``: the ``Settings`` attribute (per-model values are tuples).
    """

    name: str
    kind: tuple  # (base type, what is allowed in words, check): see ``_kind``
    default: Any
    description: str
    role: str = "combine"
    per_model: bool = False
    attr: str = ""
    # `mergekit-awd tune --NAME`: None = not a tune knob; otherwise the values tried
    # when the option is not given: these, or () = the recipe's value (else default)
    tune: Optional[tuple] = None
    tune_recipe_first: bool = True  # the recipe's value beats ``tune`` when set

    @property
    def field(self) -> str:
        return self.attr or self.name

    @property
    def type(self):
        """The pydantic type mergekit validates the recipe's value with: one line
        naming the parameter, the value and what is allowed. ``None`` passes: it is
        what mergekit hands over for a parameter the recipe does not set."""
        return self.typed("awd")

    def typed(self, method: str):
        """``type``, its message naming ``method``'s parameter."""
        base_type, expect, check = self.kind
        adapter, name = TypeAdapter(base_type), self.name

        def validate(value: Any) -> Any:
            if value is None:
                return None
            try:
                converted = adapter.validate_python(value)
            except ValidationError:
                converted = None
            if converted is None or not check(converted):
                raise AWDParameterError(
                    f"{method} parameter '{name}' must be {expect}; got {value!r}")
            return converted

        return Annotated[base_type, PlainValidator(validate)]


# Defaults in relative units (docs/design.md, "Units"): one alpha/lr for any
# model and tensor size. The evidence behind each is in docs/benchmarks.md.
COMMON = (
    Parameter("weight", _kind(float, "a finite number", _finite), 1.0,
              "per-model weight of its task vector", per_model=True, attr="weights"),
    Parameter("lambda", _kind(float, "a finite number", _finite), 1.0,
              "scale of the summed disentangled task vectors", attr="lam",
              tune=(0.25, 0.5, 0.75, 1.0, 1.5), tune_recipe_first=False),
    Parameter("alpha", _kind(float, "a finite number >= 0", _at_least(0)), 0.001,
              "weight of ||delta|| against orthogonality (see units)", role="solver",
              tune=()),
    Parameter("lr", _kind(float, "a finite number > 0",
                             lambda v: _finite(v) and v > 0), 0.005,
              "step size: plain GD for sgd, Adam's lr for adam (see units)", role="solver"),
    Parameter("steps", _kind(int, "an integer >= 0", lambda v: v >= 0), 1000,
              "solver steps N; 0 = plain task arithmetic", role="solver"),
    Parameter("optimizer", _choice("sgd", "adam"), "sgd",
              "sgd (Algorithm 1, exact in Gram space) or adam (full space)", role="solver"),
    Parameter("scope", _choice("global", "tensor"), "global",
              "global (one delta for the model, the paper) or tensor"),
    Parameter("units", _choice("relative", "raw"), "relative",
              "relative (scale-free alpha/lr) or raw (the paper's units)", role="solver"),
    Parameter("select", _kind(str, "'linear', 'all' or a valid regular "
                                 "expression on tensor names", _valid_select), "linear",
              "tensors to disentangle: linear, all, or a regex on names", role="solver"),
    Parameter("others", _choice("task_arithmetic", "base"), "task_arithmetic",
              "tensors not selected: task_arithmetic or base"),
    Parameter("normalize", _kind(bool, "true or false"), False,
              "divide by the sum of weights, as task_arithmetic does"),
    Parameter("keep_delta", _kind(float, "a finite number >= 0",
                                     _at_least(0)), 0.0,
              "add keep_delta * delta back to the merge (0 = the paper)", tune=()),
    Parameter("adam_max_gb", _kind(float, "a finite number of GB > 0",
                                      lambda v: _finite(v) and v > 0), 8.0,
              "memory allowed for adam's resident task vectors (scope: global)",
              role="solver"),
)

SPARSIFY = (
    Parameter("density", _kind(float, "a number in (0, 1]",
                                  lambda v: _finite(v) and 0 < v <= 1), 1.0,
              "fraction of each disentangled vector kept", per_model=True,
              attr="densities", tune=(0.5,)),
    Parameter("rescale", _kind(bool, "true or false"), False,
              "rescale kept entries to the original L1 norm"),
    Parameter("int8_mask", _kind(bool, "true or false"), False,
              "store the sign-consensus mask as int8"),
)

def _valid_exclude(value: str) -> bool:
    return value in ("none", "vocabulary") or _valid_select(value)


# The data-free per-tensor merges (``data_free.py``, ``spectral.py``): their knobs, with
# the published defaults (FusionBench 0.2.33's reference code and configs).
DATA_FREE = (
    Parameter("exclude", _kind(str, "'none', 'vocabulary' or a valid regular expression "
                                    "on tensor names", _valid_exclude), "none",
              "matrices averaged instead of merged by the rule: none, vocabulary "
              "(embeddings and LM head), or a regex on names"),
    Parameter("common_space_fraction", _kind(float, "a number in [0, 1]",
                                             lambda v: _finite(v) and 0 <= v <= 1), 0.8,
              "iso_cts: share of the singular directions taken from the sum"),
    Parameter("wudi_steps", _kind(int, "an integer >= 0", lambda v: v >= 0), 300,
              "wudi: Adam steps (the paper's code: 300; FusionBench's config: 400)"),
    Parameter("wudi_lr", _kind(float, "a finite number > 0",
                                  lambda v: _finite(v) and v > 0), 1e-5,
              "wudi: Adam's learning rate, in the task vectors' own units"),
)
# the data-free rules, each with its own knobs (besides weight, lambda and exclude)
RULE_KNOBS = {"tsv": (), "iso_c": (), "iso_cts": ("common_space_fraction",),
              "wudi": ("wudi_steps", "wudi_lr")}

DECLARED = COMMON + SPARSIFY + DATA_FREE
TUNABLE = tuple(p for p in DECLARED if p.tune is not None)


def method_spec(name: str, pretty_name: str, url: str, parameters: Iterable[Parameter],
                label: str = "awd"):
    """mergekit's MergeMethodSpec of one of the plugin's methods: a base model and two
    inputs at least; each parameter's default None: "not set" (``Settings.of`` gives
    the declared default and knows what the recipe set); errors name ``label``."""
    from mergekit.merge_methods.base import (BasePolicy, InputContract, MergeMethodSpec,
                                             ParameterScope, ParameterSpec)

    return MergeMethodSpec(
        name=name, pretty_name=pretty_name, reference_url=url,
        parameters=tuple(
            ParameterSpec(p.name, p.typed(label),
                          ParameterScope.NON_BASE if p.per_model else ParameterScope.SHARED,
                          default=None, description=p.description) for p in parameters),
        contract=InputContract(base=BasePolicy.REQUIRED, min_inputs=2))


def declared(name: str) -> Optional[Parameter]:
    """The declaration of the parameter ``name`` (None: not an awd parameter)."""
    return next((p for p in DECLARED if p.name == name), None)


def of_task(task, name: str) -> Any:
    """The value of shared parameter ``name`` in a planned task (unset: the default)."""
    value = task.parameters.get(name)
    return declared(name).default if value is None else value


def validate(name: str, value: Any) -> Any:
    """``value`` through the parameter's own type (the error names it)."""
    return TypeAdapter(declared(name).type).validate_python(value)


class _SettingsMethods:
    """Behaviour of ``Settings`` (its fields come from the declarations above)."""

    @classmethod
    def of(cls, p: Mapping[str, Any], model_ids, defaults: Mapping[str, Any] = None
           ) -> "Settings":
        """One tensor's values as mergekit resolved them; ``None`` (what the method's
        spec gives mergekit as default) is "not set": the declared default then, and
        the name is left out of ``given``."""
        defaults = defaults or {}
        values, given = {}, set()
        for d in DECLARED:
            if d.name not in p:
                continue
            raw = p[d.name]
            if d.per_model:
                raw = [raw[m] for m in model_ids]
                if any(v is not None for v in raw):
                    given.add(d.name)
                fallback = defaults.get(d.name, d.default)
                values[d.field] = tuple(fallback if v is None else v for v in raw)
            else:
                if raw is not None:
                    given.add(d.name)
                values[d.field] = defaults.get(d.name, d.default) if raw is None else raw
        if "weights" in values:
            values["weights"] = tuple(float(v) for v in values["weights"])
        return cls(given=frozenset(given), **values)

    def value(self, name: str) -> Any:
        """The value of the recipe parameter ``name`` (per-model: a tuple)."""
        return getattr(self, declared(name).field)

    def solver_key(self) -> Tuple:
        """What shapes a solve: one value per ``solver`` parameter."""
        return tuple(getattr(self, d.field) for d in DECLARED if d.role == "solver")

    def solver_differences(self, other: "Settings") -> list:
        """(name, this value, other value) of each solver parameter that differs."""
        return [(d.name, getattr(self, d.field), getattr(other, d.field))
                for d in DECLARED if d.role == "solver"
                and getattr(self, d.field) != getattr(other, d.field)]

    def replace(self, **values) -> "Settings":
        """A copy with recipe parameters replaced (by their recipe names)."""
        import dataclasses

        return dataclasses.replace(self, **{declared(k).field: v for k, v in values.items()})

    def public(self) -> dict:
        """The shared parameters under their recipe names (for the report and card)."""
        return {d.name: getattr(self, d.field) for d in DECLARED
                if not d.per_model and getattr(self, d.field) is not None}


Settings = make_dataclass(
    "Settings",
    [(d.field, Any, field(default=None)) for d in DECLARED]
    + [("given", frozenset, field(default=frozenset()))],
    bases=(_SettingsMethods,),
    frozen=True,
)
Settings.__doc__ = ("One tensor's resolved parameters, one field per declared parameter "
                    "(per-model values as tuples in input order); ``given``: the names "
                    "the recipe set.")
Settings.__module__ = __name__


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
