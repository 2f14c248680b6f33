"""Plain transformers models and configs from a local directory or a hub id (the right head class), and
the one check of a model source: a directory, or a hub id asked about once, briefly."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .registry import family_of


def model_class_for(config):
    """The transformers head class of the config's family (registry.py): AutoModelForSeq2SeqLM or
    AutoModelForCausalLM where the model type is registered there; else the class the checkpoint names
    (config.architectures, written by save_pretrained), else the base model (AutoModel): a family that
    transformers gives no causal-LM class still saves and loads back as itself."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if family_of(config.model_type).seq2seq:
        return AutoModelForSeq2SeqLM
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    named = [getattr(transformers, a) for a in (getattr(config, "architectures", None) or []) if hasattr(transformers, a)]
    return named[0] if named else AutoModel


def float32_kept(model: nn.Module, dtype: torch.dtype) -> set[str]:
    """The names of the tensors transformers' from_pretrained keeps in float32 when it loads `model` in `dtype`
    (_keep_in_fp32_modules for float16, _keep_in_fp32_modules_strict for float16 and bfloat16, e.g. DeepSeek-V3's
    router gate and score-correction bias), matched as transformers matches them."""
    import re

    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return set()
    pattern = re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in plan))
    return {name for name, _ in (*model.named_parameters(), *model.named_buffers()) if pattern.search(name)}


