"""MergeLog: what a report says about several per-tensor solves."""

import numpy as np

from mergekit_awd import solver
from mergekit_awd.merge_log import MergeLog
from mergekit_awd.params import Settings


def _settings(steps):
    return Settings(weights=(1.0, 1.0), lam=1.0, alpha=0.01, lr=0.005, steps=steps,
                    optimizer="sgd", scope="tensor", units="relative", select="linear",
                    others="task_arithmetic", normalize=False, keep_delta=0.0, adam_max_gb=8.0)



def test_loss_is_the_mean_of_the_curves_it_sums():
    """Per-tensor `steps` can differ (a filter on steps under scope: tensor): the
    reported curve is the mean of the curves of one length, divided by their number."""
    G = np.array([[2.0, 0.5], [0.5, 1.0]])
    log = MergeLog()
    curves = ([0.9, 0.5, 0.3], [0.7, 0.4, 0.1], [0.8, 0.6, 0.5, 0.4, 0.2])
    for i, losses in enumerate(curves):
        solution = solver.Solution(0.01, 0.005, len(losses) - 1, list(losses),
                                   w=np.array([0.1, 0.2]))
        log.add(("a", "b"), _settings(len(losses) - 1), [f"t{i}"], G, G, solution, 10)
    report = log.report()
    assert np.allclose(report["loss"], [0.8, 0.45, 0.2])
    assert "2 of 3 per-tensor solves with 2 steps" in report["loss_note"]
