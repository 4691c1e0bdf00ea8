"""What disentangling did: cosines before/after, ||delta||, coefficients, loss curve.

The numbers come from the Gram matrix and the solver alone, so a report costs one
read pass and no merge. ``summarize`` is pure (numpy in, dict out); ``write``
puts the JSON and the two PNGs on disk; ``card_section`` is the markdown that
goes into the model card.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from mergekit_awd import solver

SCHEMA_VERSION = 1


def summarize(
    G: np.ndarray,
    H_after: np.ndarray,
    losses: Sequence[float],
    delta_sq: float,
    w: Optional[np.ndarray],
    model_names: Sequence[str],
    weights: Sequence[float],
    params: Dict,
    *,
    numel: int,
    tensors: int,
) -> Dict:
    """The report of one scope (JSON-ready): G and H_after summed over its solves.

    ``w`` (one sgd solve for the whole scope) gives per-model coefficients;
    per-tensor or Adam solves have none.
    """
    s = solver.scale_of(G)
    M = solver.pair_weights(solver.active_tasks(G))
    cos_before = solver.cosine_matrix(G)
    cos_after = solver.cosine_matrix(H_after)
    weights = [float(x) for x in weights]
    W = sum(weights)
    delta_norm = math.sqrt(max(delta_sq, 0.0))
    shared = delta_cosine_with_mean(G, H_after, delta_sq)
    coefficients = None
    if w is not None:
        coefficients = [wt - W * float(wk) for wt, wk in zip(weights, w)]
    return {
        "schema_version": SCHEMA_VERSION,
        "models": list(model_names),
        "weights": weights,
        "parameters": {k: params[k] for k in sorted(params) if k != "weight"},
        "scope_tensors": tensors,
        "scope_parameters": numel,
        "task_vector_norms": [math.sqrt(max(float(x), 0.0)) for x in np.diag(G)],
        "cosine_before": cos_before.tolist(),
        "cosine_after": cos_after.tolist(),
        "mean_abs_cosine_before": solver.mean_abs_offdiag(cos_before, M),
        "mean_abs_cosine_after": solver.mean_abs_offdiag(cos_after, M),
        "delta_norm": delta_norm,
        "delta_norm_relative": delta_norm / s if s > 0 else 0.0,
        "delta_cosine_with_mean_task_vector": shared,
        "advice": advice(shared),
        "w": None if w is None else [float(x) for x in w],
        "coefficients": coefficients,
        "loss": [float(x) for x in losses],
    }


# delta this close to the mean task vector means the fine-tunes share one component
# (a held-out benchmark with a shared instruct stage measured 0.86)
SHARED_STAGE_COSINE = 0.8


def delta_cosine_with_mean(G: np.ndarray, H: np.ndarray, delta_sq: float) -> float:
    """cos(delta, mean_k tau_k), from G, the disentangled inner products H and ||delta||^2.

    H_ii = G_ii - 2 <tau_i, delta> + ||delta||^2 gives <tau_i, delta>; sums over
    several solves stay inner products of the concatenated vectors.
    """
    K = G.shape[0]
    p = (np.diag(G) - np.diag(H) + delta_sq) / 2.0
    mean_sq = float(G.sum()) / (K * K)
    if delta_sq <= 0 or mean_sq <= 0:
        return 0.0
    return float(np.mean(p) / math.sqrt(delta_sq * mean_sq))


def advice(cosine: float) -> Optional[str]:
    """What the numbers suggest, in one sentence (None: nothing to say)."""
    if cosine < SHARED_STAGE_COSINE:
        return None
    return (
        f"delta is close to the mean task vector (cos {cosine:.2f}): the fine-tunes "
        f"likely share a stage (instruction tuning, continued pretraining) that AWD "
        f"removes from every model. If that shared part is knowledge to keep, try "
        f"keep_delta: 1, or merge with the shared checkpoint as base_model."
    )


def coefficient_kind(report: Dict) -> str:
    """What stands in place of one coefficient per model when there is none."""
    p = report["parameters"]
    if p.get("optimizer") == "adam":
        return "element-wise (adam)"
    return "per tensor" if p.get("scope") == "tensor" else "none"


def table(report: Dict) -> str:
    """A short plain-text table for the terminal."""
    lines = [
        f"{'model':44s} {'weight':>7s} {'|tau|':>10s} {'coef':>8s}",
    ]
    coefs = report["coefficients"] or [None] * len(report["models"])
    for name, wt, n, c in zip(
        report["models"], report["weights"], report["task_vector_norms"], coefs
    ):
        coef = coefficient_kind(report) if c is None else f"{c:8.4f}"
        lines.append(f"{str(name)[-44:]:44s} {wt:7.3f} {n:10.4g} {coef:>8s}")
    loss = report["loss"]
    lines.append(
        f"mean |cos| {report['mean_abs_cosine_before']:.4f} -> "
        f"{report['mean_abs_cosine_after']:.4f}   ||delta|| / RMS ||tau|| = "
        f"{report['delta_norm_relative']:.4f}   loss {loss[0]:.4g} -> {loss[-1]:.4g} "
        f"({len(loss) - 1} steps, {report['scope_tensors']} tensors)"
    )
    if report.get("advice"):
        lines.insert(-1, f"note: {report['advice']}")
    return "\n".join(lines)


def write(report: Dict, out_dir: str, prefix: str = "awd") -> List[str]:
    """``{prefix}_report.json``, the cosine heatmaps and the loss curve; returns paths."""
    os.makedirs(out_dir, exist_ok=True)
    path_json = os.path.join(out_dir, f"{prefix}_report.json")
    with open(path_json, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    return [path_json, *_plots(report, out_dir, prefix)]


def _plots(report: Dict, out_dir: str, prefix: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [os.path.basename(str(m).rstrip("/")) or str(m) for m in report["models"]]
    fig, axes = plt.subplots(1, 2, figsize=(4.2 + 1.1 * len(labels), 3.6), squeeze=False)
    for ax, key, title in (
        (axes[0][0], "cosine_before", "cos(tau_i, tau_j)"),
        (axes[0][1], "cosine_after", "cos(tau_i - delta, tau_j - delta)"),
    ):
        C = np.array(report[key])
        im = ax.imshow(C, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels if key == "cosine_before" else [], fontsize=8)
        for i in range(C.shape[0]):
            for j in range(C.shape[1]):
                color = "white" if abs(C[i, j]) > 0.6 else "black"
                ax.text(j, i, f"{C[i, j]:.2f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    heatmap = os.path.join(out_dir, f"{prefix}_cosine.png")
    fig.savefig(heatmap, dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(report["loss"])
    ax.set_xlabel("step")
    ax.set_ylabel("L = L_O + alpha L_R")
    ax.set_title("AWD solver loss", fontsize=9)
    loss_png = os.path.join(out_dir, f"{prefix}_loss.png")
    fig.savefig(loss_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [heatmap, loss_png]


def card_section(report: Dict, heatmap: Optional[str] = "awd_cosine.png") -> str:
    """The AWD section of the model card README."""
    p = report["parameters"]
    rows = "\n".join(
        f"| {m} | {w:g} | {n:.4g} | "
        + (coefficient_kind(report) if report["coefficients"] is None else f"{c:.4f}")
        + " |"
        for m, w, n, c in zip(
            report["models"],
            report["weights"],
            report["task_vector_norms"],
            report["coefficients"] or [0.0] * len(report["models"]),
        )
    )
    picture = f"\n![cosine similarity before and after]({heatmap})\n" if heatmap else ""
    keys = ("lambda", "alpha", "lr", "steps", "optimizer", "scope", "units", "select", "others",
            "keep_delta")
    hyper = ", ".join(f"{k}={p[k]}" for k in keys if k in p)
    return f"""
## Adaptive Weight Disentanglement

Merged with [AWD](https://arxiv.org/abs/2411.18729) by mergekit-awd ({hyper}).
Mean |cosine similarity| between task vectors: {report['mean_abs_cosine_before']:.4f}
before, {report['mean_abs_cosine_after']:.4f} after disentangling;
||delta|| / RMS ||tau|| = {report['delta_norm_relative']:.4f} over
{report['scope_tensors']} tensors ({report['scope_parameters']:,} parameters).
Solver loss {report['loss'][0]:.4g} -> {report['loss'][-1]:.4g}.
{("" if not report.get("advice") else chr(10) + "Note: " + report["advice"] + chr(10))}
| model | weight | norm of task vector | coefficient (weight - W w_k) |
|---|---:|---:|---:|
{rows}
{picture}"""
