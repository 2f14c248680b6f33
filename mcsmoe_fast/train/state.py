"""Training state next to a checkpoint, without pickle: tensors (optimizer moments, pruner scores and
masks, the RNG) in trainer_state.safetensors, everything else (step, best metric, scheduler, history)
in trainer_state.json. Written into the checkpoint's temporary directory, so a checkpoint and its
training state appear together or not at all."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .processes import restore_rank_rng

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"


def _flatten_optimizer(state: dict, tensors: dict, prefix: str = "optimizer") -> dict:
    plain = {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        entry = plain["state"].setdefault(str(index), {})
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{index}.{key}"] = value.detach().cpu().contiguous()
                entry[key] = {"tensor": f"{prefix}.{index}.{key}"}
            else:
                entry[key] = value
    return plain


def _unflatten_optimizer(plain: dict, tensors: dict) -> dict:
    state = {}
    for index, values in plain["state"].items():
        state[int(index)] = {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
                             for k, v in values.items()}
    return {"state": state, "param_groups": plain["param_groups"]}


def write_state(directory: Path, progress: dict, optimizer=None, scheduler=None, pruner=None,
                model_state: dict | None = None, rng: dict | None = None) -> None:
    """The progress record, and with an optimizer everything a resumed run needs. `model_state`: the
    student's own state dict, for students whose checkpoint form differs (masked rows while pruning); `rng`: every
    process's random state under N processes (processes.rank_rng_states)."""
    from safetensors.torch import save_file

    if optimizer is None:
        (directory / STATE_JSON).write_text(json.dumps(progress, indent=1))
        return
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # dropout and router jitter on a GPU draw from its own generator
        tensors.update({f"rng.cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    tensors.update(rng or {})
    record = dict(progress)
    record["optimizer"] = _flatten_optimizer(optimizer.state_dict(), tensors)
    record["scheduler"] = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    if pruner is not None:
        pruner_state = pruner.state_dict()
        record["pruner"] = {"steps": pruner_state["steps"], "matrices": len(pruner_state["ema"])}
        for i, (ema, keep) in enumerate(zip(pruner_state["ema"], pruner_state["keep"])):
            tensors[f"pruner.ema.{i}"] = ema.cpu().contiguous()
            tensors[f"pruner.keep.{i}"] = keep.cpu().contiguous()
    if model_state is not None:
        record["model_tensors"] = sorted(model_state)
        tensors.update({f"model.{k}": v.detach().cpu().clone() for k, v in model_state.items()})
    save_file(tensors, str(directory / STATE_TENSORS))
    (directory / STATE_JSON).write_text(json.dumps(record, indent=1))


def read_progress(directory: Path) -> dict:
    path = Path(directory) / STATE_JSON
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: no readable training state ({exc})") from exc


def check_student_shapes(directory: Path, model, saved: dict) -> None:
    """Refuse resuming `model` from weights `saved` in `directory` whose tensors of the same names have other shapes
    (a student decomposed at another rank, or another model), naming the first few."""
    now = model.state_dict()
    differ = [f"{k} {list(v.shape)} there, {list(now[k].shape)} now" for k, v in saved.items()
              if k in now and v.shape != now[k].shape]
    if differ:
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise ValueError(f"resume: {directory} holds a student of other shapes ({'; '.join(differ[:3])}{more}): "
                         "resume with the model, and the decomposition rank, the run started from")


def restore_state(directory: Path, optimizer, scheduler, pruner=None, model=None, rank: int = 0) -> dict:
    """Load optimizer, scheduler, pruner and RNG state (process `rank`'s own where the run saved every process's;
    and `model`'s weights when they were saved here); returns the progress record."""
    from safetensors.torch import load_file

    record = read_progress(directory)
    tensors = load_file(str(Path(directory) / STATE_TENSORS))
    if model is not None:
        if "model_tensors" not in record:
            raise ValueError(f"{directory}: the saved run holds no student state to resume a pruned student from")
        state = {k: tensors[f"model.{k}"] for k in record["model_tensors"]}
        check_student_shapes(directory, model, state)
        model.load_state_dict(state, strict=True)
    optimizer.load_state_dict(_unflatten_optimizer(record["optimizer"], tensors))
    scheduler.load_state_dict({**scheduler.state_dict(), **record["scheduler"]})
    if pruner is not None:
        if "pruner" not in record:
            raise ValueError(f"{directory}: the saved run had no compression pruner")
        n = record["pruner"]["matrices"]
        pruner.load_state_dict({"steps": record["pruner"]["steps"],
                                "ema": [tensors[f"pruner.ema.{i}"] for i in range(n)],
                                "keep": [tensors[f"pruner.keep.{i}"] for i in range(n)]})
    if not restore_rank_rng(tensors, rank):
        torch.set_rng_state(tensors["rng.torch"])
        cuda = [tensors[f"rng.cuda.{i}"] for i in range(len(tensors)) if f"rng.cuda.{i}" in tensors]
        if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
    return record
