"""What disentangling did: cosines before/after, ||delta||, coefficients, loss curve.

The numbers come from the Gram matrix and the solver alone, so a report costs one
read pass and no merge. ``summarize`` is pure (numpy in, dict out); ``write``
puts the JSON and the two SVG pictures on disk; ``card_section`` is the markdown that
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
    delta_relative = delta_norm / s if s > 0 else 0.0
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
        "delta_norm_relative": delta_relative,
        "delta_cosine_with_mean_task_vector": shared,
        "advice": advice(shared, delta_relative),
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


# With K task vectors summed (normalize: false), the lambda chosen on validation put
# the total lambda * sum(weights) at 1.2-4 for task arithmetic and awd on the SmolLM2
# benchmark (docs/benchmarks.md; 0.8-5.6 on the earlier toy benchmarks); mergekit's
# default lambda 1 puts it at K. The suggestion is a middle value of that range, to
# be compared on held-out data with `mergekit-awd tune`.
LAMBDA_TOTAL_RANGE = (0.8, 5.6)
LAMBDA_TOTAL = 2.4


def lambda_warning(method: str, lam: float, weights: Sequence[float], normalize: bool,
                   explicit: bool) -> Optional[str]:
    """A one-line warning when the recipe left lambda at 1 and sums many task vectors."""
    total_weight = float(sum(weights))
    if explicit or normalize or len(weights) < 3 or lam * total_weight < 3:
        return None
    low, high = LAMBDA_TOTAL_RANGE
    return (
        f"{method}: lambda is {lam:g} (the default, as in mergekit's task_arithmetic) "
        f"and {len(weights)} task vectors are summed, so the merge adds "
        f"{lam * total_weight:g} task vectors' worth of change; on the benchmarks the "
        f"best lambda * sum(weights) was {low:g}-{high:g}. Set 'lambda: "
        f"{LAMBDA_TOTAL / total_weight:.2g}' (or choose it on held-out data with "
        f"'mergekit-awd tune'), or 'normalize: true'."
    )


def advice(cosine: float, delta_relative: float) -> Optional[str]:
    """What the numbers suggest (None: nothing to say).

    On the SmolLM2 benchmark (docs/benchmarks.md) fine-tunes of a shared extra
    stage merged over the instruct model gave cos 1.00 here (||delta|| 0.55 of the
    RMS task vector), and every method scored more merged over the stage itself
    (task arithmetic 35.6 vs 28.1, awd 34.4 vs 25.6); earlier toy benchmarks found
    keep_delta 1 helping in one such case and hurting in another. So the advice
    is the shared checkpoint first, then to compare, not a verdict.
    """
    if cosine < SHARED_STAGE_COSINE:
        return None
    return (
        f"delta is close to the mean task vector (cos {cosine:.2f}; ||delta|| = "
        f"{delta_relative:.2f} of the RMS task vector): the fine-tunes share a "
        f"component (a shared stage such as instruction tuning, or shared training "
        f"data) that AWD removes from every model. If it is knowledge to keep, merge "
        f"with the shared checkpoint as base_model (on the SmolLM2 benchmark task "
        f"arithmetic, awd and TIES scored 6-21 points more that way), or compare "
        f"keep_delta: 1 with keep_delta: 0 on held-out data (mergekit-awd tune "
        f"--keep-delta 0,1)."
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
    """``{prefix}_report.json``, the cosine heatmaps and the loss curve; returns paths.

    The pictures are SVG written directly (milliseconds; matplotlib's import and
    rendering took ~1.3 s of every merge), shown by GitHub and the HF hub alike.
    """
    os.makedirs(out_dir, exist_ok=True)
    path_json = os.path.join(out_dir, f"{prefix}_report.json")
    with open(path_json, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    labels = [os.path.basename(str(m).rstrip("/")) or str(m) for m in report["models"]]
    pictures = {
        f"{prefix}_cosine.svg": heatmap_svg(report["cosine_before"], report["cosine_after"], labels),
        f"{prefix}_loss.svg": curve_svg(report["loss"]),
    }
    paths = [path_json]
    for name, svg in pictures.items():
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(svg)
        paths.append(path)
    return paths


def _color(value: float) -> str:
    """Blue (-1) - white (0) - red (+1), like matplotlib's RdBu_r."""
    v = max(-1.0, min(1.0, float(value)))
    low, high = (33, 102, 172), (178, 24, 43)
    end = high if v >= 0 else low
    t = abs(v)
    rgb = [round(255 + (c - 255) * t) for c in end]
    return "#%02x%02x%02x" % tuple(rgb)


def _text(x, y, text, size=11, anchor="middle", color="#000", rotate=None):
    from xml.sax.saxutils import escape

    turn = f' transform="rotate({rotate} {x:.1f} {y:.1f})"' if rotate is not None else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'fill="{color}" font-family="sans-serif"{turn}>{escape(str(text))}</text>')


