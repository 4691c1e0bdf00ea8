"""Register `awd` with mergekit's merge-method registry (its public API only)."""

from __future__ import annotations


def register_all() -> None:
    """Register the plugin's methods; a second call is a no-op."""
    from mergekit.merge_methods import registry

    from mergekit_awd.method import AWDMerge

    known = {method.spec.name for method in registry.registered_methods()}
    methods = (
        AWDMerge("awd"),
        AWDMerge("awd_ties", pretty_name="AWD with TIES", combine_with="ties"),
        AWDMerge("awd_dare_ties", pretty_name="AWD with DARE TIES", combine_with="dare_ties"),
    )
    for method in methods:
        if method.spec.name not in known:
            registry.register(method)
