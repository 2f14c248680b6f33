"""The runtime modules keep what transformers' modules promise: frozen experts stay frozen per matrix, a Switch
router's hooks stay removable and see transformers' router output, a Llama-4 block's and its experts' hooks keep
firing, compressed slots run under torch.autocast (forward, backward, bf16 training) and check their banks."""
import copy

import pytest
import torch

from mcsmoe_fast import compress_experts, moe_layers, optimize
from mcsmoe_fast.compress import full_bank
from mcsmoe_fast.modules import CompressedMoEExperts
from mcsmoe_fast.reference import grouped_expert_ffn_slr
from mcsmoe_fast.tiny import tiny_mixtral, tiny_moe, tiny_switch
from mcsmoe_fast.train import TrainConfig, train


def switch_inputs(enc=12, dec=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(input_ids=torch.randint(2, 128, (2, enc), generator=gen),
                decoder_input_ids=torch.randint(2, 128, (2, dec), generator=gen))


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# --- 1. frozen experts: each stacked bank keeps the flag of the tensors it stacks -------------------------
def sgd_step(model, inputs):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**inputs, labels=inputs["decoder_input_ids"]).loss.backward()
    opt.step()


def test_optimize_keeps_frozen_switch_wi_frozen_and_trains_wo_as_transformers():
    base = tiny_switch(num_experts=4)  # eval: no expert dropout, one deterministic step
    for name, p in base.named_parameters():
        if ".wi." in name and "experts" in name:
            p.requires_grad_(False)
    fast = optimize(copy.deepcopy(base))
    assert all(not layer.module.experts.w_in.requires_grad and layer.module.experts.w_out.requires_grad
               for layer in moe_layers(fast))
    before = [[w.clone() for w in layer.expert_weights()] for layer in moe_layers(fast)]
    sgd_step(base, switch_inputs())
    sgd_step(fast, switch_inputs())
    for (w_in0, _), lf, lb in zip(before, moe_layers(fast), moe_layers(base)):
        assert torch.equal(lf.expert_weights()[0], w_in0)  # frozen wi: not moved
        assert torch.allclose(lf.expert_weights()[1], lb.expert_weights()[1], atol=1e-6)  # wo: transformers' step


def test_optimize_refuses_experts_of_one_bank_frozen_differently_before_changing_anything():
    base = tiny_switch(num_experts=4)
    block = moe_layers(base)[0]
    block.module.experts["expert_0"].wi.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=rf"{block.name}: the w_in matrices of experts \[0\] are frozen"):
        optimize(base)
    assert all(type(layer.module).__name__ == "SwitchTransformersSparseMLP" for layer in moe_layers(base))


# --- 2. + 3. a Switch router's hooks: removable, and they see transformers' router output ---------------------
def test_switch_router_hooks_registered_before_optimize_are_removable_after():
    base = tiny_switch(num_experts=4)
    model = copy.deepcopy(base)
    router = moe_layers(model)[0].module.router
    calls = []
    handle = router.register_forward_hook(lambda mod, args, out: calls.append(1))
    pre = router.register_forward_pre_hook(lambda mod, args: (args[0] * 0,))
    optimize(model)
    with torch.no_grad():
        model(**switch_inputs())
    assert len(calls) == 1  # still registered: it fires
    handle.remove()
    pre.remove()
    with torch.no_grad():
        assert torch.allclose(model(**switch_inputs()).logits, base(**switch_inputs()).logits, atol=1e-5)
    assert len(calls) == 1


def test_switch_router_hook_sees_transformers_dispatch_mask_after_optimize():
    base = tiny_switch(num_experts=4, expert_capacity=2)  # the capacity binds on 12 tokens
    seen = {}

    def record(tag):
        return lambda mod, args, out: seen.setdefault(tag, [t.detach().clone() for t in out])

    fast = copy.deepcopy(base)
    moe_layers(base)[0].module.router.register_forward_hook(record("transformers"))
    moe_layers(fast)[0].module.router.register_forward_hook(record("optimized"))
    optimize(fast)
    with torch.no_grad():
        want, got = base(**switch_inputs()).logits, fast(**switch_inputs()).logits
    assert torch.allclose(got, want, atol=1e-5)
    for t_got, t_want in zip(seen["optimized"], seen["transformers"]):
        assert t_got.shape == t_want.shape and torch.equal(t_got, t_want)  # mask [B, L, E], probs, logits


