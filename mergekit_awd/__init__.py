"""mergekit-awd: Adaptive Weight Disentanglement (arXiv 2411.18729) for mergekit.

Importing the package registers the `awd` merge method with mergekit. Plain
`mergekit-yaml` finds it without this import: the installed
``_mergekit_awd_hook`` registers it as soon as mergekit's merge-method package
is imported (and costs nothing at interpreter start otherwise).
"""

__version__ = "0.1.0"

from mergekit_awd.registration import register_all

register_all()
