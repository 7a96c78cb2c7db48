"""``genco report``: what a snapshot learned, in the paper's own evidence, on a uniform-random log.

The paper argues with Figure 3 (component importance from the MIL weights, by category), Table 4 (lift over
the uniform policy by number of candidates) and the calibrated sCTR of Algorithm 1. This module computes
them for a snapshot (``learner.explain``, ``learner.evaluate``) and writes them for a person:
``OUTDIR/report.md`` with PNG figures beside it, and a JSON summary for a program.

JSON (``build``): ``serving`` (the readout the snapshot serves) and ``policies`` (each readout it holds, with its
calibrated sCTR on the log and the snapshot's own estimate), ``component_importance``, ``mil_weights``,
``mil_weights_relative``,
``requests_with``, ``by_ad``, ``lift_by_candidates``, ``sctr`` (what ``genco evaluate --json`` gives),
``figures`` and ``skipped`` (a figure not drawn, and why).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

UNIFORM_POLICIES = ("explore", "fallback")  # the contract's uniformly random responses


def build(bags: Sequence, snapshot_dir: str, out: Path, k: int = 16, threads: int = 1) -> dict:
    """The report's figures for the newest snapshot in ``snapshot_dir`` on ``bags`` (validated Bags), with
    ``OUTDIR/report.md`` and the PNGs written to ``out``; returns the JSON summary."""
    from learner.evaluate import sctr_by_candidates, snapshot_sctr
    from learner.explain import explain
    from learner.features import Featurizer
    from learner.serving import ServingModel
    from learner.snapshots import SnapshotStore

    started = time.perf_counter()
    snapshot = SnapshotStore(snapshot_dir).load()
    manifest, config = snapshot.manifest, snapshot.model.config
    sctr, selections = snapshot_sctr(snapshot.model, manifest.serving, bags, k, threads)
    sctr["model_version"] = manifest.version
    estimates = manifest.estimates or {}
    summary = {
        "bags": len(bags),
        "uniform_bags": sum(bag.policy in UNIFORM_POLICIES for bag in bags),
        "model_version": manifest.version,
        "bags_seen": manifest.bags_seen,
        "model_config": manifest.model_config,
        "serving": manifest.serving,
        "policies": [{"name": name, "serves": name == manifest.serving, "model_version": manifest.version,
                      "pooled": figures["pooled"], "combination": figures["combination"],
                      "combination_matched": sum(all(chosen.get(c) == e for c, e in bag.shown.items())
                                                 for bag, chosen in zip(bags, selections[name], strict=True)),
                      "estimate": estimates.get(name)} for name, figures in sctr["readouts"].items()],
        # the model's own scores (the genco readout): its element head and its MIL head, whichever readout serves
        **explain(ServingModel(snapshot.model), Featurizer(config.sizes, config.max_candidates), bags),
        "lift_by_candidates": sctr_by_candidates(bags, selections[manifest.serving]),
        "sctr": sctr,
    }
    out.mkdir(parents=True, exist_ok=True)
    summary["figures"], summary["skipped"] = _figures(summary, manifest.progressive_logloss, out)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    (out / "report.md").write_text(markdown(summary))
    summary["report"] = str(out / "report.md")
    return summary


# -- figures ----------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Lays out, writes and closes a figure: pyplot keeps every open one alive."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _ordered(summary: dict) -> list[str]:
    """Components by importance, most first: every table and figure lists them in this order."""
    importance = summary["component_importance"]
    return sorted(importance, key=importance.get, reverse=True)


def _figures(summary: dict, curve: dict | None, out: Path) -> tuple[list[str], dict[str, str]]:
    figures, skipped = [_importance_figure(summary, out / "component_importance.png"),
                        _lift_figure(summary, out / "lift_by_candidates.png")], {}
    if summary["by_ad"]:
        figures.append(_by_ad_figure(summary, out / "by_ad.png"))
    if curve and len(curve["bags"]) >= 2:
        figures.append(_curve_figure(curve, out / "progressive_logloss.png"))
    else:
        skipped["progressive_logloss"] = ("the snapshot carries no learning curve: it was written by the streaming "
                                          "learner or before genco train kept one")
    return [str(path) for path in figures], skipped


def _importance_figure(summary: dict, path: Path) -> Path:
    plt = _pyplot()
    order = _ordered(summary)[::-1]  # barh draws bottom up: the most important on top
    mil = summary["mil_weights_relative"]
    panels = 2 if mil is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels + 1.4, 0.45 * len(order) + 1.9), squeeze=False,
                             sharey=True)
    ax = axes[0][0]
    values = [100 * summary["component_importance"][c] for c in order]
    ax.barh(order, values, color="C0")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, max(values, default=0) * 1.25 or 1)
    ax.set_xlabel("predicted CTR gain, percentage points")
    ax.set_title("component importance (genco):\nits best element vs a random one", fontsize=10)
    if mil is not None:
        ax = axes[0][1]
        weights = [mil.get(c, float("nan")) for c in order]
        ax.barh(order, weights, color="C1")
        for y, v in enumerate(weights):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
        ax.axvline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xlim(0, max(weights, default=1) * 1.25)
        ax.set_xlabel("mean MIL weight × components shown\n(1 = an equal share; dashed)")
        ax.set_title("MIL weights (paper's Figure 3):\nwhat the combination head looks at", fontsize=10)
    for row in axes:
        for a in row:
            a.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def _lift_figure(summary: dict, path: Path) -> Path:
    plt = _pyplot()
    buckets = summary["lift_by_candidates"]
    order = [c for c in _ordered(summary) if any(b["component"] == c for b in buckets)]
    fig, ax = plt.subplots(figsize=(1.5 * len(order) + 2.5, 4.4))
    width = 0.26
    for x, component in enumerate(order):
        mine = [b for b in buckets if b["component"] == component]
        for i, b in enumerate(mine):
            position = x + (i - (len(mine) - 1) / 2) * width
            if b["lift"] is None:
                continue
            lift = 100 * b["lift"]
            error = 100 * b["policy_se"] / b["uniform"] if b["policy_se"] is not None and b["uniform"] else 0.0
            ax.bar(position, lift, width * 0.92, yerr=error, capsize=2, color=f"C{i}", alpha=0.85,
                   error_kw={"lw": 0.8})
            end = lift + error if lift >= 0 else lift - error
            ax.annotate(b["candidates"], (position, end), xytext=(0, 2 if lift >= 0 else -2),
                        textcoords="offset points", ha="center", va="bottom" if lift >= 0 else "top", fontsize=7)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(order)), order, rotation=20, ha="right")
    ax.set_ylabel("calibrated sCTR lift over uniform (%)")
    ax.set_title("lift by number of candidates (paper's Table 4): fewest, middle, most\n"
                 "each bar labelled with its candidate counts; whiskers: ±1 standard error", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _by_ad_figure(summary: dict, path: Path) -> Path:
    """Heat maps over the busiest ads: component importance, and beside it the MIL weights (the paper's Figure 3
    reads them by category; a log carries ads, not categories)."""
    plt = _pyplot()
    order, rows = _ordered(summary), summary["by_ad"]
    panels = [("component importance, pp of predicted CTR", "component_importance", 100.0, "Blues")]
    if summary["mil_weights"] is not None:
        panels.append(("MIL weight × components shown", "mil_weights_relative", 1.0, "Oranges"))
    fig, axes = plt.subplots(1, len(panels), figsize=(1.05 * len(order) * len(panels) + 3.2,
                                                       0.42 * len(rows) + 2.4), squeeze=False)
    for ax, (title, key, scale, cmap) in zip(axes[0], panels, strict=True):
        grid = [[scale * row[key][c] if c in row[key] else float("nan") for c in order] for row in rows]
        image = ax.imshow(grid, cmap=cmap, aspect="auto")
        middle = (image.norm.vmin + image.norm.vmax) / 2
        for y, values in enumerate(grid):
            for x, value in enumerate(values):
                if value == value:  # not NaN: the ad has the component
                    ax.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if value > middle else "black")
        ax.set_xticks(range(len(order)), order, rotation=25, ha="right")
        ax.set_yticks(range(len(rows)), [f"{row['ad_id']} ({row['bags']:,} bags)" for row in rows])
        ax.set_title(title, fontsize=10)
        if ax is not axes[0][0]:
            ax.set_yticklabels([])
    fig.suptitle("by ad, the busiest ads; blank: the ad has no such component", fontsize=10)
    return _save(fig, path)


def _curve_figure(curve: dict, path: Path) -> Path:
    """Two panels: the progressive log loss so far (what ``genco train`` prints at its end), smooth enough to
    read, and each window's gain over predicting the running mean CTR, where a single window's noise (a
    window of 1,024 bags holds some 60 clicks) would hide the trend without its rolling mean."""
    import numpy as np

    plt = _pyplot()
    bags = np.array(curve["bags"], dtype=float)
    widths = np.diff(np.concatenate([[bags[0] - (bags[1] - bags[0])], bags]))
    model, mean = np.array(curve["model"]), np.array(curve["running_mean"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for values, style, label in ((model, "C0-", "genco (each bag scored before it is learned)"),
                                 (mean, "C7:", "predicting the running mean CTR")):
        top.plot(bags, np.cumsum(values * widths) / np.cumsum(widths), style, label=label)
    top.set_ylabel("log loss, all bags so far")
    top.set_title("progressive log loss of training", fontsize=10)
    top.legend()
    gain = 100 * (1 - model / mean)
    span = max(1, len(gain) // 15)
    rolling = np.convolve(gain * widths, np.ones(span), "valid") / np.convolve(widths, np.ones(span), "valid")
    bottom.plot(bags, gain, color="C0", alpha=0.25, lw=0.8, label="each window")
    bottom.plot(bags[span - 1 :], rolling, "C0-", lw=2, label=f"rolling mean of {span} windows")
    bottom.axhline(0, color="k", lw=0.8)
    bottom.set_ylabel("log loss below the running mean's (%)")
    bottom.set_xlabel("bags learned")
    bottom.legend()
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    return _save(fig, path)


# -- markdown ---------------------------------------------------------------------------------------

def _pct(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _lift(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.2f}%"


def markdown(summary: dict) -> str:
    """``report.md``: each artifact with a line on how to read it."""
    order = _ordered(summary)
    sctr, pol, uni = summary["sctr"], summary["sctr"]["policy"], summary["sctr"]["uniform"]
    mil, relative = summary["mil_weights"], summary["mil_weights_relative"]
    lines = [
        f"# genco report: snapshot v{summary['model_version']}",
        "",
        f"On {summary['bags']:,} bags ({summary['uniform_bags']:,} served uniformly at random, `explore` or "
        f"`fallback`); the snapshot learned from {summary['bags_seen']:,} bags. Serving: "
        f"**{summary['serving']}**.",
    ]
    if summary["uniform_bags"] < summary["bags"]:
        lines += ["", f"**Warning:** {summary['bags'] - summary['uniform_bags']:,} bags were not served uniformly "
                      "at random: calibrated sCTR (Algorithm 1) is unbiased on a uniform-random log only."]
    lines += ["", "| policy (readout of the snapshot) | serves | calibrated sCTR, pooled | whole combination "
                  "(bags matched) | the snapshot's own estimate |", "|---|---|---|---|---|"]
    for policy in summary["policies"]:
        estimate = policy["estimate"]
        own = "-" if not estimate else (f"{_pct(estimate.get('sctr'))} ± {_pct(estimate.get('se'))} on "
                                        f"{estimate.get('bags', 0):,.0f} bags")
        lines.append(f"| {policy['name']} v{policy['model_version']} | {'yes' if policy['serves'] else 'no'} | "
                     f"{_pct(policy['pooled'])} | {_pct(policy['combination'])} "
                     f"({policy['combination_matched']:,}) | {own} |")
    lines.append(f"| uniform | - | {_pct(uni['pooled'])} | {_pct(uni['combination'])} | |")
    lines += ["", "The whole combination counts only the bags whose every component the policy matches, each "
                  "weighing the product of the candidate counts: with few matched bags its figure is mostly noise, "
                  "and the pooled one is the figure to trust. The snapshot's own estimate is what the learner's "
                  "referee measured on the explore slice when it chose the readout that serves (none for a "
                  f"snapshot of `genco train`). The rest of this report reads the serving readout "
                  f"(**{summary['serving']}**) for sCTR and lifts, and the model's own element and MIL heads for "
                  "component importance and MIL weights."]
    lines += ["", "## What matters: component importance and MIL weights", "",
              "![component importance](component_importance.png)", "",
              "*Component importance*: how much choosing the model's best element rather than a random one raises "
              "the CTR the model predicts, averaged over the requests with the component. *MIL weight*: the "
              "share of the shown combination's features the combination head takes from that component (the "
              "paper's Figure 3), also times the number of components shown (1 = an equal share). The weight "
              "says what the head looks at; the importance says what a choice there is worth.", "",
              "| component | requests with it | importance (pp of CTR) | MIL weight | MIL weight × components |",
              "|---|---|---|---|---|"]
    for c in order:
        lines.append(f"| {c} | {summary['requests_with'][c]:,} | {100 * summary['component_importance'][c]:.3f} | "
                     f"{'-' if mil is None else f'{mil[c]:.3f}'} | "
                     f"{'-' if relative is None else f'{relative[c]:.2f}'} |")
    if summary["by_ad"]:
        lines += ["", f"By ad, the {len(summary['by_ad'])} ads with the most bags: importance in percentage points, "
                      "MIL weight × components in brackets.", ""]
        lines += ["![by ad](by_ad.png)", ""]
        lines += ["| ad | bags | " + " | ".join(order) + " |", "|---|---|" + "---|" * len(order)]
        for row in summary["by_ad"]:
            cells = []
            for c in order:
                value = row["component_importance"].get(c)
                weight = row.get("mil_weights_relative", {}).get(c)
                cells.append("-" if value is None else f"{100 * value:.2f}" + (
                    "" if weight is None else f" ({weight:.2f})"))
            lines.append(f"| {row['ad_id']} | {row['bags']:,} | " + " | ".join(cells) + " |")
    lines += ["", "## Calibrated sCTR (Algorithm 1)", "",
              "Per component: the policy chooses that component, the log's uniform choice stands for the others. "
              "Pooled: every component's exposures and clicks together. Whole combination: every component "
              "matched at once (the exact inverse-propensity value, noisier).", "",
              f"| component | {summary['serving']} | uniform | lift | matched exposures |", "|---|---|---|---|---|"]
    for c in order:
        value, base = pol["per_component"].get(c), uni["per_component"].get(c)
        lines.append(f"| {c} | {_pct(value)} | {_pct(base)} | "
                     f"{_lift(value / base - 1 if value is not None and base else None)} | "
                     f"{sctr['exposures'].get(c, 0):,.0f} |")
    for key in ("pooled", "combination"):
        value, base = pol[key], uni[key]
        lines.append(f"| **{key}** | {_pct(value)} | {_pct(base)} | "
                     f"{_lift(value / base - 1 if value is not None and base else None)} | |")
    lines += ["", "## Lift by number of candidates (the paper's Table 4)", "",
              "![lift by candidates](lift_by_candidates.png)", "",
              "The paper's brackets ([<3, 3-5, >5] for title, image and marketing; [<4, 4-8, >8] for the others) "
              "where each holds enough bags, else tertiles of the log's counts. The paper finds the lift grows "
              "with the candidates: more to choose from, more to gain. ± is one standard error of the policy's "
              "sCTR.", "",
              f"| component | candidates | bags | matched | {summary['serving']} sCTR | uniform | lift |",
              "|---|---|---|---|---|---|---|"]
    for c in order:
        for b in (b for b in summary["lift_by_candidates"] if b["component"] == c):
            se = "" if b["policy_se"] is None else f" ± {100 * b['policy_se']:.2f}%"
            lines.append(f"| {c} | {b['candidates']} | {b['bags']:,} | {b['matched']:,} | "
                         f"{_pct(b['policy'], 2)}{se} | {_pct(b['uniform'], 2)} | {_lift(b['lift'])} |")
    lines += ["", "## Training", ""]
    if "progressive_logloss" in summary["skipped"]:
        lines.append(f"No learning curve: {summary['skipped']['progressive_logloss']}.")
    else:
        lines += ["![progressive log loss](progressive_logloss.png)", "",
                  "Each bag's log loss as scored just before the step that learned it, beside predicting the "
                  "running mean CTR: the gap is what the model knows beyond the average."]
    lines += ["", f"Made by `genco report` in {summary['seconds']:.1f} s.", ""]
    return "\n".join(lines)
