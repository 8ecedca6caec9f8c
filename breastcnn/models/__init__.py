"""Model zoo: the NumPy custom CNN and (lazily, via TensorFlow) the Keras models.

    from breastcnn.models import create_model, load_model
    m = create_model("custom", input_shape=(224, 224, 3), num_classes=2, seed=0)
"""

from breastcnn.models.io import load_checkpoint, load_model, save_model
from breastcnn.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "load_model", "register_model", "list_models", "save_model", "load_checkpoint"]