def keep_float32_(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast float32_kept(model, dtype) to float32 (meta tensors stay meta)."""
    kept = float32_kept(model, dtype)
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if name in kept and t.is_floating_point():
            t.data = t.data.float()


def cast_as_loaded_(model: nn.Module, dtype: torch.dtype) -> None:
    """model.to(dtype) as from_pretrained(dtype=dtype) would load it: float32_kept tensors go to float32 from
    their current values (never through `dtype`), and buffers no checkpoint holds (non-persistent, such as the
    rotary embedding's inv_freq) keep the dtype the model built them in, as transformers leaves them. A cast to
    float16 that would make weights inf is refused (check_float16_range)."""
    kept = float32_kept(model, dtype)
    transient = {f"{prefix}.{b}" if prefix else b for prefix, module in model.named_modules()
                 for b in module._non_persistent_buffers_set}
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.is_floating_point() and name not in transient:
            cast = t.data.to(torch.float32 if name in kept else dtype)
            if t.dtype != cast.dtype:
                check_float16_range(name, cast, t.data)
            t.data = cast


FLOAT16_MAX = torch.finfo(torch.float16).max  # 65504


class Float16Overflow(ValueError):
    """Weights a cast to float16 would make inf (check_float16_range)."""


def check_float16_range(name: str, cast: torch.Tensor, original: torch.Tensor | None = None) -> None:
    """Refuse tensor `name` cast to float16 from a wider dtype (bfloat16, float32) when the cast made values inf:
    weights beyond float16's range (|w| > 65504) would run on as inf through every step. One pass over `cast`
    (its min and max); `original`, the tensor before the cast where it is at hand, gives the largest |w| (infs it
    held itself pass)."""
    if cast.dtype != torch.float16 or cast.numel() == 0 or all(m.isfinite() for m in torch.aminmax(cast)):
        return
    overflow = torch.isinf(cast) if original is None else torch.isinf(cast) & torch.isfinite(original)
    count = int(overflow.sum())
    if count:
        bound = "|w|" if original is None else f"max |w| {original[overflow].abs().max().item():.4g}"
        raise Float16Overflow(f"{name}: {count} value{'s' if count > 1 else ''} beyond float16's range "
                              f"({bound} > {FLOAT16_MAX:.0f}), inf in float16; use --dtype bfloat16 or float32 "
                              "(dtype=torch.bfloat16 or torch.float32)")


def checked_dtype(dtype):
    """`dtype` as the loaders take it: None, "auto" (the dtype the weights were saved in), a floating-point
    torch dtype or its name ("bfloat16"); anything else is a ValueError naming it."""
    if dtype is None or dtype == "auto":
        return dtype
    parsed = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not (isinstance(parsed, torch.dtype) and parsed.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch dtype, its name (e.g. 'bfloat16') or 'auto', "
                         f"got {dtype!r}")
    return parsed


class IncompleteCheckpoint(ValueError):
    """A transformers checkpoint whose weights lack tensors of the model its config builds."""


def complete(name_or_path: str, loaded):
    """The model of transformers' from_pretrained(..., output_loading_info=True), refused when the weights lacked
    tensors or held them in another shape: transformers would initialise those at random and only log it. The
    tensors a class declares ignorable (tied, recomputed) are not among its missing keys."""
    model, info = loaded
    missing = sorted(info["missing_keys"] | {k[0] for k in info["mismatched_keys"]})
    if missing:
        raise IncompleteCheckpoint(f"{name_or_path}: the weights lack {missing[:5]}{'...' if len(missing) > 5 else ''}"
                                   " (missing or of another shape; transformers would initialise them at random): "
                                   "a truncated or mismatched checkpoint, save or download it again")
    return model


def load_model(name_or_path: str, dtype: torch.dtype | str | None = None):
    """The model in eval mode; a plain transformers checkpoint (see checkpoint/ for merged ones), in float32
    unless `dtype` (checked_dtype) is given. IncompleteCheckpoint when its weights lack tensors; Float16Overflow
    naming the tensor when float16 makes weights of a wider checkpoint inf (check_float16_range)."""
    from transformers import AutoConfig

    dtype = checked_dtype(dtype)
    name_or_path = local_or_hub(name_or_path)
    config = AutoConfig.from_pretrained(name_or_path)
    return loaded(name_or_path, config, dtype)


def loaded(name_or_path: str, config, dtype, **kwargs):
    """from_pretrained of load_model and load_cached, checked (complete); loaded in float16 from a checkpoint
    stored in another dtype, every float16 tensor checked for weights the cast made inf."""
    stored = str(getattr(config, "dtype", None)).removeprefix("torch.")
    model = complete(name_or_path, model_class_for(config).from_pretrained(
        name_or_path, dtype=dtype or torch.float32, output_loading_info=True, **kwargs)).eval()
    if dtype == torch.float16 and stored != "float16":
        for name, t in model.state_dict().items():
            check_float16_range(name, t)
    return model


def local_or_hub(spec) -> str:
    """A local directory with `~` expanded (transformers would read "~/model" as a malformed hub id), else spec."""
    local = Path(spec).expanduser()
    return str(local) if local.is_dir() else str(spec)


def looks_like_path(spec: str) -> bool:
    """A model argument meant as a local path rather than a hub id ("org/name")."""
    return (spec.startswith((".", "~", os.sep)) or os.sep * 2 in spec or spec.count("/") > 1
            or Path(spec).expanduser().exists())


def check_model_source(spec: str, what: str = "model") -> None:
    """Fail at once, in one line that names `spec`, when it names no `what` (model or tokenizer) to load:
    run before any tokenizer, config or data is read, so no loader's retries run (the CLI checks --model
    this way before a subcommand starts).

    A directory passes; a path that is not a directory fails without any network; a hub id passes when
    it is in the Hugging Face cache, and otherwise the Hub is asked once, briefly (no retries)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise FileNotFoundError(f"{spec} is a file, not a {what} directory")
    if looks_like_path(spec):
        raise FileNotFoundError(f"{what} directory not found: {spec}")
    if not in_hub_cache(spec):
        check_hub(spec, what)


def in_hub_cache(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds files of the repo (its config or tokenizer), without any request."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return any(isinstance(try_to_load_from_cache(repo_id, name), str)
                   for name in ("config.json", "tokenizer_config.json", "tokenizer.json"))
    except ValueError:  # not a valid repo id: the Hub check names the problem
        return False


def local_directory(spec) -> Path | None:
    """The directory holding a model's files: a local directory ("~" expanded), or the snapshot of a hub id in
    the Hugging Face cache (None when its config.json is not cached; the snapshot may lack other files)."""
    from huggingface_hub import try_to_load_from_cache

    local = Path(spec).expanduser()
    if local.is_dir():
        return local
    try:
        cached = try_to_load_from_cache(str(spec), "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(cached).parent if isinstance(cached, str) else None


SNAPSHOT_SKIPPED = ("*/*", "*.bin", "*.pt", "*.pth", "*.gguf", "*.h5", "*.msgpack", "*.onnx")  # not downloaded


def snapshot_directory(repo_id: str, complete) -> Path:
    """The snapshot directory of a hub id in the Hugging Face cache: the cached one when `complete(directory)`
    says it holds every file needed (no request), else the repo's files downloaded into it once the Hub has
    answered (check_hub; offline: its one-line error). Files the cache holds are not fetched again; subfolders
    and other frameworks' weights (SNAPSHOT_SKIPPED) are left out."""
    from huggingface_hub import snapshot_download

    try:
        cached = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError: no snapshot of the repo is cached
        cached = None
    if cached is not None and complete(cached):
        return cached
    check_hub(repo_id)
    return Path(snapshot_download(repo_id, ignore_patterns=list(SNAPSHOT_SKIPPED)))


def load_config(spec: str):
    """AutoConfig of a directory or hub id, from the cache first: a cached hub id needs no request (and so
    meets none of huggingface_hub's retries offline)."""
    from transformers import AutoConfig

    spec = local_or_hub(spec)
    if not Path(spec).is_dir():
        try:
            return AutoConfig.from_pretrained(spec, local_files_only=True)
        except (OSError, ValueError):  # not cached, or not a repo id: the check says which, in one line
            check_model_source(spec)
    return AutoConfig.from_pretrained(spec)


def load_cached(repo_id: str, dtype):
    """The model of a hub id from the local cache only (OSError when it is not cached), as load_model."""
    from transformers import AutoConfig

    dtype = checked_dtype(dtype)
    config = AutoConfig.from_pretrained(repo_id, local_files_only=True)
    return loaded(repo_id, config, dtype, local_files_only=True)


_SERVED: set[str] = set()  # repo ids the Hub answered for in this process: asked about once


def check_hub(repo_id: str, what: str = "model") -> None:
    """One short request for the repo; a clear one-line error instead of huggingface_hub's retries (five, with
    backoff, about 50 s offline)."""
    from huggingface_hub import HfApi
    from huggingface_hub.constants import ENV_VARS_TRUE_VALUES

    if repo_id in _SERVED:
        return
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ENV_VARS_TRUE_VALUES:  # read as huggingface_hub reads it
        raise ValueError(f"{what} {repo_id!r} is not a local directory nor in the Hugging Face cache, "
                         "and HF_HUB_OFFLINE is set")
    try:
        HfApi().model_info(repo_id, timeout=10)
    except Exception as exc:  # connection errors, unknown repo, gated repo: one line that names it
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{what} {repo_id!r} is not a local directory, not in the Hugging Face cache, and the "
                         f"Hub did not serve it ({type(exc).__name__}: {reason})") from None
    _SERVED.add(repo_id)
