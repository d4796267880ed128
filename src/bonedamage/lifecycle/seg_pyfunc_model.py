"""MLflow "model from code" entry of every registered bonedamage segmentation model.

MLflow runs this file when it loads the model, instead of unpickling an object.
"""

from mlflow.models import set_model

from bonedamage.lifecycle.seg_pyfunc import TileSegmenter

set_model(TileSegmenter())
