"""The figures of a report, as functions of a loaded study (:class:`~qvec.grid.report_data.StudyData`).

Donor x receiver heatmaps of Delta (lambda = 1 beside lambda*), per-task bars of FT / FT+PTQ / QAT+PTQ, a radar of
FT+PTQ, patched+PTQ and QAT+PTQ, what RTN costs per task, which lambda the validation split picks, and every lambda
rule's Delta (from :mod:`qvec.grid.report_rules`). PNG and SVG through matplotlib's Agg backend.

A figure is one function here (or in any module imported before ``write_report`` runs) under
:func:`~qvec.grid.render.register_figure`: its name, caption, section (``scope``: "study" for the summary, "bits"
for each bit-width's section, "cost") and place (``order``, among that section's tables and figures). It saves its
files with :func:`~qvec.grid.render.save_figure` and returns their paths; returning none leaves it out of the page.
"""

from __future__ import annotations

import math
from pathlib import Path

from qvec.grid.render import nanmean, pyplot, register_figure, save_figure, unregister_figure
from qvec.grid.report_data import SEL, ZS, StudyData, study_rules_domain
from qvec.grid.report_rules import rules_figure
from qvec.vectors.rules import lam_key

__all__ = ["bars_figure", "heatmap_figure", "lambda_figure", "ptq_loss_figure", "radar_figure", "register_figure",
           "rule_deltas_figure", "unregister_figure"]


@register_figure("heatmap", title=f"Transfer Δ at {{bits}}-bit, {ZS} beside {SEL}", scope="bits", order=20)
def heatmap_figure(data: StudyData, bits: int, out_dir: Path) -> list[Path]:
    """Donor x receiver Delta at lambda = 1 beside lambda*; diverging colours centred on 0; diagonal outlined."""
    import numpy as np

    plt = pyplot()
    donors, recvs = data.donors, data.receivers
    idx = {(p.donor, p.receiver): p for p in data.pairs if p.bits == bits}
    mats = []
    for attr in ("delta_one", "delta_star"):
        m = np.full((len(donors), len(recvs)), np.nan)
        for i, d in enumerate(donors):
            for j, r in enumerate(recvs):
                if (d, r) in idx:
                    m[i, j] = getattr(idx[(d, r)], attr)
                elif d == r and attr == "delta_one":  # self-pairs not run: own vector at lambda = 1 is QAT+PTQ
                    m[i, j] = data.base("qat_ptq", r, bits) - data.base("ft_ptq", r, bits)
        mats.append(m)
    finite = np.concatenate([m[np.isfinite(m)] for m in mats]) if any(np.isfinite(m).any() for m in mats) else []
    vmax = max(1.0, float(np.nanmax(np.abs(finite)))) if len(finite) else 1.0
    n = max(len(donors), len(recvs))
    cell = 0.62 if n <= 10 else 0.42
    fig, axes = plt.subplots(1, 2, figsize=(2 * cell * len(recvs) + 3.2, cell * len(donors) + 2.2),
                             constrained_layout=True)
    fs = 8 if n <= 8 else 6 if n <= 14 else 4.5
    for ax, m, title in zip(axes, mats, (ZS, "λ* (val-selected, receiver data)"), strict=True):
        im = ax.imshow(m, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="equal")
        ax.set_xticks(range(len(recvs)), recvs, rotation=45, ha="right", fontsize=fs + 1)
        ax.set_yticks(range(len(donors)), donors, fontsize=fs + 1)
        ax.set_xlabel("receiver")
        ax.set_title(title, fontsize=10)
        for i in range(len(donors)):
            for j in range(len(recvs)):
                v = m[i, j]
                if np.isfinite(v):
                    ax.text(j, i, f"{v:+.1f}", ha="center", va="center", fontsize=fs,
                            color="white" if abs(v) > 0.6 * vmax else "black")
                if donors[i] == recvs[j]:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="0.3", lw=1.2, ls="--"))
    axes[0].set_ylabel("donor")
    fig.colorbar(im, ax=axes, shrink=0.8, label="Δ over FT+PTQ (points)")
    fig.suptitle(f"{data.model}, {bits}-bit RTN: transfer Δ (dashed diagonal = own vector = QAT ceiling)",
                 fontsize=11)
    return save_figure(fig, out_dir, f"heatmap_w{bits}")


