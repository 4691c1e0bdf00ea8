"""`mergekit-awd tune`: form each candidate merge, score it on held-out data, keep the best.

A candidate is the user's recipe with a method and a few parameters replaced
(``candidate_config``), so the recipe written as ``best.yml`` *is* the winner.
Each candidate is planned by mergekit's own planner and its tensor tasks are
executed by mergekit's own ``ExecuteMergeMethodTask.execute``: what ``mergekit-yaml``
would compute for that recipe, tensor for tensor.

Two ways to form a candidate:

- in memory (``Inputs``), when the inputs fit the memory allowed: every planned
  tensor's inputs are read once (mergekit's ``GatherTensors``: loading, layout
  conversion, ``dtype:``), each candidate's tasks run on them, and the results are
  swapped into one loaded model. AWD candidates share one Gram matrix, computed
  from those inputs by the kernel's own Gram pass, and one solve per solver
  setting (under ``scope: global``): forming one costs the combination alone;
- on disk (``on_disk``), otherwise, or for ``--eval-cmd``: mergekit's ``run_merge``
  into a temporary folder, removed after scoring. AWD candidates still share one
  Gram pass (offered to the candidate's ``RunContext`` as ``known``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from mergekit_awd import context, evaluate, mergekit_run, params, scope
from mergekit_awd.params import AWDParameterError
from mergekit_awd.scope import AWD_METHODS
# methods that draw random masks: formed by mergekit's own run_merge with the seed, so
# that `mergekit-yaml best.yml OUT --random-seed SEED` writes the model tune scored
RANDOMIZED = ("dare_ties", "dare_linear", "della", "della_linear", "awd_dare_ties")
# mergekit methods whose `density` is their sparsification knob
SPARSIFYING = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
               "della", "della_linear", "awd_ties", "awd_dare_ties")


@dataclass(frozen=True)
class Candidate:
    """One setting to try: a method and the recipe parameters it replaces
    (``values``: (name, value) pairs in the order of ``params.TUNABLE``)."""

    method: str
    values: tuple = ()

    def overrides(self) -> Dict[str, float]:
        """The recipe parameters this candidate sets (under their recipe names; a value
        None keeps the recipe's own, per-model ones included)."""
        return {k: v for k, v in self.values if v is not None}

    @property
    def label(self) -> str:
        return f"{self.method} " + " ".join(
            f"{k}={v:g}" if v is not None else f"{k}=recipe's" for k, v in self.values)

    @property
    def is_awd(self) -> bool:
        return self.method in AWD_METHODS


def method_spec(name: str):
    from mergekit import merge_methods

    try:
        return merge_methods.get(name).spec
    except Exception:
        from mergekit.merge_methods import registry

        known = ", ".join(sorted(m.spec.name for m in registry.registered_methods()))
        raise AWDParameterError(f"--methods: mergekit has no merge method {name!r}; "
                                f"it has: {known}") from None


def knobs_of(method: str) -> list:
    """The tune knobs (``params.TUNABLE``) that ``method`` has; density only where it
    sparsifies."""
    names = {p.name for p in method_spec(method).parameters}
    return [p for p in params.TUNABLE if p.name in names
            and (not p.per_model or method in SPARSIFYING)]


def grid(methods: Sequence[str], values: Dict[str, Sequence[float]]) -> List[Candidate]:
    """Every combination of each method's own knobs (``values``: name -> the values
    to try), each value validated as the recipe's are."""
    out = []
    for method in methods:
        axes = [[(p.name, None if v is None else params.validate(p.name, float(v)))
                 for v in values[p.name]] for p in knobs_of(method)]
        out += [Candidate(method, combo) for combo in itertools.product(*axes)]
    return out


def candidate_config(config, candidate: Candidate):
    """The recipe for ``candidate``: its method, its values at the top level (and
    removed elsewhere so that they apply everywhere), parameters the method does
    not have dropped, a required one it lacks (``weight``) given its awd default."""
    cfg = config.model_copy(deep=True)
    cfg.merge_method = candidate.method
    spec = method_spec(candidate.method)
    known = {p.name for p in spec.parameters}
    overrides = candidate.overrides()
    for _, block in params.parameter_blocks(cfg):
        for name in list(block or {}):
            if name not in known or name in overrides:
                del block[name]
    # a model block without it (per-model values override the top level)
    given = set.intersection(*[set(m.parameters or {}) for m in cfg.models or []] or [set()])
    top = dict(cfg.parameters or {}, **overrides)
    for p in spec.parameters:
        if p.required and p.name not in given and p.name not in top:
            ours = params.declared(p.name)
            if ours is None:
                raise AWDParameterError(
                    f"{candidate.method} needs parameter '{p.name}', which the recipe does "
                    f"not set; add it to the recipe's parameters")
            top[p.name] = ours.default
    cfg.parameters = top
    return cfg


class Inputs:
    """Every planned tensor's inputs, read once, as mergekit hands them to a method."""

    def __init__(self, tasks, options):
        from mergekit.graph import Executor

        gathers = list({gather_key(t.gather_tensors): t.gather_tensors for t in tasks}.values())
        executor = Executor(gathers, math_device="cpu", storage_device="cpu")
        self.values = {gather_key(task): value for task, value in
                       executor.run(quiet=options.quiet, desc="tune: reading inputs")}

    def execute(self, tasks) -> Iterable:
        for task in tasks:
            value = self.values.get(gather_key(task.gather_tensors))
            if value is None:
                raise RuntimeError(f"tune: tensor {task.output_weight.name} of a candidate "
                                   f"reads inputs the first pass did not read")
            yield task, task.execute(tensors=value)

    def form(self, tasks, out_dtype: Optional[str]) -> Dict[str, torch.Tensor]:
        """The merged tensors of ``tasks``, cast as mergekit's writer casts them."""
        from mergekit.common import dtype_from_name

        out = {}
        for task, result in self.execute(tasks):
            if result is None:
                continue
            dtype = task.output_weight.force_dtype or out_dtype
            out[task.output_weight.name] = (result.to(dtype_from_name(dtype))
                                            if dtype else result)
        return out

    def gram(self, tasks) -> scope.Collected:
        """The kernel's own Gram pass, over the inputs already read."""
        return scope.collect(context.RunContext(), lambda: list(self.execute(tasks)))


def gather_key(gather) -> tuple:
    """What a ``GatherTensors`` reads (its ImmutableMap compares by identity)."""
    return frozenset(gather.weight_info.items()), gather.dtype, gather.device


def input_bytes(config) -> int:
    """Bytes every input model's weights take once read: the sizes of their files,
    scaled to the recipe's ``dtype:`` where it sets one (mergekit casts as it reads)."""
    from mergekit.common import dtype_from_name
    from mergekit.io.tasks import LoaderCache

    wanted = dtype_from_name(config.dtype).itemsize if config.dtype else None
    total = 0.0
    for model in config.referenced_models():
        index = LoaderCache().get(model).index
        for name in set(index.tensor_paths.values()):
            path = os.path.join(index.base_path, name)
            if not os.path.exists(path):
                continue
            stored = _stored_itemsize(path) if wanted else None
            total += os.path.getsize(path) * (wanted / stored if stored else 1.0)
    return int(total)


_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


def _stored_itemsize(path: str) -> Optional[int]:
    """The item size of a safetensors file's first floating tensor (None: unknown)."""
    if not path.endswith(".safetensors"):
        return None
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        for name in f.keys():
            size = _ITEMSIZE.get(f.get_slice(name).get_dtype())
            if size:
                return size
    return None


def default_max_memory() -> int:
    """70% of the memory available now (Linux), else 8 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * 0.7)
    except OSError:
        pass
    return 8 * 2**30


class Former:
    """Forms candidates of one recipe: in memory when possible, else on disk."""

    def __init__(self, config, options, max_memory: int, model, in_memory: bool):
        self.config, self.options = config, options
        self.model = model
        self.inputs: Optional[Inputs] = None
        self.input_tasks: list = []
        self.collected: Optional[scope.Collected] = None
        self.runs: Dict = {}
        self.gram_seconds = 0.0
        self.reason = ""
        if in_memory:
            self.reason = self._memory_check(max_memory)
        else:
            self.reason = "--eval-cmd scores a model folder"
        self.in_memory = in_memory and not self.reason

    def _memory_check(self, max_memory: int) -> str:
        need = input_bytes(self.config) + 2 * sum(
            p.numel() * p.element_size() for p in self.model.parameters())
        if need > max_memory:
            return (f"the inputs and the model need about {need / 2**30:.1f} GiB, over "
                    f"--max-memory {max_memory / 2**30:.1f} GiB")
        return ""

    def prepare(self, candidates: Sequence[Candidate]) -> None:
        """Read the inputs (in memory) and make the one Gram pass AWD candidates share."""
        first_cfg = candidate_config(self.config, candidates[0])
        tasks = mergekit_run.plan_tensor_tasks(first_cfg, self.options)
        if self.in_memory:
            names = set(self.model.state_dict())
            missing = [t.output_weight.name for t in tasks
                       if t.output_weight.name not in names]
            other = _config_differences(self.model.config,
                                        mergekit_run.out_config(first_cfg, self.options))
            if other:
                self.in_memory = False
                self.reason = (f"mergekit writes a model whose config differs from "
                               f"base_model's ({other}: a slices recipe?)")
            elif missing:
                self.in_memory = False
                self.reason = (f"mergekit writes tensors the model does not have "
                               f"({missing[0]}, ...)")
            elif not all(_is_method_task(t) for t in tasks):
                self.in_memory = False
                self.reason = "the recipe needs tokenizer or vocabulary work per tensor"
            else:
                self.input_tasks = tasks
                self.inputs = Inputs(tasks, self.options)
        awd = [c for c in candidates if c.is_awd]
        if not awd:
            return
        awd_tasks = mergekit_run.plan_tensor_tasks(candidate_config(self.config, awd[0]),
                                            self.options)
        if not _global_scope(awd_tasks):
            return
        start = time.perf_counter()
        if self.inputs is not None:
            self.collected = self.inputs.gram(awd_tasks)
        else:
            self.collected = scope.collect_tasks(
                context.RunContext(options=self.options), awd[0].method, awd_tasks,
                self.options.device, "cpu")
        self.gram_seconds = time.perf_counter() - start

    def known_gram(self, candidate: Candidate) -> Optional[scope.Collected]:
        """The shared Gram pass, with this candidate's settings (None: not global)."""
        if self.collected is None or self.collected.settings is None or not candidate.is_awd:
            return None
        shared = {name: value for name, value in candidate.overrides().items()
                  if not params.declared(name).per_model}
        return dataclasses.replace(self.collected,
                                   settings=self.collected.settings.replace(**shared))

    def read_inputs(self) -> Inputs:
        """The inputs read once (again, after ``learn`` consumed them)."""
        if self.inputs is None:
            self.inputs = Inputs(self.input_tasks, self.options)
        return self.inputs

    def run_for(self, candidate: Candidate) -> context.RunContext:
        """The candidate's merge context: one solve per solver setting, shared by the
        candidates that have it (scope: tensor: each tensor solves itself)."""
        known = self.known_gram(candidate)
        if known is None:
            return context.RunContext()
        key = known.settings.solver_key()
        if key not in self.runs:
            self.runs[key] = context.RunContext(known=known)
            self.runs[key].global_solution(known.settings, known.models)
        return self.runs[key]

    def form(self, candidate: Candidate, cfg=None) -> Dict[str, torch.Tensor]:
        """The candidate's merged tensors, formed from the inputs read once (``cfg``:
        another recipe with the candidate's solver settings, e.g. a learned one)."""
        cfg = cfg or candidate_config(self.config, candidate)
        tasks = mergekit_run.plan_tensor_tasks(cfg, self.options)
        with self.run_for(candidate).active(), _seeded(self.options), _quiet_kernel():
            return self.read_inputs().form(tasks, cfg.out_dtype)

    def merge(self, candidate: Candidate, out_path: str) -> None:
        """mergekit's run_merge of the candidate into ``out_path``, offered the shared
        Gram pass."""
        cfg = candidate_config(self.config, candidate)
        with _seeded(self.options):
            context.run_merge(cfg, out_path, self.options, source=cfg.to_yaml(),
                              known=self.known_gram(candidate))

    @contextlib.contextmanager
    def on_disk(self, candidate: Candidate):
        """The candidate merged into a temporary folder, removed afterwards."""
        folder = tempfile.mkdtemp(prefix="awd-tune-")
        try:
            self.merge(candidate, folder)
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _config_differences(loaded, written) -> str:
    """The config keys (dtype aside) on which the written model differs from the
    loaded base model, or ''."""
    ignore = {"torch_dtype", "dtype", "transformers_version", "_name_or_path",
              "architectures"}
    a, b = loaded.to_dict(), written.to_dict()
    keys = sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))
    return ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:3])


