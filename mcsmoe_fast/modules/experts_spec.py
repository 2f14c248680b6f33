"""What a transformers fused experts module computes, read from the module itself.

transformers 5 gives most MoE families one experts contract: classes decorated with
`use_experts_implementation` (transformers/integrations/moe.py) hold `gate_up_proj` (or `up_proj` when
ungated) and `down_proj`, optional `*_bias` tensors, and layout flags set on every instance:

    is_transposed     weights stored [E, d, F] / [E, ff, d] instead of [E, F, d] / [E, d, ff]
    is_concatenated   gate rows then up rows (True) or interleaved gate0, up0, gate1, ... (GPT-OSS)
    has_bias, has_gate, has_post_expert_norm

and an `_apply_gate(gate_up)` (default: act_fn(gate) * up). `ExpertsSpec.of(module)` turns that into the
project's canonical layout (activations.py): w_in [E, F, d] gate rows then up rows, w_out [E, d, ff],
b_in [E, F], b_out [E, d], and an activation the fused op knows. The activation is identified by
evaluating the module's own gate (or act_fn) on probe values and comparing it with ours, so a family
whose activation we do not know is refused with its name, never run with another.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .. import activations

CONTRACT_FLAGS = ("has_gate", "is_transposed", "is_concatenated", "has_bias")


def follows_contract(module: nn.Module) -> bool:
    """A transformers experts module of the use_experts_implementation contract (found by its flags and
    parameters, not by class name)."""
    if not all(hasattr(module, f) for f in CONTRACT_FLAGS):
        return False
    w_in = getattr(module, "gate_up_proj" if module.has_gate else "up_proj", None)
    return isinstance(w_in, torch.Tensor) and isinstance(getattr(module, "down_proj", None), torch.Tensor)


def _probe(width: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    # values well past GPT-OSS's clamp limit (7) on both sides, and small ones around 0
    return torch.cat([torch.randn(32, width, generator=g, dtype=torch.float64) * 6,
                      torch.randn(32, width, generator=g, dtype=torch.float64) * 0.5])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def _candidates(module: nn.Module, gated: bool) -> list[tuple[str, dict]]:
    """Activations to try, the config's own first."""
    names = list(activations.GATED) if gated else list(activations.UNGATED)
    hf_name = getattr(getattr(module, "config", None), "hidden_act", None)
    first = activations.HF_NAMES.get(hf_name) if isinstance(hf_name, str) else None
    if first is not None and (not gated or first in activations.GATED.values()):  # relu2 has no gated form
        mine = activations.from_config(hf_name, gated, "experts")
        names.remove(mine)
        names.insert(0, mine)
    out = [(n, {}) for n in names if n != "clamped_swiglu"]
    alpha, limit = _clamp_args(module)
    if gated and alpha is not None and limit is not None:
        out.insert(0, ("clamped_swiglu", {"alpha": alpha, "limit": limit}))
    return out


def _number(module: nn.Module, names: tuple[str, ...]) -> float | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _clamp_args(module: nn.Module) -> tuple[float | None, float | None]:
    """GPT-OSS's clamped SwiGLU constants under the names families give them (alpha/limit in GPT-OSS,
    swiglu_alpha/swiglu_limit in MiniMax-M3)."""
    return _number(module, ("alpha", "swiglu_alpha")), _number(module, ("limit", "swiglu_limit"))


def _unsupported(module: nn.Module, gated: bool) -> list[tuple[str, object]]:
    """Expert functions real families use that the fused op lacks: (description, reference function) to
    name the one a module computes in its refusal."""
    import torch.nn.functional as F

    if not gated:
        return []
    _, limit = _clamp_args(module)
    out = [("gated squared ReLU relu(gate)^2 * up", lambda g, u: F.relu(g).square() * u)]
    if limit is not None:
        out.append((f"SwiGLU with clamped gate and up and no alpha (silu(min(gate, {limit:g})) * "
                    f"clamp(up, -{limit:g}, {limit:g}))",
                    lambda g, u: F.silu(g.clamp(max=limit)) * u.clamp(-limit, limit)))
    return out


