"""Which tensors AWD disentangles (`select`), decided the same way everywhere.

The paper computes delta over the weights of the linear layers inside the
transformer blocks (section 4.2): every weight matrix there, so fused 3-D
expert weights of a mixture of experts and its router count too (a linear
map per expert); norms and biases (1-D) do not. "Inside the blocks" is what mergekit's
architecture definitions call layer weights; a model without one falls back to
the naming convention of repeated modules (a numeric path component, as in
``model.layers.3.mlp.up_proj.weight``).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import FrozenSet, Optional

_REPEATED_BLOCK = re.compile(r"(^|\.)\d+\.")


def is_selected(
    select: str,
    name: str,
    ndim: int,
    vocabulary_axis: Optional[int],
    layer_names: Optional[FrozenSet[str]],
) -> bool:
    """The `select` rule for one tensor (layer_names None: use the name convention)."""
    if select == "all":
        return True
    if select == "linear":
        return ndim >= 2 and vocabulary_axis is None and in_layers(name, layer_names)
    return re.search(select, name) is not None


def in_layers(name: str, layer_names: Optional[FrozenSet[str]]) -> bool:
    """Inside the repeated blocks (layer_names None: by the naming convention)."""
    if layer_names is not None:
        return name in layer_names
    return bool(_REPEATED_BLOCK.search(name))


def _architecture(model, trust_remote_code: Optional[bool] = None):
    """mergekit's configured architecture of ``model`` (a ModelReference), or None
    where there is none: an id of mergekit's in-memory API (no config to read),
    a config without exactly one architecture, or one mergekit has no definition
    of. A config that cannot be read is an error, not a fallback."""
    from mergekit.architecture import arch_info_for_config
    from mergekit.architecture.base import ConfiguredModelArchitecture
    from mergekit.io.tasks import LoaderCache

    if not callable(getattr(model, "config", None)):
        return None
    if trust_remote_code is None:  # this thread's mergekit setting (per thread!)
        trust_remote_code = LoaderCache().trust_remote_code
    config = model.config(trust_remote_code=trust_remote_code)
    if len(getattr(config, "architectures", None) or ()) != 1:
        return None
    info = arch_info_for_config(config)
    if info is None:
        return None
    return ConfiguredModelArchitecture(info=info, config=config)


@lru_cache(maxsize=64)
def layer_weight_names(model, trust_remote_code: Optional[bool] = None
                       ) -> Optional[FrozenSet[str]]:
    """Names (with aliases) of the weights inside the repeated layers of ``model``.

    ``trust_remote_code``: the merge's own option. mergekit keeps it per thread
    (``LoaderCache``), so a --multi-gpu worker thread would read the default."""
    arch = _architecture(model, trust_remote_code)
    if arch is None:
        return None
    names = set()
    for module_name in arch.info.modules:
        module = arch.get_module(module_name)
        for index in range(module.num_layers()):
            for weight in module.layer_weights(index):
                names.add(weight.name)
                names.update(weight.aliases or ())
    return frozenset(names)
