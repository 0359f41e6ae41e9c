"""The pyfunc is logged as "models from code": no pickled Python object in the model folder,
and the logged model answers exactly as ``SessionRecModel`` over the same checkpoint.

    .venv/bin/python -m pytest tests/evaluation/test_serving_model.py -q
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml

SESSIONS = {"session": [[105, 106, 107], [120], [999_999], []], "user_id": [3, -1, -1, 7]}


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A tiny GRU4Rec trained on a toy split, logged by ``log_training`` to a local SQLite store;
    the model folder downloaded back."""
    import mlflow
    from mlflow.tracking._model_registry import utils as reg_utils
    from mlflow.tracking._tracking_service import utils as trk_utils

    from evaluation import mlflow_logging as ml
    from tests.training.toy import toy_split
    from training.trainer import train

    tmp = tmp_path_factory.mktemp("serving-model")
    split = toy_split(tmp / "split", n_train=120, n_test=20, n_items=30)
    run_dir = tmp / "run"
    train("gru4rec", split, run_dir, sets=["n_sample=16", "batch_size=8", "layers=16", "num_threads=1",
                                           "n_epochs=1"], show_progress=False)
    mp = pytest.MonkeyPatch()
    mp.setenv("RNNREC_MLFLOW_SYSTEM_METRICS", "0")
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        ml.configure(tmp)
        run_id = mlflow.MlflowClient().create_run(ml.experiment_id("toy", tmp)).info.run_id
        info = ml.log_training(run_id, run_dir, name="model")
        folder = mlflow.artifacts.download_artifacts(artifact_uri=info["model_uri"], dst_path=str(tmp / "dl"))
        yield {"run_dir": run_dir, "model_uri": info["model_uri"], "folder": folder}
    finally:
        mp.undo()
        trk_utils._tracking_uri = None  # later tests must not keep this module's store
        reg_utils._registry_uri = None


def test_model_folder_holds_code_not_a_pickle(logged):
    from pathlib import Path

    from evaluation import mlflow_logging as ml
    from evaluation import serving

    folder = Path(logged["folder"])
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    assert not [f for f in files if "python_model.pkl" in f or f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert "python_model" not in flavor  # the key a cloudpickled PythonModel is loaded from
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    code_file = folder / Path(flavor["model_code_path"]).name
    assert code_file.name == "serving_model.py"
    assert code_file.read_text() == serving.MODEL_CODE_PATH.read_text()
    assert code_file.read_text().rstrip().splitlines()[-1] == "mlflow.models.set_model(SessionRecModel())"
    assert set(flavor["artifacts"]) == {serving.CHECKPOINT_ARTIFACT, serving.CONFIG_ARTIFACT}
    assert (folder / flavor["artifacts"][serving.CHECKPOINT_ARTIFACT]["path"]).is_file()
    assert flavor["code"] == "code"
    assert {p.name for p in (folder / "code").iterdir()} >= set(ml.PYFUNC_CODE_PATHS)


def test_logged_model_loads_without_pickle_and_predicts_like_the_class(logged, monkeypatch):
    """With MLflow's pickle deserialization switched off the model still loads (a cloudpickled
    model would be refused), and its answers equal ``SessionRecModel`` on the checkpoint."""
    import mlflow
    import pandas as pd

    from evaluation import serving
    from training import checkpoint as ck

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    model = mlflow.pyfunc.load_model(logged["folder"])
    direct = serving.SessionRecModel()
    direct.load_context(SimpleNamespace(artifacts={serving.CHECKPOINT_ARTIFACT: str(logged["run_dir"] / ck.FINAL)}))
    for k in (1, 5, 100):
        got = model.predict(pd.DataFrame(SESSIONS), params={"k": k})
        want = direct.predict(None, pd.DataFrame(SESSIONS), params={"k": k})
        assert list(got.columns) == ["items", "scores"]
        assert [list(x) for x in got["items"]] == [list(x) for x in want["items"]]
        assert [list(x) for x in got["scores"]] == [list(x) for x in want["scores"]]
    assert len(model.predict(pd.DataFrame(SESSIONS))["items"][0]) == serving.DEFAULT_K
    with pytest.raises(Exception, match="session"):
        model.predict(pd.DataFrame({"user_id": [1]}))


@pytest.mark.parametrize("uri, local", [
    ("sqlite:////data/mlflow/mlflow.db", True),
    ("postgresql+psycopg2://u:p@127.0.0.1:5432/mlflow", True),
    ("postgresql://u:p@db/mlflow", True),
    ("mysql+pymysql://u:p@db/mlflow", True),
    ("http://mlflow:5000", False),
    ("https://mlflow.example.org", False),
])
def test_experiments_on_a_database_keep_artifacts_under_the_data_dir(uri, local, tmp_path):
    """A database tracking URI (no server) gets <data_dir>/mlflow/artifacts/<name>, not ./mlruns of
    the task's working directory; an MLflow server keeps its own artifact store."""
    from evaluation.mlflow_logging import local_artifact_location

    loc = local_artifact_location(uri, tmp_path, "rnnrec-x")
    assert loc == ((tmp_path / "mlflow" / "artifacts" / "rnnrec-x").resolve().as_uri() if local else None)