_COLOURS = {"FT": "#4c72b0", "FT+PTQ": "#dd8452", "QAT+PTQ": "#55a868", "patched λ=1": "#c44e52",
            "patched λ*": "#8172b3"}


def _bits_colour(bits: int) -> str:
    """One colour per bit-width across figures (2-bit red ... 8-bit green)."""
    return {2: "#c44e52", 3: "#dd8452", 4: "#4c72b0", 8: "#55a868"}.get(bits, "#8172b3")


@register_figure("bars", title="FT vs FT+PTQ vs QAT+PTQ per task", order=40)
def bars_figure(data: StudyData, out_dir: Path) -> list[Path]:
    """Per-task bars of FT / FT+PTQ / QAT+PTQ, one panel per bit-width."""
    import numpy as np

    plt = pyplot()
    recvs = data.receivers
    fig, axes = plt.subplots(len(data.bits), 1, figsize=(max(6.0, 0.9 * len(recvs) + 2), 2.8 * len(data.bits)),
                             squeeze=False, constrained_layout=True)
    x = np.arange(len(recvs))
    w = 0.27
    for ax, b in zip(axes[:, 0], data.bits, strict=True):
        series = {"FT": [data.base("ft", r) for r in recvs], "FT+PTQ": [data.base("ft_ptq", r, b) for r in recvs],
                  "QAT+PTQ": [data.base("qat_ptq", r, b) for r in recvs]}
        for k, (name, vals) in enumerate(series.items()):
            ax.bar(x + (k - 1) * w, vals, w, label=name, color=_COLOURS[name])
        ax.set_xticks(x, recvs, rotation=30, ha="right")
        ax.set_ylabel("test top-1 (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{b}-bit RTN", fontsize=10, loc="left")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(ncol=3, fontsize=8, loc="upper right", bbox_to_anchor=(1.0, 1.28))
    fig.suptitle(f"{data.model}: FT vs FT+PTQ vs QAT+PTQ per task", fontsize=11)
    return save_figure(fig, out_dir, "bars")


@register_figure("radar", title="Radar per bit-width", order=50)
def radar_figure(data: StudyData, out_dir: Path) -> list[Path]:
    """A radar per bit-width: FT+PTQ, patched+PTQ (mean over donors, lambda = 1 and lambda*), QAT+PTQ.

    The radial axis starts 10 points below the lowest value (rounded down to 10), not at 0, so that gaps of a few
    points stay visible; the floor is printed on the figure.
    """
    import numpy as np

    plt = pyplot()
    recvs = data.receivers
    if len(recvs) < 3:
        return []
    ang = np.linspace(0, 2 * np.pi, len(recvs), endpoint=False)
    per_bits = {}
    for b in data.bits:
        pairs = data.pairs_at(b)
        per_bits[b] = {
            "FT+PTQ": [data.base("ft_ptq", r, b) for r in recvs],
            "patched λ=1": [nanmean(p.acc_one for p in pairs if p.receiver == r) for r in recvs],
            "patched λ*": [nanmean(p.acc_star for p in pairs if p.receiver == r) for r in recvs],
            "QAT+PTQ": [data.base("qat_ptq", r, b) for r in recvs],
        }
    values = [v for series in per_bits.values() for vals in series.values() for v in vals if not math.isnan(v)]
    floor = max(0.0, 10 * math.floor((min(values, default=0.0) - 10) / 10))
    fig, axes = plt.subplots(1, len(data.bits), figsize=(5.0 * len(data.bits), 5.4), squeeze=False,
                             subplot_kw={"projection": "polar"})
    for ax, b in zip(axes[0], data.bits, strict=True):
        ax.set_theta_offset(np.pi / 2)
        ax.set_theta_direction(-1)
        for name, vals in per_bits[b].items():
            v = np.array([floor if math.isnan(x) else x for x in vals], float)
            loop_a, loop_v = np.append(ang, ang[0]), np.append(v, v[0])
            ax.plot(loop_a, loop_v, lw=1.8, color=_COLOURS[name], label=name, ls="--" if name == "patched λ*" else "-",
                    marker="o", ms=3)  # lines only: shaded areas overlap into a grey shape that no legend names
        ax.set_xticks(ang, recvs, fontsize=8)
        ax.tick_params(axis="x", pad=10)
        ax.set_ylim(floor, 100)
        ticks = [t for t in range(int(floor) + 10, 101, 10 if 100 - floor <= 50 else 20)]
        ax.set_yticks(ticks, [str(t) for t in ticks], fontsize=6, color="0.45")
        ax.set_rlabel_position(180 / len(recvs))
        ax.set_title(f"{b}-bit (radius from {floor:.0f}%)", fontsize=10, pad=18)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"{data.model}: test top-1 (%) per receiver; patched = mean over donors (self excluded)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    return save_figure(fig, out_dir, "radar")


