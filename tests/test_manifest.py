"""core/manifest.py: what a manifest says, read defensively."""

from __future__ import annotations

from llmctl.core.manifest import first_parent


def test_a_students_comparison_is_its_teacher_unless_it_was_made_from_another_checkpoint():
    teacher = {"role": "teacher", "ref": "finetune/t@v001", "path": "/t"}
    init = {"role": "init", "ref": "prune/p@v001", "path": "/p"}
    assert first_parent({"parents": [teacher]})["ref"] == "finetune/t@v001"
    assert first_parent({"parents": [teacher, init]})["ref"] == "prune/p@v001"
    assert first_parent({"parents": []}) is None
