"""One check for the compression options, shared by every caller: the same bad value is refused with
the same message by compress_experts, the pruner, streaming, TrainConfig and the CLI's defaults agree."""
import pytest

from mcsmoe_fast import compress_experts
from mcsmoe_fast.compress import CompressOptions
from mcsmoe_fast.pruner import CompressionPruner
from mcsmoe_fast.streaming.compress_stage import compress_options
from mcsmoe_fast.tiny import tiny_mixtral
from mcsmoe_fast.train import TrainConfig


@pytest.mark.parametrize("keep_ratio", [True, 0, 1.5, "0.5", None])
def test_every_caller_refuses_a_bad_keep_ratio_alike(keep_ratio):
    message = f"keep_ratio must be in (0, 1], got {keep_ratio!r}"
    model = tiny_mixtral(num_experts=4)
    callers = [lambda: CompressOptions(keep_ratio=keep_ratio), lambda: compress_experts(model, keep_ratio=keep_ratio),
               lambda: CompressionPruner(model, keep_ratio, 10), lambda: TrainConfig(keep_ratio=keep_ratio),
               lambda: compress_options({"keep_ratio": keep_ratio})]
    for call in callers:
        with pytest.raises(ValueError) as info:
            call()
        assert message in str(info.value)


@pytest.mark.parametrize("rank", [0, 2.5, True])
def test_every_caller_refuses_a_bad_rank_alike(rank):
    for call in (lambda: CompressOptions(rank=rank), lambda: compress_experts(tiny_mixtral(num_experts=4), rank=rank),
                 lambda: compress_options({"rank": rank})):
        with pytest.raises(ValueError, match=f"rank must be an int >= 1, got {rank!r}"):
            call()


def test_defaults_are_written_once():
    from mcsmoe_fast.cli import build_parser

    defaults = CompressOptions()
    assert (defaults.rank, defaults.keep_ratio, defaults.importance, defaults.svd) == (32, 0.1, "weight", "auto")
    args = build_parser()[0].parse_args(["compress", "--model", "m", "--out", "o"])
    assert (args.rank, args.keep_ratio) == (defaults.rank, defaults.keep_ratio)
    assert TrainConfig().keep_ratio == defaults.keep_ratio
    assert compress_options({}) == defaults.to_dict()
    assert CompressOptions(keep_ratio=1).keep_ratio == 1.0 and isinstance(CompressOptions(keep_ratio=1).keep_ratio, float)


@pytest.mark.parametrize("importance", ["weight", "gradient"])
def test_stats_without_activation_importance_are_refused_not_ignored(importance):
    """stats= only feeds importance='activation': with another importance they were silently unused."""
    from mcsmoe_fast.modules.compressed import CompressedMoEExperts

    model = tiny_mixtral(num_experts=4)
    with pytest.raises(ValueError, match=f"stats= is read only by importance='activation'; importance='{importance}'"):
        compress_experts(model, importance=importance, stats={"model.layers.0.mlp": object()}, progress=False)
    assert not any(isinstance(m, CompressedMoEExperts) for m in model.modules()), "refused before any layer changed"