@register_figure("ptq_loss", title="Accuracy lost to RTN per task and bit-width", order=30)
def ptq_loss_figure(data: StudyData, out_dir: Path) -> list[Path]:
    """FT − FT+PTQ per task, grouped by bit-width: where RTN starts to hurt."""
    import numpy as np

    plt = pyplot()
    recvs = data.receivers
    bits = sorted(data.bits)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(recvs) + 2), 3.2), constrained_layout=True)
    x = np.arange(len(recvs))
    w = 0.8 / max(1, len(bits))
    for k, b in enumerate(bits):
        vals = [data.base("ft", r) - data.base("ft_ptq", r, b) for r in recvs]
        ax.bar(x + (k - (len(bits) - 1) / 2) * w, vals, w, label=f"{b}-bit", color=_bits_colour(b))
    ax.axhline(10, color="0.3", lw=0.8, ls=":")
    ax.text(-0.45, 10, "10 points", ha="left", va="bottom", fontsize=7, color="0.3",
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    ax.set_xticks(x, recvs, rotation=30, ha="right")
    ax.set_ylabel("FT − FT+PTQ (points)")
    ax.set_title(f"{data.model}: accuracy lost to RTN per task", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, out_dir, "ptq_loss")


@register_figure("lambda_star", title="Distribution of λ*", order=60)
def lambda_figure(data: StudyData, out_dir: Path) -> list[Path]:
    """How often each lambda of the grid is selected as lambda* (transfer pairs), per bit-width."""
    plt = pyplot()
    grid = sorted(float(v) for v in data.config.get("lambdas", []))
    if not grid or all(math.isnan(p.lam_star) for p in data.pairs):
        return []
    fig, ax = plt.subplots(figsize=(6.4, 2.9), constrained_layout=True)
    w = 0.8 / max(1, len(data.bits))
    for k, b in enumerate(sorted(data.bits)):
        lams = [lam_key(p.lam_star) for p in data.pairs_at(b) if not math.isnan(p.lam_star)]
        counts = [lams.count(lam_key(g)) for g in grid]
        ax.bar([i + (k - (len(data.bits) - 1) / 2) * w for i in range(len(grid))], counts, w, label=f"{b}-bit",
               color=_bits_colour(b))
    ax.set_xticks(range(len(grid)), [f"{g:g}" for g in grid])
    ax.set_xlabel("λ* (chosen on the receiver's validation split: uses receiver data)")
    ax.set_ylabel("transfer pairs")
    ax.set_title(f"{data.model}: which λ the validation split picks", fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, out_dir, "lambda_star")


@register_figure("rules", title="Transfer Δ per λ rule", order=70)
def rule_deltas_figure(data: StudyData, out_dir: Path) -> list[Path]:
    """Every lambda rule's transfer Delta (qvec.grid.report_rules), when the study measured more than ``one`` and
    ``val``."""
    rules, domain = study_rules_domain(data)
    return rules_figure(data.outcomes, rules, data.bits, out_dir, domain) if len(rules) > 2 else []
