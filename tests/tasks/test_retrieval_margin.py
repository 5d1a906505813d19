"""Retrieval (ITC + ITM) finetuned from scratch on the demo's synthetic world
(``tests/tasks/demo_finetune.py``) beats a random ranking of the held-out gallery by an asserted margin."""

from __future__ import annotations

import pytest

from tests.tasks.demo_finetune import finetune_and_evaluate


@pytest.mark.long
def test_retrieval_beats_random_ranking(tmp_path):
    result, baseline = finetune_and_evaluate("retrieval", tmp_path, ["schedule.max_steps=400"], k=16)
    r_mean = result["r_mean"]
    assert r_mean > 1.5 * baseline, (r_mean, baseline)
