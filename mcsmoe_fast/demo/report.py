"""The demo's output: one table (a row per model), the same as JSON, and a PNG plot of held-out
perplexity against expert bytes."""
from __future__ import annotations

import json
from pathlib import Path

COLUMNS = ("steps", "expert_params", "expert_share", "checkpoint_mb", "perplexity", "vs_full",
           "tokens_per_s_transformers", "tokens_per_s_optimized")


def format_table(rows: dict[str, dict]) -> str:
    head = f"{'model':32} {'steps':>5} {'expert params':>13} {'share':>6} {'ckpt MB':>7} {'ppl':>6} {'vs full':>7} " \
           f"{'tok/s HF':>9} {'tok/s fast':>10}"
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name:32} {r['steps']:5d} {r['expert_params']:13,d} {r['expert_share']:6.1%} "
                     f"{r['checkpoint_mb']:7.2f} {r['perplexity']:6.3f} {r['vs_full']:7.3f} "
                     f"{r['tokens_per_s_transformers']:9.0f} {r['tokens_per_s_optimized']:10.0f}")
    return "\n".join(lines)


def write_json(path: Path, rows: dict[str, dict], extra: dict) -> None:
    path.write_text(json.dumps({"rows": rows, **extra}, indent=1))


def write_plot(path: Path, rows: dict[str, dict]) -> bool:
    """Perplexity against expert bytes (fp32), a labelled point per model; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, r in rows.items():
        x = r["expert_params"] * 4 / 1e6
        ax.scatter([x], [r["perplexity"]], s=40)
        ax.annotate(name, (x, r["perplexity"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("expert weights (MB, fp32)")
    ax.set_ylabel("held-out perplexity (per byte)")
    ax.set_title("MC-SMoE on a byte-level MoE LM trained on Python's standard library")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
