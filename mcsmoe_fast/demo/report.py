"""The demo's output: one table (a row per model), the same as JSON, and a PNG plot of held-out
perplexity against expert bytes."""
from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint.atomic import write_text_atomic

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
    write_text_atomic(path, json.dumps({"rows": rows, **extra}, indent=1))


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


MERGING = ("m-smoe", "m-smoe-standard", "hc-smoe", "ream", "m-smoe+c", "hc-smoe+c", "ream+c")  # issue 21's "our merging methods, each optionally compressed"


def method_goals(methods: dict) -> list[dict]:
    """Per ratio of the method comparison, the two goals measured after KD: the standard form within 3% of
    the aliased form's perplexity (issue 20), and the best merging method at most REAP's (issue 21)."""
    by = {(r["method"], r["ratio"]): r for r in methods["rows"]}
    goals = []
    for ratio in sorted({r["ratio"] for r in methods["rows"] if r["method"] != "full"}):
        goal = {"ratio": ratio}
        exact, standard = by.get(("m-smoe", ratio)), by.get(("m-smoe-standard", ratio))
        if exact and standard and "perplexity_kd" in exact:
            gap = standard["perplexity_kd"] / exact["perplexity_kd"] - 1
            goal.update(experts=exact["experts"], aliased_kd=exact["perplexity_kd"],
                        standard_kd=standard["perplexity_kd"], standard_gap=gap, standard_within_3pct=gap <= 0.03)
        merging = [by[(m, ratio)] for m in MERGING if (m, ratio) in by and "perplexity_kd" in by[(m, ratio)]]
        reap = by.get(("reap", ratio))
        if merging and reap and "perplexity_kd" in reap:
            best = min(merging, key=lambda r: r["perplexity_kd"])
            goal.update(best_merging=best["method"], best_merging_kd=best["perplexity_kd"], reap_kd=reap["perplexity_kd"],
                        merging_beats_reap=best["perplexity_kd"] <= reap["perplexity_kd"])
        goals.append(goal)
    return goals


def format_goals(goals: list[dict]) -> str:
    lines = []
    for g in goals:
        head = f"{g['ratio']:.0%} fewer experts"
        if "standard_gap" in g:
            lines.append(f"{head} ({g['experts']} kept): M-SMoE standard form after KD {g['standard_kd']:.3f} vs the "
                         f"aliased form {g['aliased_kd']:.3f}: {g['standard_gap']:+.1%} (goal <= +3%: "
                         f"{'met' if g['standard_within_3pct'] else 'NOT met'})")
        if "best_merging" in g:
            lines.append(f"{head}: best merging method after KD {g['best_merging']} {g['best_merging_kd']:.3f} vs REAP "
                         f"{g['reap_kd']:.3f} (goal: merging <= REAP: {'met' if g['merging_beats_reap'] else 'NOT met'})")
    return "\n".join(lines)
