"""`mcsmoe-fast demo`: the whole recipe with quality on a model trained here (recipe.py), measured
and written out (measure.py, report.py). `--tour` runs tour.py instead: the pipeline's mechanics on
random Switch and Mixtral models, in seconds."""
from __future__ import annotations

import re
import time
from pathlib import Path

from .recipe import QUICK, DemoPlan, run_recipe

MARK = ".mcsmoe-demo"  # written first into every --out the demo writes: its outputs, not a user's look-alikes
OUTPUTS = ("results.json", "plot.png", "checkpoints", "methods", MARK)


def prepare_out_dir(out: Path) -> Path:
    """The demo writes into a new or empty directory, or into one it wrote before (the one holding its MARK file),
    and there only its own files: it refuses any other non-empty directory, whatever its files are named (a
    user's results.json or checkpoints/ would be replaced), and one of its own where other files were added.
    Outputs of a demo run before MARK existed are refused too: delete them or choose another directory."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"--out {out} exists and is not a directory")
        entries = sorted(p.name for p in out.iterdir())
        if entries and not (out / MARK).is_file():
            raise FileExistsError(f"--out {out} is not empty and was not written by the demo (no {MARK} file; it "
                                  f"holds {', '.join(entries[:5])}): choose an empty or new directory")
        for name in entries:  # a results file whose rewrite a kill interrupted (write_text_atomic's temporary)
            if re.fullmatch(r"\.results\.json\.tmp-[0-9a-f]{8}", name):
                (out / name).unlink()
        entries = sorted(p.name for p in out.iterdir())
        foreign = [name for name in entries if name not in OUTPUTS]
        if foreign:
            raise FileExistsError(f"--out {out} holds files the demo did not write ({', '.join(foreign[:5])}); "
                                  "choose an empty or new directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARK).write_text("written by mcsmoe-fast demo: it may write into this directory again\n")
    return out


def run_demo(out_dir="mcsmoe-demo", quick: bool = False, plan: DemoPlan | None = None, progress: bool = True,
             print_fn=print) -> dict:
    """Run the recipe and write checkpoints, results.json and plot.png into out_dir (new, empty, or written by the
    demo before: prepare_out_dir); returns the rows."""
    from ..checkpoint import save_pretrained
    from ..compare import markdown_table, write_results
    from ..train.text import perplexity
    from .measure import checkpoint_mb, expert_parameters, throughput
    from .report import format_goals, format_table, method_goals, write_json, write_plot

    out = prepare_out_dir(out_dir)
    plan = plan or (QUICK if quick else DemoPlan())
    start = time.perf_counter()
    result = run_recipe(plan, progress=progress, print_fn=print_fn)
    held_out = result["held_out"]
    full_params = expert_parameters(result["rows"]["full"][0])
    full_ppl = None
    rows = {}
    for name, (model, steps) in result["rows"].items():
        ppl = perplexity(model, held_out)
        full_ppl = full_ppl or ppl
        hf, fast = throughput(model, {"input_ids": held_out[:16]})
        params = expert_parameters(model)
        slug = name.lower().replace(" + ", "-").replace(", ", "-").replace(" ", "-")
        rows[name] = {"steps": steps, "expert_params": params, "expert_share": params / full_params,
                      "checkpoint_mb": checkpoint_mb(model, out / "checkpoints" / slug), "perplexity": ppl,
                      "vs_full": ppl / full_ppl, "tokens_per_s_transformers": hf, "tokens_per_s_optimized": fast}
    methods = result["methods"]
    save_pretrained(result["teacher"], out / "checkpoints" / "teacher")  # what every method started from
    goals = method_goals(methods)
    seconds = time.perf_counter() - start
    print_fn(format_table(rows))
    print_fn(f"MC-SMoE one-shot (before its KD): perplexity {result['mc_one_shot_perplexity']:.3f}; "
             f"total {seconds:.0f} s. Tokens/s: forward over 16 x {plan.length} held-out bytes.")
    print_fn(f"\nThe field's methods on the checkpoint at step {plan.merge_step} (the teacher; 'full' below), "
             f"{methods['experts']} experts per layer; one-shot, then {methods['kd_steps']} KD steps each (the same "
             f"budget; rows end at step {plan.merge_step + methods['kd_steps']} <= {plan.steps}). exact: aliased "
             "router (E rows + expert_map); standard: M experts and M router rows (m-smoe-standard: fitted rows):")
    print_fn(markdown_table(methods).rstrip("\n"))
    print_fn(format_goals(goals))
    write_results(methods, out / "methods")
    write_json(out / "results.json", rows, {"plan": result["plan"], "seconds": seconds,
                                            "mc_one_shot_perplexity": result["mc_one_shot_perplexity"],
                                            "methods": methods, "goals": goals})
    plotted = write_plot(out / "plot.png", rows)
    print_fn(f"wrote {out}/results.json, {out}/checkpoints/, {out}/methods/"
             + (", plot.png" if plotted else " (no matplotlib: no plot)"))
    return rows
