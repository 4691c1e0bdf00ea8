"""What one `awd` merge solved, summed over its solves, for its report and model card.

One global solve (`scope: global`) or one solve per tensor (`scope: tensor`)
is added here, by ``context.RunContext.solve`` (which holds the merge's lock);
the merge's ``RunContext`` owns its log and writes the report when the merge
is over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from mergekit_awd import solver


@dataclass
class MergeLog:
    """Sums over the solves of one merge."""

    models: Tuple = ()
    settings: Optional[object] = None
    G: Optional[np.ndarray] = None
    H: Optional[np.ndarray] = None
    losses: Optional[np.ndarray] = None
    curves: int = 0  # solves summed into ``losses`` (those with its number of steps)
    delta_sq: float = 0.0
    tensors: List[str] = field(default_factory=list)
    solves: int = 0
    numel: int = 0
    w: Optional[np.ndarray] = None

    @property
    def empty(self) -> bool:
        return self.G is None

    def add(self, models, settings, names: List[str], G, H, solution: solver.Solution,
            numel: int) -> None:
        losses = np.asarray(solution.losses, dtype=np.float64)
        if self.settings is None:
            self.models, self.settings = tuple(models), settings
        self.G = G if self.G is None else self.G + G
        self.H = H if self.H is None else self.H + H
        if self.losses is None:
            self.losses, self.curves = losses, 1
        elif len(self.losses) == len(losses):
            self.losses, self.curves = self.losses + losses, self.curves + 1
        self.delta_sq += solver.delta_norm_sq(G, solution)
        self.tensors.extend(names)
        self.solves += 1
        self.numel += numel
        self.w = solution.w if self.solves == 1 else None

    def report(self) -> Dict:
        from mergekit_awd.report import summarize

        s = self.settings
        report = summarize(
            self.G,
            self.H,
            self.losses / max(self.curves, 1),
            self.delta_sq,
            self.w,
            [str(m) for m in self.models],
            list(s.weights),
            s.public(),
            numel=self.numel,
            tensors=len(self.tensors),
        )
        if self.solves > 1:
            report["loss_note"] = (
                f"mean over {self.curves} per-tensor solves" if self.curves == self.solves
                else f"mean over the {self.curves} of {self.solves} per-tensor solves "
                     f"with {len(self.losses) - 1} steps (steps differ per tensor)")
        return report

    def summary_line(self) -> str:
        """Final loss and the cosine drop, in one line."""
        if self.empty:
            return "no tensor was disentangled"
        from mergekit_awd.report import table

        return table(self.report()).splitlines()[-1]
