import subprocess
import sys

import keras_resmem


def test_public_api_is_small_and_registered():
    assert set(keras_resmem.__all__) == {
        "Comparison",
        "NonFiniteInputGuard",
        "ResidualMemory",
        "__version__",
        "add_examples",
        "attach_memory",
        "callbacks",
        "compare",
        "datasets",
        "diagnostics",
        "export_saved_model",
        "forget",
        "memorize",
        "projection",
        "save_model",
        "search",
        "sharded",
        "tuning",
    }
    import keras

    assert keras.saving.get_registered_object("keras_resmem>ResidualMemory") is (
        keras_resmem.ResidualMemory
    )
    for name in ("Exact", "IVF", "ScaNN", "Auto", "Sharded"):
        assert keras.saving.get_registered_object(f"keras_resmem>{name}") is getattr(
            keras_resmem.search, name
        )
    assert keras.saving.get_registered_object("keras_resmem>PCA") is keras_resmem.projection.PCA


def test_another_keras_backend_gets_a_clear_import_error():
    code = "import keras; keras.backend.backend = lambda: 'jax'; import keras_resmem"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "Set KERAS_BACKEND=tensorflow" in result.stderr
