"""The options of the command this process runs, for the parts mergekit does not pass on.

A merge method never sees mergekit's options (`--quiet`) or the output folder.
Under `mergekit-yaml` they are read back from its own command line with its own
click command, so they are parsed exactly as mergekit parsed them; the
`mergekit-awd` commands set them directly.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from typing import Dict

_SET: Dict = {}


def set_options(**values) -> None:
    """Used by the `mergekit-awd` commands, which know their options."""
    _SET.update(values)


@lru_cache(maxsize=1)
def mergekit_yaml_params() -> Dict:
    """`mergekit-yaml`'s parsed parameters, or {} in any other program."""
    if not os.path.basename(sys.argv[0] or "").startswith("mergekit-yaml"):
        return {}
    try:
        from mergekit.scripts.run_yaml import main

        ctx = main.make_context("mergekit-yaml", sys.argv[1:], resilient_parsing=True)
        return dict(ctx.params)
    except Exception:
        return {}


def quiet() -> bool:
    if "quiet" in _SET:
        return bool(_SET["quiet"])
    return bool(mergekit_yaml_params().get("quiet", False))


def out_path():
    return _SET.get("out_path") or mergekit_yaml_params().get("out_path")
