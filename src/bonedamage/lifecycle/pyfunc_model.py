"""MLflow "model from code" entry: logged with every registered bonedamage model.

MLflow runs this file when it loads the model, instead of unpickling an object.
"""

from mlflow.models import set_model

from bonedamage.lifecycle.pyfunc import TileClassifier

set_model(TileClassifier())
