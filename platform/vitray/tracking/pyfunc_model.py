"""MLflow "models from code" entry: MLflow copies this file into the logged model and runs it on load."""
from mlflow.models import set_model

from vitray.tracking.pyfunc import VitrayPyfuncModel

set_model(VitrayPyfuncModel())
