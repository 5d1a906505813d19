"""Captioning finetuned from scratch on the demo's synthetic world (``tests/tasks/demo_finetune.py``) beats
the most frequent training caption (CIDEr-D on held-out scenes) by an asserted margin."""

from __future__ import annotations

import pytest

from tests.tasks.demo_finetune import finetune_and_evaluate


@pytest.mark.long
def test_caption_beats_most_frequent_caption(tmp_path):
    result, baseline = finetune_and_evaluate(
        "caption", tmp_path, ["schedule.max_steps=300"], beam_size=3, min_length=2
    )
    cider = result["CIDEr"]
    assert cider > baseline + 0.2, (cider, baseline)
