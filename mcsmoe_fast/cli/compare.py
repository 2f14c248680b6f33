"""mcsmoe-fast compare: M-SMoE, HC-SMoE, REAP, REAM-style merging and frequency pruning on one model."""
from __future__ import annotations

from .common import add_calibration_options, add_dtype_option, dtype_option, first_given, subcommand, vocab_size


def add(sub):
    p = subcommand(sub, "compare", "run several expert-reduction methods at several ratios from one statistics pass "
                   "and compare their perplexity",
                   "mcsmoe-fast compare --model ./qwen3-moe --calib calib.txt --eval-text eval.txt "
                   "--methods m-smoe,hc-smoe,reap,ream,frequency --ratios 0.25,0.5 --out ./compare")
    p.add_argument("--model", required=True, help="model directory or hub id")
    p.add_argument("--calib", required=True,
                   help="calibration text: a .txt file (one sample per line), a .jsonl file, or a dataset name")
    p.add_argument("--eval-text", required=True, help="a text file whose perplexity is measured")
    p.add_argument("--eval-length", type=int, default=128, help="tokens per evaluation window (default 128)")
    p.add_argument("--methods", default="m-smoe,hc-smoe,reap,ream,frequency",
                   help="comma-separated methods (default m-smoe,hc-smoe,reap,ream,frequency; also m-smoe-standard, "
                        "hc-smoe-standard, and the merges then compressed: m-smoe+c, hc-smoe+c, ream+c)")
    p.add_argument("--ratios", default="0.25,0.5", help="comma-separated shares of experts removed")
    p.add_argument("--out", required=True, help="directory for results.json, results.md and perplexity.png")
    p.add_argument("--kd-steps", type=int, default=0,
                   help="recover every reduced model by KD from --model for this many optimizer steps (the same "
                        "budget for each) and report the perplexity after it too (default 0: one-shot only)")
    p.add_argument("--kd-text", default=None,
                   help="with --kd-steps: a text file to distil on, cut into --eval-length windows "
                        "(default: the calibration texts)")
    p.add_argument("--kd-batch-size", type=int, default=None, help="with --kd-steps: windows per step (default 8)")
    p.add_argument("--kd-lr", type=float, default=None, help="with --kd-steps: learning rate (default 1e-4)")
    p.add_argument("--kd-warmup-steps", type=int, default=None,
                   help="with --kd-steps: linear warm-up steps, at most a quarter of --kd-steps (default 16)")
    p.add_argument("--compress-rank", type=int, default=None,
                   help="for the '+c' methods (m-smoe+c, hc-smoe+c, ream+c): rank of the low-rank factors (default 32)")
    p.add_argument("--compress-keep-ratio", type=float, default=None,
                   help="for the '+c' methods: share of the sparse part's entries kept (default 0.1)")
    p.add_argument("--compress-importance", choices=("weight", "activation"), default=None,
                   help="for the '+c' methods: how rows of the sparse part are scored (default weight)")
    p.add_argument("--lm-eval", nargs="+", default=None, metavar="TASK",
                   help="lm-evaluation-harness tasks (space- or comma-separated) scored on every model too, one-shot "
                        "and after KD (causal LMs; needs `pip install lm-eval`)")
    p.add_argument("--lm-eval-include", default=None, metavar="DIR",
                   help="with --lm-eval: a directory of your own task YAML files (lm-eval's include_path)")
    p.add_argument("--num-fewshot", type=int, default=None, help="with --lm-eval: few-shot examples per task")
    p.add_argument("--lm-eval-limit", type=int, default=None, help="with --lm-eval: examples per task")
    p.add_argument("--lm-eval-batch-size", type=int, default=None, help="with --lm-eval: batch size (default 8)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget, e.g. 64GB: a model whose comparison would not fit (the model and up to three "
                        "reduced copies at once, more with KD) is compared layer by layer (each method "
                        "written into a scratch directory and evaluated one decoder layer at a time; every method but "
                        "ream+c, compressed merges by weight importance; no KD or lm-eval)")
    p.add_argument("--offload-dir", default=None,
                   help="with --max-memory: where the reduced checkpoints and the carried activations are written "
                        "and removed (default: inside --out)")
    add_calibration_options(p)
    add_dtype_option(p, saves=False)
    p.set_defaults(run=run_locked)
    return p


