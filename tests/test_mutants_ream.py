"""Behaviours of ream.py that test_ream.py left unchecked, found by mutation testing (benchmarks/mutation.sh ream;
benchmarks/MUTATION.md): check_ream refuses a group-limited router by default, naming n_group, and ream_experts
shows its progress bar exactly when asked."""
from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import pytest

from mcsmoe_fast import collect_routing_stats
from mcsmoe_fast.ream import check_ream, ream_experts
from mcsmoe_fast.tiny import tiny_mixtral
from merge_helpers import calibration


def test_check_ream_refuses_group_limited_routing_by_default():
    grouped = SimpleNamespace(config=SimpleNamespace(n_group=4))
    with pytest.raises(ValueError, match="^" + re.escape(
            "REAM merges experts across routing groups, which group-limited routing (n_group=4) cannot express; "
            "prune instead (prune_experts)") + "$"):
        check_ream(grouped, 8)


def test_ream_shows_its_progress_bar_when_asked(capsys):
    model = tiny_mixtral(seed=9).eval()
    stats = collect_routing_stats(model, calibration(model, seed=2), bases=("expert-output",), saliency="reap",
                                  progress=False)
    capsys.readouterr()
    for progress, shown in ((None, True), (True, True), (False, False)):
        kwargs = {} if progress is None else {"progress": progress}
        ream_experts(copy.deepcopy(model), stats, num_experts=4, **kwargs)
        assert ("merging experts" in capsys.readouterr().err) == shown, progress
