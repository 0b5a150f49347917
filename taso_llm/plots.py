"""PNG figures a person would rather look at than read: the loss curve and where the adapter sits."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .io import atomic_path


def plot_run(metrics: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = metrics.get("layers") or {}
    fig, axes = plt.subplots(1, 3 if layers else 2, figsize=(16 if layers else 11, 4))
    ax_loss, ax_region = axes[0], axes[1]
    for key, label in (("loss_curve", "train"), ("eval_loss_curve", "validation")):
        curve = metrics.get(key) or []
        if curve:
            ax_loss.plot([s for s, _ in curve], [v for _, v in curve], marker="." if len(curve) < 30 else None,
                         label=label)
    ax_loss.set(xlabel="step", ylabel="loss", title=f"{metrics.get('method', '')} training loss")
    ax_loss.legend()

    # Per projection type: mean share of rows / columns in the core region, and importance mass captured.
    by_type = defaultdict(lambda: defaultdict(list))
    for name, layer in (metrics.get("layers") or {}).items():
        kind = name.rsplit(".", 1)[-1]
        d_out, d_in = layer["shape"]
        by_type[kind]["rows"].append(layer["rows"] / d_out)
        by_type[kind]["cols"].append(layer["cols"] / d_in)
        if "captured_share" in layer:
            by_type[kind]["mass"].append(layer["captured_share"])
    kinds = list(by_type)
    width = 0.27
    for i, (key, label) in enumerate((("rows", "core rows / d_out"), ("cols", "core cols / d_in"),
                                      ("mass", "importance mass in region"))):
        values = [sum(by_type[k][key]) / len(by_type[k][key]) if by_type[k][key] else 0.0 for k in kinds]
        ax_region.bar([j + (i - 1) * width for j in range(len(kinds))], values, width, label=label)
    ax_region.set_xticks(range(len(kinds)), kinds, rotation=30)
    ax_region.set(ylim=(0, 1), title="core regions (mean over layers)")
    ax_region.legend(fontsize=8)
    if layers:
        _plot_allocation(axes[2], layers)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _layer_index(name: str) -> int:
    """The decoder layer number in a module name (`model.layers.7.self_attn.q_proj` → 7), -1 if none."""
    parts = name.split(".")
    return next((int(p) for p in parts if p.isdigit()), -1)


def _plot_allocation(ax, layers: dict) -> None:
    """Trainable parameters per decoder layer × module type: where the budget went (model-wide allocation moves it)."""
    kinds = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in layers))  # model order: q, k, v, o, gate, up, down
    depth = sorted({_layer_index(n) for n in layers})
    grid = [[0.0] * len(kinds) for _ in depth]
    for name, layer in layers.items():
        grid[depth.index(_layer_index(name))][kinds.index(name.rsplit(".", 1)[-1])] += layer.get("params", 0)
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(kinds)), kinds, rotation=30)
    ax.set_yticks(range(len(depth)), [str(d) for d in depth])
    ax.set(ylabel="decoder layer", title="trainable params per layer and module")
    ax.figure.colorbar(image, ax=ax, fraction=0.046)