def compress_options(args, methods):
    """CompressOptions for the '+c' methods from the --compress-* flags; flags without such a method are refused."""
    from ..compress import CompressOptions
    from ..compare import COMPRESSED_SUFFIX

    given = {k: v for k, v in (("rank", args.compress_rank), ("keep_ratio", args.compress_keep_ratio),
                               ("importance", args.compress_importance)) if v is not None}
    if given and not any(m.endswith(COMPRESSED_SUFFIX) for m in methods):
        flags = ", ".join("--compress-" + k.replace("_", "-") for k in given)
        raise ValueError(f"{flags} set the compressed methods' settings, but --methods names none "
                         "(add m-smoe+c, hc-smoe+c or ream+c)")
    return CompressOptions(**given)


def harness_option(args, tokenizer):
    """The scorer behind --lm-eval (None without it): the harness' tasks on a model, as tasks/harness.py runs them."""
    from functools import partial

    from ..tasks.harness import check_tasks, harness_evaluate

    lm_flags = [f for f, v in (("--lm-eval-include", args.lm_eval_include), ("--num-fewshot", args.num_fewshot),
                               ("--lm-eval-limit", args.lm_eval_limit),
                               ("--lm-eval-batch-size", args.lm_eval_batch_size)) if v is not None]
    if args.lm_eval is None:
        if lm_flags:
            raise ValueError(f"{', '.join(lm_flags)} need --lm-eval TASKS")
        return None
    for flag, value in (("--lm-eval-limit", args.lm_eval_limit), ("--lm-eval-batch-size", args.lm_eval_batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    tasks = check_tasks(args.lm_eval, args.lm_eval_include)
    return partial(harness_evaluate, tokenizer=tokenizer, tasks=tasks, num_fewshot=args.num_fewshot,
                   limit=args.lm_eval_limit, batch_size=first_given(args.lm_eval_batch_size, 8),
                   include_path=args.lm_eval_include)


def refuse_results_in_model(args) -> None:
    """The results go into a directory beside the model, never into the model's directory (the CLI leaves the input
    model as it is) nor over a file, and only where they can be written."""
    from pathlib import Path

    from ..checkpoint.atomic import check_writable_place

    out, model = Path(args.out).expanduser().resolve(), Path(args.model).expanduser().resolve()
    if model.is_dir() and (out == model or model in out.parents):
        raise ValueError(f"--out {args.out} is inside the input model's directory {args.model}; choose another "
                         "directory for the results")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out} is a file; give a directory for results.json, results.md and "
                         "perplexity.png")
    check_writable_place(out / "results.json")


def run_locked(args) -> int:
    """One comparison at a time writes --out (two replaced each other's tables): its run lock held for the run."""
    from ..checkpoint.run_lock import run_lock

    refuse_results_in_model(args)  # before the lock creates --out
    with run_lock(args.out):
        return run(args)


