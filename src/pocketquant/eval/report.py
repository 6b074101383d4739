"""Evaluation output: a terminal table, JSON, and a Markdown report with a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

from pocketquant.eval.run import EvalResult
from pocketquant.files import atomic_write

ROWS = [("ppl_token", "perplexity (token)", "{:.3f}"), ("ppl_word", "perplexity (word)", "{:.3f}"),
        ("kl_mean", "KL mean (nats)", "{:.5f}"), ("kl_median", "KL median", "{:.5f}"),
        ("kl_p99", "KL p99", "{:.5f}"), ("top1_agreement", "top-1 agreement", "{:.2%}")]


def rows(result: EvalResult) -> list[list[str]]:
    """[label, value per model...] for every metric and task."""
    out = [[label] + [fmt.format(m.metrics[key]) for m in result.models] for key, label, fmt in ROWS]
    if any("file_bytes" in m.metrics for m in result.models):
        out.append(["file MB"] + [f"{m.metrics['file_bytes'] / 1e6:.1f}" if "file_bytes" in m.metrics else ""
                                  for m in result.models])
        out.append(["bits per weight (file)"] + [f"{m.metrics['bits_per_weight']:.2f}" if "file_bytes" in m.metrics
                                                 else "" for m in result.models])
    for task in result.models[0].tasks:
        for key in ("acc", "acc_norm"):
            out.append([f"{task} {key}"] + [f"{m.tasks[task][key]:.2%}" for m in result.models])
    return out


def settings_line(result: EvalResult) -> str:
    s = result.settings
    return (f"text: {s['text']}; {s['tokens_scored']:,} tokens scored ({s['words']:,} words), context "
            f"{s['context']}, stride {s['stride']}, {s['dtype']}; KL and agreement against {s['reference']}; "
            + ", ".join(f"{k}: {n} questions" for k, n in s["tasks"].items()) + _cache_note(s))


def _cache_note(settings: dict) -> str:
    cache = settings.get("reference_cache")
    if not cache:
        return ""
    return (f"; reference {'read from' if cache['read'] else 'written to'} {cache['file']} (KL: exact over its top "
            f"{cache['kl_top_k']} tokens, the rest estimated from draws)")


def table(result: EvalResult) -> str:
    from pocketquant.tables import format_table

    header = ["metric"] + [m.name for m in result.models]
    return "\n".join([settings_line(result), ""] + format_table(header, rows(result)))


def write_json(result: EvalResult, path: str | Path):
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(result.to_dict(), indent=2)))


def write_report(result: EvalResult, directory: str | Path) -> Path:
    """report.md and plot.png in `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    header = ["metric"] + [m.name for m in result.models]
    md = ["# pocketquant evaluation", "", settings_line(result), "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows(result)]
    md += ["", "![comparison](plot.png)", ""]
    atomic_write(directory / "report.md", lambda tmp: tmp.write_text("\n".join(md), encoding="utf-8"))
    plot(result, directory / "plot.png")
    return directory / "report.md"


def plot(result: EvalResult, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m.name if len(m.name) < 28 else "…" + m.name[-27:] for m in result.models]
    panels = [("ppl_token", "perplexity (token)"), ("kl_mean", "KL mean vs reference (nats)"),
              ("top1_agreement", "top-1 agreement")]
    tasks = list(result.models[0].tasks)
    fig, axes = plt.subplots(1, len(panels) + len(tasks), figsize=(4 * (len(panels) + len(tasks)), 4))
    for ax, (key, title) in zip(axes, panels):
        ax.bar(range(len(names)), [m.metrics[key] for m in result.models], color="tab:blue")
        ax.set_title(title)
    for ax, task in zip(axes[len(panels):], tasks):
        ax.bar(range(len(names)), [m.tasks[task]["acc"] for m in result.models], color="tab:green")
        ax.set_title(f"{task} accuracy")
    for ax in axes:
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=7)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
