"""A tiny causal-LM training job shared by the training tests and the subprocess that a test kills."""
from __future__ import annotations

import torch

from mcsmoe_fast.tiny import tiny_mixtral
from mcsmoe_fast.train import TrainConfig, train


def tiny_job_model(seed: int = 0):
    return tiny_mixtral(num_experts=4, hidden_size=32, intermediate_size=48, num_layers=2, seed=seed)


def tiny_job_data(n: int = 48, length: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 40, (length,), generator=g) for _ in range(n)]


def collate(rows):
    ids = torch.stack(rows)
    return {"input_ids": ids, "labels": ids}


def perplexity_on(data):
    def eval_fn(model):
        batch = collate(data[:16])
        with torch.no_grad():
            return {"perplexity": float(torch.exp(model(**batch).loss))}
    return eval_fn


def run_tiny_job(output_dir, steps: int = 12, resume: bool = False, **overrides):
    model, data = tiny_job_model(), tiny_job_data()
    config = TrainConfig(steps=steps, batch_size=8, eval_every=3, learning_rate=5e-3, warmup_steps=2, **overrides)
    result = train(model, data, config, collate_fn=collate, eval_fn=perplexity_on(data), output_dir=output_dir,
                   resume=resume, progress=False)
    return model, result


if __name__ == "__main__":  # the run a test kills: SIGKILL inside the third save of `latest`
    import os
    import signal
    import sys

    import mcsmoe_fast.train.loop as loop

    saves = {"n": 0}
    real_write = loop.write_state

    def write_then_die(directory, progress, optimizer=None, *args):
        if optimizer is not None:
            saves["n"] += 1
            if saves["n"] == 3:
                (directory / "partial").write_text("half a checkpoint")
                os.kill(os.getpid(), signal.SIGKILL)
        real_write(directory, progress, optimizer, *args)

    loop.write_state = write_then_die
    run_tiny_job(sys.argv[1])
