"""Aggregate the comparison's runs into results.json, report.md and PNG plots.

One table row per (task, method) at its chosen learning rate, each number the mean over seeds, with ± half the range
(max − min)/2 when there are several seeds. The numbers are rounded once, here, and both report.md and results.json
carry the rounded values, so the two always agree (tests/test_compare.py checks it).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from taso_llm.io import atomic_path, write_json, write_text

# (key in the row, column header, decimals). Cost columns first, then quality.
COLUMNS = [
    ("trainable_params", "trainable params", 0),
    ("adapter_mb", "adapter MB", 3),
    ("peak_memory_mb", "peak memory MB", 0),
    ("tokens_per_second", "tokens/s", 0),
    ("train_loss", "train loss", 3),
    ("answer_nll", "test answer NLL", 3),
    ("score", "eval score", 3),
]
SCORE_NAMES = {"strict_match": "strict exact match", "pass@1": "pass@1", "format_accuracy": "format checker accuracy",
               "-answer_nll": "−answer NLL"}


def adapter_bytes(run_dir: Path, method: str) -> int:
    """What one has to ship: the adapter file(s), or the whole model where the method trains every weight."""
    from taso_llm.methods import get_method

    pattern = "model*.safetensors" if get_method(method).trains_whole_model else "adapter_model*.safetensors"
    return sum(p.stat().st_size for p in run_dir.glob(pattern))


def run_values(metrics: dict, evaluation: dict, run_dir: Path) -> dict:
    m = evaluation["metrics"]
    peak = metrics.get("peak_cuda_bytes") or metrics.get("peak_rss_bytes") or 0
    values = {"trainable_params": metrics["trainable_params"],
              "adapter_mb": adapter_bytes(run_dir, metrics["method"]) / 2**20,
              "peak_memory_mb": peak / 2**20,
              "tokens_per_second": metrics.get("tokens_per_second") or 0.0,
              "train_loss": metrics.get("last_train_loss"),
              "answer_nll": m["answer_nll"], "score": m["score"]}
    for key in ("strict_match", "flexible_match", "pass@1", "format_accuracy"):
        if key in m:
            values[key] = m[key]
    return values


def _mean_spread(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), 0.0
    return statistics.fmean(xs), (max(xs) - min(xs)) / 2


def build_results(config, outcome: dict) -> dict:
    """results.json: config summary, per-run raw values, LR grid, and the rounded table."""
    runs, table, grid = [], [], []
    for run, metrics in outcome["grid"].items():
        grid.append({"task": run.task, "method": run.method, "lr": run.lr, "seed": run.seed,
                     "eval_loss": metrics.get("eval_loss"), "last_train_loss": metrics.get("last_train_loss")})
    by_row: dict[tuple, list] = {}
    for run, (metrics, evaluation) in outcome["final"].items():
        values = run_values(metrics, evaluation, run.dir(config))
        runs.append({"task": run.task, "method": run.method, "lr": run.lr, "seed": run.seed,
                     "effective_lr": metrics.get("learning_rate"), "score_name": evaluation["metrics"]["score_name"],
                     "loss_curve": metrics.get("loss_curve"), **values})
        by_row.setdefault((run.task, run.method), []).append(values)
    for (task, method), values in by_row.items():
        lr, selected_by = outcome["chosen"][(task, method)]
        row = {"task": task, "method": method, "lr": lr, "lr_selected_by": selected_by, "seeds": len(values)}
        for key, _, decimals in COLUMNS:
            mean, spread = _mean_spread([v.get(key) for v in values])
            row[key], row[f"{key}_spread"] = round(mean, decimals), round(spread, decimals)
        table.append(row)
    score_names = sorted({r["score_name"] for r in runs})
    return {"name": config.name, "base_model": config.base_model, "recipes": config.recipes,
            "max_steps": config.max_steps, "seeds": config.seeds, "score_names": score_names,
            "columns": [c for c, _, _ in COLUMNS], "table": table, "lr_grid": grid, "runs": runs}


def fmt(value: float, decimals: int) -> str:
    return f"{value:,.{decimals}f}".replace(",", " ") if decimals == 0 else f"{value:.{decimals}f}"


def cell(row: dict, key: str, decimals: int) -> str:
    text = fmt(row[key], decimals)
    return f"{text} ± {fmt(row[key + '_spread'], decimals)}" if row["seeds"] > 1 else text


def table_markdown(results: dict) -> str:
    head = ["task", "method", "lr"] + [title for _, title, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["table"]:
        cells = [row["task"], row["method"], f"{row['lr']:g}"] + [cell(row, k, d) for k, _, d in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_markdown(config, results: dict, plots: list[str]) -> str:
    by_task = {r["task"]: SCORE_NAMES.get(r["score_name"], r["score_name"]) for r in results["runs"]}
    parts = [f"# Method comparison: {config.name}", ""]
    if config.note:
        parts += [config.note.strip(), ""]
    parts += [f"Base model `{config.base_model}`, recipes `recipes/configs/{config.recipes}/<task>_<method>.yaml`, "
              f"{config.max_steps} steps per run, seeds {config.seeds}. Each method's learning rate is the grid value "
              f"with the lowest validation loss on seed {config.seeds[0]}; every row is the mean over the seeds "
              "± half the range (max − min)/2. Eval score: " +
              "; ".join(f"{t}: {s}" for t, s in by_task.items()) + " (higher is better). Test answer NLL: mean "
              "negative log-likelihood per reference completion token (lower is better). Peak memory: the training "
              "process's peak resident memory (peak CUDA memory on a GPU). tokens/s: training tokens per second.",
              "", table_markdown(results), ""]
    parts += ["## Learning-rate grid (validation loss, first seed)", "",
              "| task | method | lr | validation loss | last train loss |", "|---|---|---|---|---|"]
    for g in results["lr_grid"]:
        val = "–" if g["eval_loss"] is None else f"{g['eval_loss']:.4f}"
        train = "–" if g["last_train_loss"] is None else f"{g['last_train_loss']:.4f}"
        parts.append(f"| {g['task']} | {g['method']} | {g['lr']:g} | {val} | {train} |")
    parts += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    if config.real_model_command:
        parts += ["", "## The same comparison on a real model", "", "```bash", config.real_model_command.strip(),
                  "```"]
    return "\n".join(parts) + "\n"


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def plot_results(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results["table"]))
    methods = list(dict.fromkeys(r["method"] for r in results["table"]))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for run in (r for r in results["runs"] if r["task"] == task and r["loss_curve"]):
            steps, losses = zip(*run["loss_curve"])
            first = run["seed"] == results["seeds"][0]
            ax.plot(steps, losses, color=colors[run["method"]], alpha=1.0 if first else 0.45,
                    label=run["method"] if first else None)
        ax.set(title=f"{task}: training loss (chosen LR; faint = other seeds)", xlabel="step", ylabel="loss")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    _save(fig, out / "loss_curves.png")
    plt.close(fig)

    panels = [(k, t) for k, t, _ in COLUMNS if k not in ("train_loss",)]
    fig, axes = plt.subplots(len(tasks), len(panels), figsize=(3.2 * len(panels), 3.2 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        rows = [r for r in results["table"] if r["task"] == task]
        for ax, (key, title) in zip(axes[i], panels):
            values = [r[key] for r in rows]
            bars = ax.bar(range(len(rows)), values, yerr=[r[key + "_spread"] for r in rows], capsize=3,
                          color=[colors[r["method"]] for r in rows])
            ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=7)
            ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=30, fontsize=8)
            positive = [v for v in values if v > 0]
            if positive and max(positive) / min(positive) > 20:  # full FT vs adapters: orders of magnitude apart
                ax.set_yscale("log")
            elif key == "score" and all(0 <= v <= 1 for v in values):
                ax.set_ylim(0, 1.05)
            ax.set_title(f"{task}: {title}", fontsize=9)
    fig.tight_layout()
    _save(fig, out / "cost_and_score.png")
    plt.close(fig)
    return ["loss_curves.png", "cost_and_score.png"]


def write_report(config, outcome: dict) -> dict:
    out = Path(config.report_dir or config.output_dir)
    results = build_results(config, outcome)
    plots = plot_results(results, out)
    write_json(out / "results.json", results)
    write_text(out / "report.md", report_markdown(config, results, plots))
    return results