# --- 4. Llama-4: hooks on the replaced block and on its experts module ---------------------------------------
def test_llama4_block_and_experts_hooks_fire_with_transformers_values_and_stay_removable():
    base = tiny_moe("llama4_text")
    x = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    seen = {}

    def record(tag):
        return lambda mod, args, out: seen.setdefault(tag, []).append((args[0].detach().clone(), out))

    fast = copy.deepcopy(base)
    handles = []
    for tag, model in (("transformers", base), ("optimized", fast)):
        block = moe_layers(model)[0].module
        handles.append(block.register_forward_hook(record(tag + " block")))
        handles.append(block.experts.register_forward_hook(record(tag + " experts")))
    optimize(fast)
    assert type(moe_layers(fast)[0].module).__name__ == "Llama4MoE"
    with torch.no_grad():
        assert torch.allclose(fast(input_ids=x).logits, base(input_ids=x).logits, atol=1e-5)
    for part in ("block", "experts"):
        (arg_got, out_got), = seen["optimized " + part]
        (arg_want, out_want), = seen["transformers " + part]
        assert torch.allclose(arg_got, arg_want, atol=1e-6)
        for t_got, t_want in zip(*((o,) if torch.is_tensor(o) else o for o in (out_got, out_want))):
            assert t_got.shape == t_want.shape and torch.allclose(t_got, t_want, atol=1e-5)
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        fast(input_ids=x)
    assert len(seen["optimized block"]) == 1 and len(seen["optimized experts"]) == 1


# --- 5. compressed slots under torch.autocast --------------------------------------------------------------
def compressed_slots(seed=0, S=3, E=4, d=16, ff=12):
    g = torch.Generator().manual_seed(seed)
    w_in, w_out = torch.randn(S, 2 * ff, d, generator=g) / 4, torch.randn(S, d, ff, generator=g) / 4
    bank_in, bank_out = full_bank(w_in, 3, "exact"), full_bank(w_out, 3, "exact")
    for bank in (bank_in, bank_out):  # keep every other row: a sparse S
        kept = torch.arange(bank[3].numel()) % 2 == 0
        per_slot = torch.zeros_like(bank[4])
        per_slot[1:] = kept.view(S, -1).sum(1).cumsum(0)
        bank[2], bank[3], bank[4] = bank[2][kept], bank[3][kept], per_slot
    return CompressedMoEExperts(bank_in, bank_out, torch.tensor([0, 1, 2, 1])[:E], "swiglu")


@pytest.mark.parametrize("grad", [False, True])
def test_compressed_slots_under_autocast_compute_in_their_dtype_forward_and_backward(grad):
    experts = compressed_slots()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 16, generator=g, requires_grad=grad)
    index = torch.randint(0, 4, (7, 2), generator=g)
    weights = torch.rand(7, 2, generator=g).requires_grad_(grad)
    banks = [experts.bank("in"), experts.bank("out")]
    want = grouped_expert_ffn_slr(x, *banks, experts.expert_map, index, weights, "swiglu")
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        got = experts(x, index, weights)
    assert got.dtype == x.dtype and torch.allclose(got, want, atol=1e-5)
    if grad:
        params = [x, weights, experts.in_U, experts.in_V, experts.in_S_rows, experts.out_S_rows]
        g_want = torch.autograd.grad(want.square().sum(), params)
        g_got = torch.autograd.grad(got.square().sum(), params)
        for a, b in zip(g_got, g_want):
            assert a.dtype == b.dtype and torch.allclose(a, b, atol=1e-5)


def test_compressed_model_runs_under_bf16_autocast_as_transformers_does():
    base = tiny_moe("mixtral")
    model = copy.deepcopy(base)
    compress_experts(model, rank=1000, keep_ratio=1.0, progress=False)  # full rank, every row: the same function
    optimize(model)
    x = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            assert rel(model(input_ids=x).logits, base(input_ids=x).logits) < 0.03
        grads = []
        for m in (model.train(), base.train()):
            embeds = m.get_input_embeddings()(x).detach().requires_grad_(True)
            loss = m(inputs_embeds=embeds, labels=x).loss
            grads.append((loss.detach(), torch.autograd.grad(loss, embeds)[0]))
    (loss, grad), (loss_want, grad_want) = grads
    assert rel(loss, loss_want) < 0.02 and rel(grad, grad_want) < 0.05


