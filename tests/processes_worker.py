"""One process of the multi-process training tests (tests/test_train_processes.py starts it under torchrun; `job`
also runs in the test's own process for the 1-process reference). Saves {lrs, state, history} to RECORD.rank<R>.

    python -m torch.distributed.run --nproc_per_node 2 tests/processes_worker.py OUT RECORD BATCH [options]
options: --steps S, --stop-at K (a callback stops the run after step K's evaluation), --resume, --padded (examples of
4-12 tokens, batches padded to their longest: the processes' parts hold different numbers of target tokens),
--dropout (attention dropout 0.1, padded: each process draws its own dropout masks), --kd (a teacher), --hidden
(with KD's hidden-state term), --examples N.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from train_helpers import collate, tiny_job_data, tiny_job_model


class Stopped(Exception):
    pass


def padded_data(n: int):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 40, (int(torch.randint(4, 13, (1,), generator=g)),), generator=g) for _ in range(n)]


def padded_collate(rows):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def job(out, batch: int, steps: int = 6, stop_at: int | None = None, resume: bool = False, dropout: bool = False,
        examples: int = 48, padded: bool = False, kd: bool = False, hidden: bool = False) -> dict:
    """Fine-tune the tiny Mixtral of train_helpers; returns the learning rate of every step taken, the final
    weights and the history."""
    import mcsmoe_fast.train.loop as loop
    from mcsmoe_fast.train import TrainConfig, train

    torch.set_num_threads(1)
    lrs, real = [], loop._optimizer_step

    def logged(run, b, params):
        lrs.append(run.optimizer.param_groups[0]["lr"])
        return real(run, b, params)
    loop._optimizer_step = logged

    def stop(model, record):
        if record["step"] == stop_at:
            raise Stopped
    model = tiny_job_model()
    if dropout:
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.1
    padded = padded or dropout
    data = padded_data(examples) if padded else tiny_job_data(examples)
    config = TrainConfig(steps=steps, batch_size=batch, eval_every=2, learning_rate=5e-3, warmup_steps=2,
                         metric="loss", greater_is_better=False, hd_lambda=0.5 if hidden else 0.0)
    try:
        result = train(model, data, config, collate_fn=padded_collate if padded else collate,
                       eval_fn=lambda m: {}, output_dir=out, resume=resume, progress=False, callback=stop,
                       teacher=tiny_job_model(seed=1) if kd else None)
        history = result.history
    except Stopped:
        history = None
    finally:
        loop._optimizer_step = real
    return {"lrs": lrs, "state": {k: v.clone() for k, v in model.state_dict().items()}, "history": history}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("record")
    p.add_argument("batch", type=int)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--stop-at", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--dropout", action="store_true")
    p.add_argument("--examples", type=int, default=48)
    p.add_argument("--padded", action="store_true")
    p.add_argument("--kd", action="store_true")
    p.add_argument("--hidden", action="store_true")
    a = p.parse_args()
    result = job(a.out, a.batch, a.steps, a.stop_at, a.resume, a.dropout, a.examples, a.padded, a.kd, a.hidden)
    torch.save(result, f"{a.record}.rank{os.environ.get('RANK', '0')}")
    sys.exit(0)
