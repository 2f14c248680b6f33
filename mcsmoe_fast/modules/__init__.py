"""The drop-in modules that run MoE experts fast: dense expert slots (slots.py), compressed slots
(compressed.py), the Switch block around them (switch.py), and the implementation transformers' experts
contract dispatches to (experts_interface.py, reading the contract's layout flags through experts_spec.py)."""
from .compressed import BANK_FIELDS, CompressedMoEExperts
from .slots import MoEExperts
from .switch import SwitchMoE, slot_names

__all__ = ["BANK_FIELDS", "CompressedMoEExperts", "MoEExperts", "SwitchMoE", "slot_names"]
