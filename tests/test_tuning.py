"""`--train_step_xla_options=auto` (`jaxpeft.tuning`): the choice, its cache, and runs that
measure, reuse and resume with it."""

import json

import pytest

from jaxpeft import tuning
from jaxpeft.config import RunConfig
from jaxpeft.errors import JaxpeftError
from jaxpeft.run import train_and_evaluate
from tests.helpers import run_config

A, B = {"x_option": "a"}, {"x_option": "b"}


def test_the_default_stays_unless_a_candidate_beats_it_by_the_margin():
    assert tuning.pick([{}, A, B], [1.0, 0.98, 0.99]) == {}
    assert tuning.pick([{}, A, B], [1.0, 0.98, 0.90]) == B
    assert tuning.pick([{}, A], [1.0, 0.5], margin=0.6) == {}


def test_options_read_as_the_flag_takes_them():
    assert tuning.describe({}) == "XLA's default"
    assert tuning.describe({"a": "X,Y", "b": ""}) == "a=X,Y;b=''"


def test_refused_candidates_are_dropped(monkeypatch):
    monkeypatch.setitem(tuning.CANDIDATES, "cpu", ({}, A, B))

    def check(options):
        if options == A:
            raise JaxpeftError("refused")

    assert tuning.usable_candidates("cpu", check) == [{}, B]
    assert tuning.usable_candidates("no_such_backend", check) == [{}]


def test_cache_keeps_choices_by_program_and_survives_damage(tmp_path):
    path = tmp_path / "xla" / "step_options.json"
    cache = tuning.OptionsCache(path)
    k1, k2 = tuning.program_key({"batch": [32, 128]}), tuning.program_key({"batch": [32, 64]})
    assert k1 != k2 and k1 == tuning.program_key({"batch": [32, 128]})
    assert cache.get(k1) is None
    cache.put(k1, B, [{"options": B, "step_ms": 1.0}])
    cache.put(k2, {}, [])
    assert cache.get(k1) == B and cache.get(k2) == {}
    assert json.loads(path.read_text())[k1]["measured"] == [{"options": B, "step_ms": 1.0}]
    path.write_text("{not json")
    assert cache.get(k1) is None  # a damaged cache costs a measurement, not the run
    assert tuning.OptionsCache(None).get(k1) is None


@pytest.mark.slow
def test_auto_measures_once_then_reuses_and_resumes_with_its_choice(
        tiny_model, glue_dir, tmp_path, monkeypatch, capsys):
    """A run measures every candidate on its own step and keeps the choice; the next run of
    the same program takes it from the cache without timing; a resumed run keeps the options
    its checkpoint was trained with even when the cache is gone. The choice is forced to
    the last candidate here so that a non-default one is followed through."""
    picked = []

    def pick_last(candidates, seconds, margin=tuning.MARGIN):
        assert len(seconds) == len(candidates) and all(s > 0 for s in seconds)
        picked.append(candidates[-1])
        return dict(candidates[-1])

    monkeypatch.setattr(tuning, "pick", pick_last)
    cache_dir = tmp_path / "cache"
    first = train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path / "a", max_steps=4,
                                          train_step_xla_options="auto",
                                          cache_dir=str(cache_dir)))
    assert len(picked) == 1 and first["train"]["xla_options"] == picked[0]
    assert first["train"]["xla_options_tune_s"] > 0
    stored = json.loads((cache_dir / "xla" / "step_options.json").read_text())
    (entry,) = stored.values()
    assert entry["options"] == picked[0] and len(entry["measured"]) >= 1
    assert "train step XLA options (auto)" in capsys.readouterr().out

    def no_timing(*args, **kwargs):
        raise AssertionError("timed again")

    monkeypatch.setattr(tuning, "time_candidates", no_timing)
    second = train_and_evaluate(run_config(tiny_model, glue_dir, tmp_path / "b", max_steps=4,
                                           train_step_xla_options="auto",
                                           cache_dir=str(cache_dir)))
    assert second["train"]["xla_options"] == picked[0]
    assert second["train"]["xla_options_tune_s"] == 0
    assert "chosen earlier for this program" in capsys.readouterr().out
    assert second["final"] == pytest.approx(first["final"], rel=1e-5)

    # Resume the first run for more steps with no cache at all: the checkpoint's options.
    cfg = run_config(tiny_model, glue_dir, tmp_path / "a", max_steps=6,
                     train_step_xla_options="auto", cache_dir="")
    resumed = train_and_evaluate(RunConfig(**{**cfg.__dict__, "resume": True}))
    assert resumed["train"]["steps"] == 6 and resumed["train"]["xla_options"] == picked[0]
