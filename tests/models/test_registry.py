import subprocess
import sys

import pytest

from breastcnn.errors import UserInputError
from breastcnn.models import create_model, list_models, register_model
from breastcnn.nn import Sequential


def test_builtin_names_listed():
    assert {"custom", "vgg16", "resnet50", "custom-keras"} <= set(list_models())


def test_unknown_name_lists_known_ones():
    with pytest.raises(UserInputError, match=r"unknown model 'alexnet'; known models: .*custom.*vgg16"):
        create_model("alexnet")


def test_register_callable_and_lazy_string():
    calls = []

    def factory(input_shape, num_classes, seed, **kwargs):
        calls.append((input_shape, num_classes, seed, kwargs))
        return "built"

    register_model("test-factory", factory, overwrite=True)
    assert create_model("test-factory", input_shape=(32, 32, 3), num_classes=3, seed=4, depth=2) == "built"
    assert calls == [((32, 32, 3), 3, 4, {"depth": 2})]
    register_model("test-lazy", "breastcnn.models.custom:create_custom", overwrite=True)
    assert isinstance(create_model("test-lazy", input_shape=(64, 64, 3)), Sequential)
    with pytest.raises(ValueError, match="already registered"):
        register_model("test-lazy", factory)
    with pytest.raises(ValueError, match="module:function"):
        register_model("test-bad", "no_colon_here")


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserInputError, match="num_classes"):
        create_model("custom", num_classes=1)
    with pytest.raises(UserInputError, match="input_shape"):
        create_model("custom", input_shape=(224, 224))


def test_listing_and_custom_never_import_tensorflow():
    code = (
        "import sys; from breastcnn.models import create_model, list_models; list_models(); "
        "create_model('custom', input_shape=(64, 64, 3)); "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