def test_compressed_switch_trains_under_autocast_as_transformers_with_fp32_experts():
    """The expert-dropout path (slot_linears) too: under autocast our compressed slots compute in float32, so the
    reference is transformers' model with its experts run in float32 (autocast off around each expert)."""
    base = tiny_switch(num_experts=4).train()
    model = copy.deepcopy(base)
    compress_experts(model, rank=1000, keep_ratio=1.0, progress=False)
    optimize(model).train()
    for block in moe_layers(base):
        for expert in block.module.experts.values():
            def fp32_forward(x, forward=expert.forward):
                with torch.autocast("cpu", enabled=False):
                    return forward(x.float())
            expert.forward = fp32_forward
    inputs, losses = switch_inputs(), []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for m in (model, base):
            torch.manual_seed(0)  # the same expert-dropout masks
            loss = m(**inputs, labels=inputs["decoder_input_ids"]).loss
            loss.backward()
            losses.append(loss.detach())
    assert rel(losses[0], losses[1]) < 1e-3
    assert moe_layers(model)[0].module.experts.in_U.grad is not None


def test_bf16_mixed_precision_training_of_a_compressed_student_follows_fp32_training():
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 40, (12,), generator=g) for _ in range(8)]

    def collate(rows):
        return {"input_ids": torch.stack(rows), "labels": torch.stack(rows)}

    student = tiny_mixtral(num_experts=4, hidden_size=32, intermediate_size=48, seed=1)
    compress_experts(student, rank=4, keep_ratio=0.5, importance="gradient", progress=False)  # pruning state
    losses = {}
    for precision in ("no", "bf16"):
        config = TrainConfig(steps=2, batch_size=8, eval_every=1, learning_rate=1e-3, mixed_precision=precision,
                             keep_ratio=0.5)
        result = train(copy.deepcopy(student), data, config, collate_fn=collate, progress=False,
                       eval_fn=lambda model: {"perplexity": 1.0})  # the record keeps each step's training loss
        losses[precision] = torch.tensor([r["loss"] for r in result.history])
    assert len(losses["bf16"]) == 2 and torch.isfinite(losses["bf16"]).all()
    assert rel(losses["bf16"], losses["no"]) < 0.02  # step 2's loss is after step 1's update


# --- 6. compressed slots check their banks at construction --------------------------------------------------
@pytest.mark.parametrize("w_out_shape, words", [((3, 8, 6), "w_in has 2 slots but w_out has 3"),
                                                ((2, 9, 6), r"w_in \[S, F, d\] = \[2, 12, 8\] does not match w_out "
                                                            r"\[S, d, ff\] = \[2, 9, 6\]"),
                                                ((2, 8, 5), r"= \[2, 8, 5\] for swiglu: F must be 10 \(2 ff\)")])
def test_compressed_slots_refuse_banks_that_do_not_belong_together(w_out_shape, words):
    g = torch.Generator().manual_seed(0)
    w_in = full_bank(torch.randn(2, 12, 8, generator=g), 2, "exact")
    w_out = full_bank(torch.randn(*w_out_shape, generator=g), 2, "exact")
    with pytest.raises(ValueError, match=words):
        CompressedMoEExperts(w_in, w_out, torch.arange(2), "swiglu")


def test_compressed_slots_refuse_rows_and_offsets_of_the_wrong_shape():
    g = torch.Generator().manual_seed(0)
    w_out = full_bank(torch.randn(2, 8, 6, generator=g), 2, "exact")
    for field, bad, words in ((2, lambda t: t[:, :-1], r"S_rows \[24, 7\]"), (3, lambda t: t[:-1], r"row_idx \[23\]"),
                              (4, lambda t: t[:-1], r"row_offsets \[2\]")):
        w_in = full_bank(torch.randn(2, 12, 8, generator=g), 2, "exact")
        w_in[field] = bad(w_in[field])
        with pytest.raises(ValueError, match="w_in: .*" + words):
            CompressedMoEExperts(w_in, w_out, torch.arange(2), "swiglu")