@dataclass(frozen=True)
class ExpertsSpec:
    activation: str  # one of activations.ACTIVATIONS
    activation_args: dict = field(default_factory=dict)  # alpha, limit for clamped_swiglu
    gated: bool = True
    transposed: bool = False
    concatenated: bool = True
    has_bias: bool = False

    @staticmethod
    def of(module: nn.Module) -> "ExpertsSpec":
        """The spec of a contract experts module (cached on the module); ValueError naming the class when
        the fused op cannot compute what it computes."""
        cached = module.__dict__.get("_mcsmoe_spec")
        if cached is not None:
            return cached
        cls = type(module).__name__
        # the contract's experts hold their weight tensors only: a child module with parameters (e.g. Ergo's
        # per-expert RMSNorm, which no contract flag announces) is computed by a forward the fused op is not
        extra = [(n, type(m).__name__) for n, m in module.named_children() if next(m.parameters(), None) is not None]
        if getattr(module, "has_post_expert_norm", False) or extra:
            kind = "a post-expert norm" if getattr(module, "has_post_expert_norm", False) or \
                any("norm" in n.lower() for n, _ in extra) else "submodules with their own parameters"
            held = f" ({', '.join(f'{n}: {t}' for n, t in extra)})" if extra else ""
            raise ValueError(f"{cls}: experts with {kind}{held} are not supported by mcsmoe_fast's fused ops")
        gated = bool(module.has_gate)
        spec = ExpertsSpec("", gated=gated, transposed=bool(module.is_transposed),
                           concatenated=bool(module.is_concatenated), has_bias=bool(module.has_bias))
        activation, args = spec._identify(module)
        spec = ExpertsSpec(activation, args, spec.gated, spec.transposed, spec.concatenated, spec.has_bias)
        module.__dict__["_mcsmoe_spec"] = spec  # not an nn.Module attribute: no state_dict entry
        return spec

    def _identify(self, module: nn.Module) -> tuple[str, dict]:
        ff = 8
        if self.gated:
            probe = _probe(2 * ff)  # in the module's own layout
            theirs = module._apply_gate(probe)
            canonical = self.in_rows_to_canonical(probe, dim=-1)
        else:
            probe = _probe(ff)
            theirs = module.act_fn(probe)
            canonical = probe
        for name, args in _candidates(module, self.gated):
            if _same(activations.apply(canonical, name, **args), theirs):
                return name, args
        raise ValueError(f"{type(module).__name__}: expert function {self._describe(module, canonical, theirs)} is not "
                         f"supported by mcsmoe_fast's fused ops (it matches none of {', '.join(activations.ACTIVATIONS)})")

    def _describe(self, module: nn.Module, canonical: torch.Tensor, theirs: torch.Tensor) -> str:
        """What the module computes, named as precisely as we can: a known function, else its own gate or act_fn
        (with the config's activation name, which a custom gate may not follow)."""
        for description, fn in _unsupported(module, self.gated):
            ours = fn(*canonical.chunk(2, dim=-1)) if self.gated else fn(canonical)
            if _same(ours, theirs):
                return description
        cls = type(module)
        own_gate = self.gated and "_apply_gate" in vars(cls)
        act = type(getattr(module, "act_fn", None)).__name__
        what = (f"{cls.__name__}._apply_gate (its own gate)" if own_gate
                else f"act_fn(gate) * up with act_fn {act}" if self.gated else f"act_fn {act}")
        hf_name = getattr(getattr(module, "config", None), "hidden_act", None)
        return what + (f" (config hidden_act {hf_name!r})" if isinstance(hf_name, str) else "")

    # --- layout: the module's tensors <-> the canonical layout -----------------------------------
    def in_rows_to_canonical(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Gate/up entries along `dim` reordered to gate block then up block (a copy when interleaved)."""
        if not self.gated or self.concatenated:
            return t
        idx = torch.arange(t.shape[dim], device=t.device)
        return torch.cat([t.index_select(dim, idx[0::2]), t.index_select(dim, idx[1::2])], dim=dim)

    def weights(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_in [E, F, d], w_out [E, d, ff]): views of the parameters, a copy of w_in when interleaved."""
        w_in = module.gate_up_proj if self.gated else module.up_proj
        w_out = module.down_proj
        if self.transposed:
            w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
        return self.in_rows_to_canonical(w_in, dim=1), w_out

    @property
    def copies_weights(self) -> bool:
        """Whether the fused op needs a copy of the weights (interleaved gate/up rows); otherwise it reads
        views of the parameters (a transposed layout is only strides to its GEMMs)."""
        return self.gated and not self.concatenated

    def fused_tensors(self, module: nn.Module):
        """(w_in [S, F, d], w_out [S, d, ff], b_in [S, F] | None, b_out [S, d] | None) for the fused op, read
        from the parameters on every call (never a kept copy, so never stale): strided views where the layout
        allows, and for interleaved gate/up a gate-first copy made in one pass along the stored rows.
        Differentiable: gradients reach the module's own parameters."""
        w_in = module.gate_up_proj if self.gated else module.up_proj
        w_out = module.down_proj
        b_in = b_out = None
        if self.has_bias:
            b_in, b_out = (module.gate_up_proj_bias if self.gated else module.up_proj_bias), module.down_proj_bias
        if self.gated and not self.concatenated:
            w_in = _gate_first(w_in, 2 if self.transposed else 1)
            b_in = None if b_in is None else _gate_first(b_in, 1)
        if self.transposed:
            w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
        return w_in, w_out, b_in, b_out

    def biases(self, module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(b_in [E, F], b_out [E, d]) or (None, None)."""
        if not self.has_bias:
            return None, None
        b_in = module.gate_up_proj_bias if self.gated else module.up_proj_bias
        return self.in_rows_to_canonical(b_in, dim=1), module.down_proj_bias

    @torch.no_grad()
    def write(self, module: nn.Module, w_in: torch.Tensor, w_out: torch.Tensor,
              b_in: torch.Tensor | None = None, b_out: torch.Tensor | None = None) -> None:
        """Copy canonical tensors into the module's parameters, in its own layout."""
        dst_in = module.gate_up_proj if self.gated else module.up_proj
        dst_out = module.down_proj
        if self.transposed:
            dst_in, dst_out = dst_in.transpose(1, 2), dst_out.transpose(1, 2)
        self._write_rows(dst_in, w_in, dim=1)
        dst_out.copy_(w_out)
        if self.has_bias:
            if b_in is not None:
                self._write_rows(module.gate_up_proj_bias if self.gated else module.up_proj_bias, b_in, dim=1)
            if b_out is not None:
                module.down_proj_bias.copy_(b_out)

    def _write_rows(self, dst: torch.Tensor, src: torch.Tensor, dim: int) -> None:
        if not self.gated or self.concatenated:
            dst.copy_(src)
            return
        ff = src.shape[dim] // 2
        idx = torch.arange(ff, device=dst.device)
        dst.index_copy_(dim, 2 * idx, src.narrow(dim, 0, ff))
        dst.index_copy_(dim, 2 * idx + 1, src.narrow(dim, ff, ff))


def _gate_first(t: torch.Tensor, dim: int) -> torch.Tensor:
    """`t` with its interleaved gate/up entries along `dim` (gate0, up0, gate1, ...) reordered to the gate
    block then the up block: one copy, reading each stored row once."""
    return t.unflatten(dim, (-1, 2)).transpose(dim, dim + 1).flatten(dim, dim + 1)