def run(args) -> int:
    import torch

    from ..calibration_data import calibration_batches, check_batches, load_tokenizer, read_calibration_texts
    from ..compare import check_compare, compare_methods, markdown_table, write_results, write_tables
    from ..checkpoint.source_stamp import done_reading_inputs
    from ..loading import open_model
    from ..streaming.activations import check_offload_dir
    from ..train import TrainConfig
    from ..train.text import text_windows

    refuse_results_in_model(args)
    if args.offload_dir is not None and args.max_memory is None:
        raise ValueError("--offload-dir needs --max-memory: it is where the comparison larger than memory writes its "
                         "reduced checkpoints and activations (without a budget the model is compared in memory)")
    check_offload_dir(args.offload_dir)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError as exc:
        raise ValueError(f"--ratios must be comma-separated numbers, got {args.ratios!r}") from exc
    compress = compress_options(args, methods)
    check_compare(methods, ratios, compress=compress)
    if args.kd_steps < 0:
        raise ValueError(f"--kd-steps must be >= 0, got {args.kd_steps}")
    kd = None
    kd_flags = {"--kd-text": args.kd_text, "--kd-batch-size": args.kd_batch_size, "--kd-lr": args.kd_lr,
                "--kd-warmup-steps": args.kd_warmup_steps}
    if not args.kd_steps and any(v is not None for v in kd_flags.values()):
        raise ValueError(f"{', '.join(f for f, v in kd_flags.items() if v is not None)} need --kd-steps")
    if args.kd_steps:
        kd = TrainConfig(steps=args.kd_steps, batch_size=first_given(args.kd_batch_size, 8),
                         learning_rate=first_given(args.kd_lr, 1e-4),
                         warmup_steps=min(first_given(args.kd_warmup_steps, 16), args.kd_steps // 4), eval_every=0)
    from ..compare import model_copies, refuse_encoder_decoder
    from ..models.hub import load_config
    from ..streaming import fits_in_memory

    # before the tokenizer, the evaluation text and the model are read
    refuse_encoder_decoder(getattr(load_config(args.model), "is_encoder_decoder", False), args.model)
    if not fits_in_memory(args.model, args.max_memory, dtype_option(args) or torch.float32,
                          copies=model_copies(methods, kd is not None)):
        return run_streamed(args, methods, ratios, compress)
    if args.offload_dir is not None:
        print(f"the comparison fits --max-memory {args.max_memory}: compared in memory; --offload-dir is not used")
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    harness = harness_option(args, tokenizer)
    vocab = vocab_size(args.model)
    windows = text_windows(args.eval_text, tokenizer, args.eval_length, vocab).rows
    model = open_model(args.model, dtype_option(args))
    texts = read_calibration_texts(args.calib, args.num_samples, args.text_field, args.split)
    batches = calibration_batches(texts, tokenizer, args.batch_size, args.max_length)
    check_batches(batches, tokenizer, vocab)
    if harness is not None and getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("--lm-eval tasks run on causal LMs; this model is an encoder-decoder")
    kd_data = kd_windows(args, texts, tokenizer, vocab) if kd is not None else None
    done_reading_inputs()  # every method starts from the model in memory
    result = compare_methods(model, batches, windows, methods, ratios, kd=kd, kd_data=kd_data, compress=compress,
                             harness=harness, on_row=lambda partial: write_tables(partial, args.out))
    out = write_results(result, args.out)
    print(markdown_table(result), end="")
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


def run_streamed(args, methods, ratios, compress) -> int:
    """Larger than --max-memory: every method written and evaluated layer by layer (compare_streamed.py)."""
    from pathlib import Path

    from ..calibration_data import calibration_batches, check_batches, load_tokenizer, read_calibration_texts
    from ..compare import markdown_table, write_results, write_tables
    from ..compare_streamed import check_checkpoint, check_streamed_methods, compare_checkpoint
    from ..train.text import text_windows

    check_streamed_methods(methods, compress)
    for flag, given in (("--kd-steps", args.kd_steps), ("--lm-eval", args.lm_eval)):
        if given:
            raise ValueError(f"{flag} needs the model in memory; the model does not fit --max-memory "
                             f"{args.max_memory} (leave {flag} out to compare one-shot, layer by layer)")
    check_checkpoint(args.model, methods, ratios, dtype_option(args))
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    vocab = vocab_size(args.model)
    windows = text_windows(args.eval_text, tokenizer, args.eval_length, vocab).rows
    texts = read_calibration_texts(args.calib, args.num_samples, args.text_field, args.split)
    batches = calibration_batches(texts, tokenizer, args.batch_size, args.max_length)
    check_batches(batches, tokenizer, vocab)
    print(f"the model does not fit --max-memory {args.max_memory}: comparing layer by layer")
    result = compare_checkpoint(args.model, batches, windows, methods, ratios,
                                scratch=Path(args.offload_dir or args.out), max_memory=args.max_memory,
                                dtype=dtype_option(args), compress=compress,
                                on_row=lambda partial: write_tables(partial, args.out))
    out = write_results(result, args.out)
    print(markdown_table(result), end="")
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


def kd_windows(args, texts, tokenizer, vocab_size: int):
    """What KD trains on: --kd-text, or the calibration texts as one token stream, in --eval-length windows."""
    import torch

    from ..train.text import Windows, check_vocabulary, text_windows

    if args.kd_text is not None:
        return text_windows(args.kd_text, tokenizer, args.eval_length, vocab_size)
    ids = torch.tensor(tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"], dtype=torch.long)
    check_vocabulary(ids, vocab_size, "the calibration text (KD's text without --kd-text)")
    return Windows(ids, args.eval_length)
