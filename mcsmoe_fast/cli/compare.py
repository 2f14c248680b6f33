"""mcsmoe-fast compare: M-SMoE, HC-SMoE, REAP, REAM-style merging and frequency pruning on one model."""
from __future__ import annotations

from .common import add_calibration_options, add_dtype_option, dtype_option, subcommand


def add(sub):
    p = subcommand(sub, "compare", "run several expert-reduction methods at several ratios from one statistics pass "
                   "and compare their perplexity",
                   "mcsmoe-fast compare --model ./qwen3-moe --calib calib.txt --eval-text eval.txt "
                   "--methods m-smoe,hc-smoe,reap,ream,frequency --ratios 0.25,0.5 --out ./compare")
    p.add_argument("--model", required=True, help="model directory or hub id")
    p.add_argument("--calib", required=True,
                   help="calibration text: a .txt file (one sample per line), a .jsonl file, or a dataset name")
    p.add_argument("--eval-text", required=True, help="a text file whose perplexity is measured")
    p.add_argument("--eval-length", type=int, default=128, help="tokens per evaluation window")
    p.add_argument("--methods", default="m-smoe,hc-smoe,reap,ream,frequency", help="comma-separated methods")
    p.add_argument("--ratios", default="0.25,0.5", help="comma-separated shares of experts removed")
    p.add_argument("--out", required=True, help="directory for results.json, results.md and perplexity.png")
    add_calibration_options(p)
    add_dtype_option(p)
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from ..calibration_data import calibration_batches, check_batches, load_tokenizer, read_calibration_texts
    from ..compare import check_compare, compare_methods, markdown_table, write_results
    from ..loading import open_model
    from ..train.text import text_windows

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError as exc:
        raise ValueError(f"--ratios must be comma-separated numbers, got {args.ratios!r}") from exc
    check_compare(methods, ratios)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    windows = text_windows(args.eval_text, tokenizer, args.eval_length).rows
    model = open_model(args.model, dtype_option(args))
    texts = read_calibration_texts(args.calib, args.num_samples, args.text_field, args.split)
    batches = calibration_batches(texts, tokenizer, args.batch_size, args.max_length)
    check_batches(batches, tokenizer, model.config.vocab_size)
    result = compare_methods(model, batches, windows, methods, ratios)
    out = write_results(result, args.out)
    print(markdown_table(result), end="")
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0
