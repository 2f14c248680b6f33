"""Boolean options of the Python API are checked to be bools: a string such as "no" or "false" would read as
True, and the step would silently do what the caller tried to switch off."""
from __future__ import annotations


def check_flags(step: str, **flags) -> None:
    """ValueError naming the first option of `step` whose value is not True or False."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{step}: {name} must be True or False, got {value!r}")
