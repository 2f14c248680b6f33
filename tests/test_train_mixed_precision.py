"""Mixed precision that accelerate cannot run is refused (session 36's half-precision audit; the test failed
before the fix): on a CPU accelerate builds neither an fp16 autocast nor a loss scaler, so mixed_precision='fp16'
trained in float32 exactly as 'no' did, and with the non-finite-loss stop turned off for fp16 a NaN loss updated
the weights and saved them. bf16, which a CPU runs, still trains in bf16."""
import pytest
import torch

from train_helpers import run_tiny_job


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for devices without fp16 autocast (the CPU)")
def test_fp16_mixed_precision_is_refused_on_a_cpu_before_any_step(tmp_path):
    with pytest.raises(ValueError, match="mixed_precision='fp16'.*no loss scaler on cpu.*use 'bf16' or 'no'"):
        run_tiny_job(tmp_path / "run", steps=3, mixed_precision="fp16")
    assert not (tmp_path / "run" / "latest").exists()


def test_bf16_mixed_precision_trains_differently_from_fp32(tmp_path):
    _, fp32 = run_tiny_job(tmp_path / "no", steps=3)
    _, bf16 = run_tiny_job(tmp_path / "bf16", steps=3, mixed_precision="bf16")
    assert [h["loss"] for h in fp32.history] != [h["loss"] for h in bf16.history]


def test_fp16_under_deepspeed_or_megatron_counts_as_loss_scaled():
    """accelerate builds no GradScaler for DeepSpeed and Megatron-LM, whose engines scale the loss themselves:
    fp16 is theirs to run, not refused."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from mcsmoe_fast.train.loop import _scales_loss

    for kind, scaled in ((DistributedType.DEEPSPEED, True), (DistributedType.MEGATRON_LM, True),
                         (DistributedType.NO, False), (DistributedType.MULTI_GPU, False)):
        assert _scales_loss(SimpleNamespace(scaler=None, distributed_type=kind)) is scaled
    assert _scales_loss(SimpleNamespace(scaler=object(), distributed_type=DistributedType.NO))
