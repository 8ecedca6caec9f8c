"""Model zoo: the NumPy custom CNN and (lazily, via TensorFlow) the Keras models.

from breastcnn.models import create_model, load_model, model_spec, save_model
m = create_model("custom", input_shape=(224, 224, 3), num_classes=2, seed=0)
model_spec(m).image_size        # 224: what every consumer reads (models/spec.py)
save_model(m, "model.npz")      # the one way to write any model
"""

from breastcnn.models.classifier import Classifier, model_spec
from breastcnn.models.io import NumpyClassifier, load_checkpoint, load_model, save_model
from breastcnn.models.registry import create_model, list_models, register_model
from breastcnn.models.spec import ModelSpec

__all__ = [
    "Classifier",
    "ModelSpec",
    "NumpyClassifier",
    "create_model",
    "list_models",
    "load_checkpoint",
    "load_model",
    "model_spec",
    "register_model",
    "save_model",
]