def heatmap_svg(before, after, labels: Sequence[str], cell: int = 44) -> str:
    """Two K x K cosine heatmaps (before / after disentangling), values in the cells."""
    K = len(labels)
    short = [label if len(label) <= 18 else label[:17] + "…" for label in labels]
    margin_left, margin_top, gap = 130, 40, 40
    width = margin_left + 2 * K * cell + gap + max(20, 130 - K * cell // 2)
    height = margin_top + K * cell + 24 + int(5.5 * max(len(label) for label in short))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}">', f'<rect width="{width}" height="{height}" fill="#fff"/>']
    for panel, (title, C) in enumerate((("cos(tau_i, tau_j)", before),
                                        ("cos(tau_i - delta, tau_j - delta)", after))):
        x0 = margin_left + panel * (K * cell + gap)
        parts.append(_text(x0 + K * cell / 2, margin_top - 14, title, size=12))
        for i in range(K):
            for j in range(K):
                v = float(C[i][j])
                x, y = x0 + j * cell, margin_top + i * cell
                parts.append(f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" '
                             f'fill="{_color(v)}" stroke="#fff"/>')
                parts.append(_text(x + cell / 2, y + cell / 2 + 4, f"{v:.2f}", size=10,
                                   color="#fff" if abs(v) > 0.6 else "#000"))
        for j, label in enumerate(short):
            x, y = x0 + j * cell + cell / 2, margin_top + K * cell + 8
            parts.append(_text(x, y, label, size=10, anchor="end", rotate=-45))
        if panel == 0:
            for i, label in enumerate(short):
                parts.append(_text(x0 - 6, margin_top + i * cell + cell / 2 + 4, label,
                                   size=10, anchor="end"))
    parts.append("</svg>")
    return "\n".join(parts)


def curve_svg(values: Sequence[float], width: int = 480, height: int = 260) -> str:
    """The solver loss per step as a polyline, with its axes' end values."""
    left, right, top, bottom = 60, 15, 30, 40
    ys = [float(v) for v in values] or [0.0]
    low, high = min(ys), max(ys)
    span = (high - low) or 1.0
    n = max(len(ys) - 1, 1)
    points = " ".join(
        f"{left + (width - left - right) * i / n:.1f},"
        f"{top + (height - top - bottom) * (1 - (y - low) / span):.1f}"
        for i, y in enumerate(ys)
    )
    x_axis = height - bottom
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">',
        f'<rect width="{width}" height="{height}" fill="#fff"/>',
        _text(width / 2, 18, "AWD solver loss L = L_O + alpha L_R", size=12),
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{x_axis}" stroke="#000"/>',
        f'<line x1="{left}" y1="{x_axis}" x2="{width - right}" y2="{x_axis}" stroke="#000"/>',
        f'<polyline points="{points}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>',
        _text(left - 4, top + 4, f"{high:.4g}", size=10, anchor="end"),
        _text(left - 4, x_axis, f"{low:.4g}", size=10, anchor="end"),
        _text(left, x_axis + 16, "0", size=10),
        _text(width - right, x_axis + 16, f"{len(ys) - 1} steps", size=10, anchor="end"),
        "</svg>",
    ])


def card_section(report: Dict, heatmap: Optional[str] = "awd_cosine.svg") -> str:
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
    hyper = ", ".join(f"{k}={v}" for k, v in p.items())
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


PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f")


def lines_svg(series: Dict[str, List], title: str, x_label: str, y_label: str,
              width: int = 560, height: int = 320) -> str:
    """One polyline (with dots) per named series of (x, y) points."""
    left, right, top, bottom = 60, 150, 30, 45
    points = [p for pts in series.values() for p in pts] or [(0.0, 0.0)]
    x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
    y_low, y_high = min(p[1] for p in points), max(p[1] for p in points)
    x_span, y_span = (x_high - x_low) or 1.0, (y_high - y_low) or 1.0

    def at(x, y):
        return (left + (width - left - right) * (x - x_low) / x_span,
                top + (height - top - bottom) * (1 - (y - y_low) / y_span))

    x_axis = height - bottom
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">',
        f'<rect width="{width}" height="{height}" fill="#fff"/>',
        _text((width - right + left) / 2, 18, title, size=12),
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{x_axis}" stroke="#000"/>',
        f'<line x1="{left}" y1="{x_axis}" x2="{width - right}" y2="{x_axis}" stroke="#000"/>',
        _text(left - 4, top + 4, f"{y_high:.4g}", size=10, anchor="end"),
        _text(left - 4, x_axis, f"{y_low:.4g}", size=10, anchor="end"),
        _text(left, x_axis + 16, f"{x_low:g}", size=10),
        _text(width - right, x_axis + 16, f"{x_high:g}", size=10),
        _text((width - right + left) / 2, x_axis + 34, x_label, size=11),
        _text(16, (top + x_axis) / 2, y_label, size=11, rotate=-90),
    ]
    for i, (name, pts) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        xy = [at(x, y) for x, y in sorted(pts)]
        parts.append(f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in xy)}" '
                     f'fill="none" stroke="{color}" stroke-width="1.5"/>')
        parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>'
                     for x, y in xy)
        ly = top + 14 + 18 * i
        parts.append(f'<line x1="{width - right + 12}" y1="{ly - 4}" x2="{width - right + 30}" '
                     f'y2="{ly - 4}" stroke="{color}" stroke-width="2"/>')
        parts.append(_text(width - right + 36, ly, name, size=10, anchor="start"))
    parts.append("</svg>")
    return "\n".join(parts)
