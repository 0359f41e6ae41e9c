"""MLflow ``pyfunc`` wrapper: "top-K next items for this session (and user)" from a checkpoint.

The logged model holds no pickled model object. It is logged as "models from code"
(``evaluation.mlflow_logging``): ``python_model`` is the code file ``serving_model.py``
(``MODEL_CODE_PATH``), which ends with ``mlflow.models.set_model(SessionRecModel())``;
the training checkpoint (``state_dict`` + resolved config + item index, see
``training/checkpoint.py``) is the ``checkpoint`` artifact, the resolved config also the
``config`` artifact (for reading; the model uses the checkpoint's copy), and
``training/``, ``evaluation/``, ``spark_jobs/`` travel as ``code_paths``. ``load_context``
rebuilds the family's scorer (``training.registry.load_scorer``), the same object
evaluation uses, so serving ranks exactly as the offline metrics were computed.

From Python::

    import mlflow, pandas as pd
    m = mlflow.pyfunc.load_model("models:/synthetic-gru4rec@champion")
    m.predict(pd.DataFrame({"session": [[214500017, 214500003]], "user_id": [7]}), params={"k": 10})

As a REST server (same venv; ``make serve`` does this for the demo store). ``models serve``
starts ``uvicorn`` by name, so the venv's ``bin`` must be on ``PATH``::

    PATH=$PWD/.venv/bin:$PATH mlflow models serve -m models:/synthetic-gru4rec@champion \\
        --env-manager local -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"session": [214508194, 214524138]}], "params": {"k": 5}}'
    # {"predictions": [{"items": [...5 ids, best first...], "scores": [...]}]}

Input: a DataFrame with ``session`` (list of item ids, oldest first) and an
optional ``user_id``. Items the model never saw are skipped (as in evaluation);
an empty or all-unknown session gets the most popular training items. Output:
one row per input row with ``items`` (top-K item ids, best first) and ``scores``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc

#: name of the checkpoint artifact inside the logged model
CHECKPOINT_ARTIFACT = "checkpoint"
#: name of the resolved-config artifact (config.json; informative, ``load_context`` does not read it)
CONFIG_ARTIFACT = "config"
#: the models-from-code file passed to ``log_model(python_model=...)``
MODEL_CODE_PATH = Path(__file__).resolve().with_name("serving_model.py")
DEFAULT_K = 20


class SessionRecModel(mlflow.pyfunc.PythonModel):
    """Wraps any model family's checkpoint behind one predict(): session -> top-K items."""

    def load_context(self, context) -> None:
        import numpy as np
        import torch

        from training import checkpoint as ck
        from training.registry import load_scorer

        ckpt = ck.load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])
        self.device = torch.device("cpu")  # serving: one session at a time, CPU is the sane default
        self.scorer = load_scorer(ckpt, self.device)
        self.index = ck.item_index_from_ckpt(ckpt["item_index"])
        self.family = ckpt["model"]
        support = self.index.support.astype(np.float64)
        self.popular = np.argsort(-support, kind="stable")

    def _scores(self, session_items, user_id):
        import numpy as np
        import torch

        ids = np.asarray([int(x) for x in (session_items if session_items is not None else [])], dtype=np.int64)
        idx = self.index.lookup(ids) if len(ids) else np.empty(0, np.int64)
        idx = idx[idx >= 0]
        if len(idx) == 0:
            return None
        state = self.scorer.begin(1)
        users = torch.tensor([-1 if user_id is None else int(user_id)], dtype=torch.int64)
        state = self.scorer.start_session(state, torch.tensor([True]), users)
        scores = None
        for it in idx:
            scores, state = self.scorer.step(state, torch.tensor([int(it)], dtype=torch.int64, device=self.device))
        return scores[0].float().cpu().numpy()

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import numpy as np
        import pandas as pd

        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        if "session" not in model_input.columns:
            raise ValueError(f"input needs a 'session' column (list of item ids); got {list(model_input.columns)}")
        k = int((params or {}).get("k", DEFAULT_K))
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(k, self.index.n_items)
        has_user = "user_id" in model_input.columns
        out_items, out_scores = [], []
        for i, row in enumerate(model_input.itertuples(index=False)):
            user = getattr(row, "user_id") if has_user else None
            if user is not None and not isinstance(user, (int, np.integer)) and pd.isna(user):
                user = None
            s = self._scores(getattr(row, "session"), user)
            if s is None:  # nothing known about this session: most popular training items
                top = self.popular[:k]
                sc = self.index.support[top].astype(np.float64)
            else:
                top = np.argsort(-s, kind="stable")[:k]
                sc = s[top].astype(np.float64)
            out_items.append([int(x) for x in self.index.item_ids[top]])
            out_scores.append([float(x) for x in sc])
        return pd.DataFrame({"items": out_items, "scores": out_scores})


def example_input(item_ids) -> "Any":
    """A one-row input example (for the signature) from a few known item ids."""
    import pandas as pd

    return pd.DataFrame({"session": [[int(x) for x in item_ids]], "user_id": [-1]})


def signature():
    """Input ``session`` (list of item ids) and optional ``user_id``; output top-K ``items`` + ``scores``;
    param ``k``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec(Array(DataType.long), "session"), ColSpec(DataType.long, "user_id", required=False)]),
        outputs=Schema([ColSpec(Array(DataType.long), "items"), ColSpec(Array(DataType.double), "scores")]),
        params=ParamSchema([ParamSpec("k", DataType.long, DEFAULT_K)]),
    )
