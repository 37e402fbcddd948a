"""The end-of-run summary file."""

from __future__ import annotations

import json

from train.summary import summarize, write_summary

RECORDS = [{"step": 0, "loss": 6.0, "val_loss": 6.0}, {"step": 4, "loss": 5.0, "val_loss": 5.2}]


def test_rerun_of_a_finished_run_keeps_its_summary(tmp_path):
    """The same command run again after the end trains no step: summary.json used to be
    replaced by one with trained_steps 0, wall time 0 and tokens/s null."""
    path = tmp_path / "summary.json"
    finished = summarize(RECORDS, 4, wall_s=2.0, train_s=1.5, trained_steps=4, tokens_per_step=64)
    write_summary(path, finished)
    write_summary(path, summarize(RECORDS, 4, wall_s=0.0, train_s=0.0, trained_steps=0,
                                  tokens_per_step=64))
    assert json.loads(path.read_text()) == finished
    assert finished["tokens_per_s"] == 3 * 64 / 1.5
    # a resumed run that trains is the newest summary
    resumed = summarize(RECORDS, 4, wall_s=1.0, train_s=1.0, trained_steps=2, tokens_per_step=64)
    write_summary(path, resumed)
    assert json.loads(path.read_text()) == resumed
