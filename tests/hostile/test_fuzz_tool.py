"""tools/fuzz_hostile.py: a quick smoke run by default; the documented long run is marked slow."""

from __future__ import annotations

import os
import random

import fuzz_hostile as fh
import pytest

BAD = ("traceback", "hang", "exit0_on_invalid")


def test_one_case_per_target_finds_nothing(tmp_path):
    report = fh.fuzz(seed=0, minutes=None, cases=1, targets=fh.TARGETS, out=tmp_path / "r.json", work=tmp_path)
    assert report["cases"] >= len(fh.TARGETS)
    assert set(report["by_target"]) == set(fh.TARGETS)
    assert not any(report["total"].get(k) for k in BAD), report["findings"]
    assert (tmp_path / "r.json").exists()


def test_truncated_archive_is_labelled_and_refused(tmp_path):
    seeds = fh.make_seeds(tmp_path)
    rng = random.Random(3)
    while True:  # draw until the mutator picks a truncation
        d = tmp_path / f"c{rng.random()}"
        d.mkdir()
        case = fh.mutate_archive(rng, seeds, d / "input")
        if case.kind == "truncate":
            break
    assert case.must_reject
    outcome, detail = fh.run_case(case, fh.CASE_SECONDS)
    assert outcome == "rejected", detail


@pytest.mark.slow
def test_long_run(tmp_path):
    minutes = float(os.environ.get("VKPACK_FUZZ_MINUTES", "30"))
    report = fh.fuzz(seed=int(os.environ.get("VKPACK_FUZZ_SEED", "1")), minutes=minutes, cases=None,
                     targets=fh.TARGETS, out=tmp_path / "fuzz.json", work=tmp_path)
    assert not any(report["total"].get(k) for k in BAD), report["findings"]
