"""Dataset configs (dags/dataset_config.py): checked keys with the file in every message, relative
paths, the arrival marker of an interval, and the precedence defaults < config < trigger.

    .venv/bin/python -m pytest tests/dags/test_dataset_config.py -q
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from dags import dataset_config as D
from dags.pipeline_steps import DEFAULT_PARAMS

ROOT = Path(__file__).resolve().parents[2]
UTC = dt.timezone.utc


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "clicks.yaml"
    p.write_text(text)
    return p


def test_a_config_sets_params_resolves_paths_and_formats_the_arrival_marker(tmp_path, monkeypatch):
    p = _write(tmp_path, "name: clicks\ninput: [raw/*.csv, /abs/x.csv]\nformat: gru4rec\n"
                         "arrival: raw/{end:%Y-%m-%d}.done\nfamilies: [pop]\nepochs: null\n"
                         "retention: {keep_intervals: 3}\n")
    c = D.load(p)
    assert c.params == {"dataset": "clicks", "input": [str(tmp_path / "raw" / "*.csv"), "/abs/x.csv"],
                        "format": "gru4rec", "families": ["pop"], "epochs": None}
    assert c.retention == {"keep_intervals": 3}
    start, end = dt.datetime(2014, 4, 4, tzinfo=UTC), dt.datetime(2014, 4, 5, tzinfo=UTC)
    assert c.arrival_path(start, end) == str(tmp_path / "raw" / "2014-04-05.done")
    # by name from the configured folder
    monkeypatch.setenv("RNNREC_DATASET_CONF_DIR", str(tmp_path))
    assert D.load("clicks").params == c.params
    # precedence: defaults < config < what a trigger passed explicitly
    run = D.merge(DEFAULT_PARAMS, c, {"families": ["gru4rec"]})
    assert run["families"] == ["gru4rec"] and run["format"] == "gru4rec" and run["seed"] == DEFAULT_PARAMS["seed"]


@pytest.mark.parametrize("text, needle", [
    ("name: x\nlearning_rate: 0.1\n", "unknown key 'learning_rate'"),
    ("name: x\nepochs: three\n", "key 'epochs' = 'three': expected integer or null"),
    ("name: x\nfamilies: pop\n", "key 'families' = 'pop': expected array"),
    ("name: x\nmin_item_support: true\n", "expected integer"),
    ("input: [a.csv]\n", "key 'name'"),
    ("dataset: x\n", "use 'name'"),
    ("name: x\ndata_dir: /tmp\n", "RNNREC_DATA_DIR"),
    ("name: x\nretention: {keep_intervals: 0}\n", "retention.keep_intervals = 0"),
    ("name: x\nretention: {keep: 3}\n", "retention.keep: unknown"),
    ("name: x\narrival: 'in/{day}.done'\n", "arrival"),
    ("- just\n- a list\n", "expected a mapping"),
    ("name: [unclosed\n", "not valid YAML"),
])
def test_bad_configs_name_the_file_and_the_key(tmp_path, text, needle):
    p = _write(tmp_path, text)
    with pytest.raises(D.DatasetConfigError) as e:
        D.load(p)
    assert str(p) in str(e.value) and needle in str(e.value)


def test_unknown_name_lists_the_configs_there(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNREC_DATASET_CONF_DIR", str(tmp_path))
    _write(tmp_path, "name: clicks\n")
    with pytest.raises(D.DatasetConfigError, match=r"no dataset config 'nope' in .* \(have: clicks\)"):
        D.load("nope")


def test_the_shipped_configs_load_and_resolve(tmp_path):
    """Every config in conf/datasets passes the loader and the DAG's own Param validation."""
    from dags.pipeline_steps import resolve

    shipped = sorted((ROOT / "conf" / "datasets").glob("*.yaml"))
    assert shipped
    for p in shipped:
        c = D.load(p)
        cfg = resolve({**D.merge(DEFAULT_PARAMS, c, {}), "data_dir": str(tmp_path)}, dag_id="d", dag_run_id="r",
                      interval_start="2014-04-07T00:00:00+00:00", interval_end="2014-04-08T00:00:00Z")
        assert cfg["params"]["dataset"] == c.params["dataset"]


def _resolve(params, tmp_path, **kw):
    from dags.pipeline_steps import resolve

    return resolve({**params, "data_dir": str(tmp_path / "out")}, dag_id="d", dag_run_id="r",
                   interval_start="2014-04-06T00:00:00+00:00", interval_end="2014-04-07T00:00:00+00:00", **kw)


