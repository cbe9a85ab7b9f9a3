"""The train key: what it covers across process counts and source weights, and which run a launch continues."""

from __future__ import annotations

import json
import os

import pyarrow as pa

from sdxlpipe.pipeline.keys import item_key
from sdxlpipe.stages.ingest import Source
from sdxlpipe.stages.train import Params, continued_run, key_doc

TABLE = pa.table({
    "caption": ["a", "b"], "caption_variants": [["a"], ["b"]], "latent_key": ["k1", "k2"],
    "latent_flip_key": [None, None], "text_key": ["t1", "t2"], "text_variant_keys": [["t1"], ["t2"]],
    "empty_text_key": ["e", "e"], "repeats": [1, 2], "is_reg": [False, True], "bucket_w": [64, 64],
    "bucket_h": [64, 64]})
FP = {"unet": "u" * 8, "scheduler": "s" * 8}


def test_one_process_keys_without_weights_are_what_they_were():
    """Pinned from before weights and world-size-free keys: users' finished runs stay found."""
    assert item_key(key_doc(TABLE, Params(), FP)) == "8ea298c138008a7a6711e53dfe5f2e1d"
    assert item_key(key_doc(TABLE, Params(gradient_accumulation_steps=3), FP)) == "29b2bc8a9ff8bd0659d3a552e93eea19"
    with_column = TABLE.append_column("source_index", pa.array([0, 1], pa.int32()))
    unweighted = (Source(path="a"), Source(path="b", repeats=3))
    assert item_key(key_doc(with_column, Params(), FP, 1, unweighted)) == "8ea298c138008a7a6711e53dfe5f2e1d"


def test_the_key_holds_micro_batches_per_step_not_the_process_count():
    two_by_one = key_doc(TABLE, Params(gradient_accumulation_steps=1), FP, processes=2)
    assert two_by_one == key_doc(TABLE, Params(gradient_accumulation_steps=2), FP, processes=1)
    assert two_by_one != key_doc(TABLE, Params(gradient_accumulation_steps=2), FP, processes=2)


def test_weights_max_samples_and_each_rows_source_are_in_the_key():
    table = TABLE.append_column("source_index", pa.array([0, 1], pa.int32()))
    keys = {item_key(key_doc(t, Params(), FP, 1, s)) for t, s in (
        (table, (Source(path="a", weight=1), Source(path="b", weight=3))),
        (table, (Source(path="a", weight=1), Source(path="b", weight=2))),
        (table, (Source(path="a", max_samples=1), Source(path="b"))),
        (table.set_column(table.column_names.index("source_index"), "source_index", pa.array([1, 0], pa.int32())),
         (Source(path="a", weight=1), Source(path="b", weight=3))),
    )}
    assert len(keys) == 4


def _run(root, doc: dict, steps: int, mtime: float):
    run_dir = root / item_key(doc)
    ckpt = run_dir / "checkpoints" / f"step-{steps:08d}"
    ckpt.mkdir(parents=True)
    (run_dir / "key.json").write_text(json.dumps(doc))
    (ckpt / "state.json").write_text(json.dumps({"step": steps}))
    os.utime(ckpt / "state.json", (mtime, mtime))
    return run_dir


def test_a_launch_continues_the_newest_run_its_process_count_can_split(tmp_path):
    """Same settings, other micro-batches per step: the newest run with checkpoints whose per-step count
    this process count divides, also one keyed the old way (with a `processes` field)."""
    mine = key_doc(TABLE, Params(), FP, processes=1)  # asked: 1 process x 1
    assert continued_run(tmp_path, mine, 1) is None
    old_style = json.loads(json.dumps({**key_doc(TABLE, Params(), FP), "processes": 2}))  # 2 x 1, keyed as until now
    two = _run(tmp_path, old_style, 4, 1000.0)
    assert continued_run(tmp_path, mine, 1) == (two, old_style, 2)
    assert continued_run(tmp_path, key_doc(TABLE, Params(), FP, processes=2), 2)[2] == 1
    assert continued_run(tmp_path, key_doc(TABLE, Params(), FP, processes=4), 4) is None, "4 cannot split 2"
    four = json.loads(json.dumps(key_doc(TABLE, Params(gradient_accumulation_steps=4), FP)))
    newer = _run(tmp_path, four, 2, 2000.0)
    assert continued_run(tmp_path, mine, 1)[:2] == (newer, four)
    other = key_doc(TABLE, Params(seed=1), FP)
    assert continued_run(tmp_path, other, 1) is None, "other settings are another run"