def _is_method_task(task) -> bool:
    from mergekit.io.tasks import GatherTensors

    return isinstance(task.gather_tensors, GatherTensors)


def _global_scope(tasks) -> bool:
    return any(params.of_task(t, "scope") == "global" for t in tasks
               if t.method_name in AWD_METHODS)


def seed_of(options) -> int:
    """The seed randomized methods draw their masks with (--random-seed, else 0)."""
    return options.random_seed if options.random_seed is not None else 0


@contextlib.contextmanager
def _seeded(options):
    """Randomized methods (DARE) draw the same masks for every candidate, as
    ``mergekit-yaml --random-seed`` draws them (torch's generator, seeded once)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_of(options))
        yield


def recipe_text(cfg, method: str, options) -> str:
    """``cfg`` as YAML; a randomized method's says which seed reproduces it."""
    text = cfg.to_yaml()
    if method in RANDOMIZED:
        seed = seed_of(options)
        text = (f"# {method} draws random masks: mergekit-yaml THIS_FILE OUT --random-seed "
                f"{seed}\n# writes the model mergekit-awd tune scored\n" + text)
    return text


@contextlib.contextmanager
def _quiet_kernel():
    """The kernel's once-per-merge warnings (the lambda hint) are noise per candidate."""
    logger = logging.getLogger("mergekit_awd")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_model(path: str, device: str = "cpu", revision: Optional[str] = None,
               trust_remote_code: bool = False):
    """The model that scores, in float32 (the merge's revision and remote-code
    setting: a hub model is read as mergekit reads it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, revision=revision,
                                                 trust_remote_code=trust_remote_code)
    return model.to(device).eval()


def swap_in(model, tensors: Dict[str, torch.Tensor]) -> None:
    """Put a candidate's merged tensors into the loaded model (as float32)."""
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in tensors.items():
            state[name].copy_(tensor.to(state[name].dtype))


def choose(rows: Sequence[Dict], metric: str) -> int:
    """Index of the best row (``evaluate.rank``). A row that failed, or has a NaN
    among its scores, never wins."""
    scored = [i for i, r in enumerate(rows) if "error" not in r and r["mean"]
              and metric in r["mean"] and not any(math.isnan(v) for v in r["mean"].values())]
    if not scored:
        raise RuntimeError("no candidate produced a score")
    return min(scored, key=lambda i: evaluate.rank(rows[i]["mean"], metric))


def check_methods(config, methods: Sequence[str], options) -> None:
    """Each method planned once on the recipe, before anything is read: one line for
    a method that cannot merge it (mergekit's own reason)."""
    for method in methods:
        try:
            mergekit_run.plan_tensor_tasks(candidate_config(config, Candidate(method)),
                                           options)
        except AWDParameterError:
            raise
        except Exception as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise AWDParameterError(
                f"--methods: {method} cannot merge this recipe "
                f"({type(error).__name__}: {reason[:300]}); leave it out of --methods")
