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
