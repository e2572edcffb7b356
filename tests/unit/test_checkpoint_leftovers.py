"""What a crashed save leaves in checkpoints/, as a resumed run finds it (train/recovery.py
clear_leftovers): unsealed ``.tmp-`` directories and stale ``.trash-`` copies removed with a note,
a ``.trash-`` copy that is the only one left kept, a sealed checkpoint newer than ``latest`` named
and kept, the published checkpoints untouched."""
from forge_dist.train.recovery import clear_leftovers


def test_leftovers_are_removed_or_named(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("iter_0000002", "iter_0000004", "iter_0000006", ".tmp-iter_0000008", ".trash-iter_0000004",
                 ".trash-iter_0000010"):
        (root / name).mkdir(parents=True)
        (root / name / "manifest.json").write_text("{}")
    (root / "latest").write_text("iter_0000004\n")
    notes = clear_leftovers(str(root))
    assert sorted(p.name for p in root.iterdir()) == [".trash-iter_0000010", "iter_0000002", "iter_0000004",
                                                      "iter_0000006", "latest"]
    text = " | ".join(notes)
    assert ".tmp-iter_0000008: the unsealed files of an interrupted save, never a checkpoint" in text
    assert ".trash-iter_0000004: the older copy of iter_0000004 an interrupted re-save was replacing" in text
    assert ".trash-iter_0000010 holds the only copy of iter_0000010" in text
    assert "iter_0000006 is sealed but was never published (the run stopped before latest moved to it from " \
           "iter_0000004)" in text
    assert "iter_0000002 is" not in text and len(notes) == 4
    assert clear_leftovers(str(tmp_path / "none")) == []
