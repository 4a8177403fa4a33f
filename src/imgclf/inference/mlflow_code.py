"""The model MLflow loads from a run (MLflow's models-from-code): imgclf's pyfunc wrapper.

MLflow copies this file into every model imgclf logs and runs it when the model is
loaded; the class itself lives in :mod:`imgclf.inference.mlflow_model`.
"""

from mlflow.models import set_model

from imgclf.inference.mlflow_model import ImgclfPythonModel

set_model(ImgclfPythonModel())