def test_resolve_selects_the_config_by_param_or_variable_and_the_trigger_wins(tmp_path, monkeypatch):
    """A scheduled run (no trigger conf) takes its config from the Variable; the Param names
    another config and wins over the Variable; values the trigger passed win over the config,
    defaults the trigger did not pass do not."""
    monkeypatch.setenv("RNNREC_DATASET_CONF_DIR", str(tmp_path))
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.tsv").write_text("SessionId\tItemId\tTime\n")
    (tmp_path / "clicks.yaml").write_text(
        "name: clicks\ninput: [raw/*.tsv]\nformat: gru4rec\nfamilies: [pop]\nfractions: []\n"
        "arrival: raw/_OK_{end:%Y%m%d}\nretention: {keep_intervals: 3}\n")
    (tmp_path / "views.yaml").write_text("name: views\ninput: [raw/a.tsv]\nformat: gru4rec\nmin_item_support: 2\n")
    params = dict(DEFAULT_PARAMS)  # what Airflow's context["params"] holds for a scheduled run
    cfg = _resolve(params, tmp_path, explicit={}, variable_config="clicks")
    assert cfg["params"]["dataset"] == "clicks" and cfg["families"] == ["pop"] and cfg["fractions"] == []
    assert cfg["inputs"] == [str(raw / "*.tsv")] and cfg["params"]["format"] == "gru4rec"
    assert cfg["arrival"] == str(raw / "_OK_20140407") and cfg["retention"] == {"keep_intervals": 3}
    assert cfg["root"].endswith("/pipeline/clicks/20140406T000000Z_20140407T000000Z")
    assert cfg["dataset_config"] == str(tmp_path / "clicks.yaml")
    # the Param wins over the Variable
    cfg = _resolve({**params, "dataset_config": "views"}, tmp_path, explicit={"dataset_config": "views"},
                   variable_config="clicks")
    assert cfg["params"]["dataset"] == "views" and cfg["params"]["min_item_support"] == 2
    assert cfg["arrival"] is None and cfg["retention"] is None
    # a trigger's explicit value wins over the config; a default it did not pass does not
    cfg = _resolve({**params, "families": ["gru4rec", "pop"], "seed": 3}, tmp_path,
                   explicit={"families": ["gru4rec", "pop"], "seed": 3}, variable_config="clicks")
    assert cfg["families"] == ["gru4rec", "pop"] and cfg["params"]["seed"] == 3 and cfg["fractions"] == []
    # without explicit (direct calls): values that differ from the defaults count as passed
    cfg = _resolve({"dataset_config": "clicks", "fractions": [2]}, tmp_path)
    assert cfg["fractions"] == [2] and cfg["families"] == ["pop"]
    # no config anywhere: the Params as they are
    cfg = _resolve(params, tmp_path, explicit={}, variable_config=None)
    assert cfg["params"]["dataset"] == "synthetic" and cfg["arrival"] is None and cfg["dataset_config"] is None


def test_a_bad_selected_config_fails_resolve_naming_where_it_came_from(tmp_path, monkeypatch):
    from dags.pipeline_steps import PipelineParamError

    monkeypatch.setenv("RNNREC_DATASET_CONF_DIR", str(tmp_path))
    (tmp_path / "bad.yaml").write_text("name: bad\nepochs: many\n")
    with pytest.raises(PipelineParamError, match=r"Airflow Variable rnnrec_dataset_config = 'nope': no dataset "
                                                 r"config 'nope'.*have: bad"):
        _resolve(dict(DEFAULT_PARAMS), tmp_path, explicit={}, variable_config="nope")
    with pytest.raises(PipelineParamError, match=r"param 'dataset_config' = 'bad': .*bad.yaml: key 'epochs'"):
        _resolve({"dataset_config": "bad"}, tmp_path, variable_config="nope")
    (tmp_path / "loop.yaml").write_text("name: loop\ndataset_config: bad\n")
    with pytest.raises(D.DatasetConfigError, match="cannot name another"):
        D.load(tmp_path / "loop.yaml")


def test_housekeeping_sweeps_old_leftovers_and_prunes_beyond_retention_but_never_the_running_interval(tmp_path):
    import os
    import time

    from dags.pipeline_steps import housekeeping

    ds = tmp_path / "pipeline" / "clicks"
    names = [f"201404{d:02d}T000000Z_201404{d + 1:02d}T000000Z" for d in range(1, 6)]
    for n in names:
        (ds / n / "processed").mkdir(parents=True)
        (ds / n / "processed" / "x.parquet").write_bytes(b"x" * 10)
    old = time.time() - 3 * 3600
    dead = ds / names[4] / "models" / ".gru4rec.tmp-0badc0de"
    dead.mkdir(parents=True)
    os.utime(dead, (old, old))
    fresh = ds / names[4] / "models" / ".pop.tmp-00c0ffee"  # a run may still be writing it
    fresh.mkdir()
    # the running interval is the OLDEST (a backfill): kept although beyond the 2 newest
    cfg = {"root": str(ds / names[0]), "retention": {"keep_intervals": 2, "sweep_after_hours": 1}}
    out = housekeeping(cfg)
    assert sorted(p.name for p in ds.iterdir()) == sorted([names[0], names[3], names[4]])
    assert not dead.exists() and fresh.exists()
    assert sorted(Path(p).name for p in out["pruned"]) == names[1:3] and out["swept"] == [str(dead)]
    assert out["freed_bytes"] == 20
    # no retention configured: nothing pruned, leftovers older than 24 h swept
    assert housekeeping({"root": str(ds / names[4]), "retention": None})["pruned"] == []
