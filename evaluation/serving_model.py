"""The pyfunc model's code file ("models from code"): MLflow runs this file to get the model.

``evaluation.mlflow_logging`` logs it as ``python_model=<this file>``, with the checkpoint
as an artifact and the project packages as ``code_paths``, so the logged model holds
source code and a checkpoint but no pickled Python object. MLflow copies this file into
the model folder and executes it on ``mlflow.pyfunc.load_model`` / ``mlflow models serve``
(with the model's ``code/`` folder on ``sys.path``, hence the absolute import below); the
last statement hands MLflow the model object, whose ``load_context`` then reads the
checkpoint (see ``evaluation/serving.py``).
"""
import mlflow.models

from evaluation.serving import SessionRecModel

mlflow.models.set_model(SessionRecModel())
