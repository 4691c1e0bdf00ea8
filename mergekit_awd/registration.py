"""Register the plugin's methods (`awd` and its relatives, the data-free rules) with
mergekit's merge-method registry (its public API only)."""

from __future__ import annotations


def register_all() -> None:
    """Register the plugin's methods; a second call is a no-op."""
    from mergekit.merge_methods import registry

    from mergekit_awd.data_free import RULES, DataFreeMerge
    from mergekit_awd.method import AWDMerge

    known = {method.spec.name for method in registry.registered_methods()}
    # the data-free rules first: the AWD methods that combine with them look them up
    for method in [DataFreeMerge(rule) for rule in RULES]:
        if method.spec.name not in known:
            registry.register(method)
    methods = (
        AWDMerge("awd"),
        AWDMerge("awd_ties", pretty_name="AWD with TIES", combine_with="ties"),
        AWDMerge("awd_dare_ties", pretty_name="AWD with DARE TIES", combine_with="dare_ties"),
        *(AWDMerge(f"awd_{rule}", pretty_name=f"AWD with {RULES[rule][0]}", combine_with=rule)
          for rule in RULES),
    )
    for method in methods:
        if method.spec.name not in known:
            registry.register(method)
