"""One decorator that marks a public name and registers it for Keras serialization."""

import keras

PACKAGE = "keras_resmem"


def keras_resmem_export(path):
    """Marks `path` (e.g. "keras_resmem.ResidualMemory") as public API.

    Classes with a `get_config` (layers, models) are also registered with Keras
    serialization under the package name `keras_resmem`. The registered name is
    stored in every saved `.keras` file, so renaming a registered class breaks
    users' saved models.
    """
    if not path.startswith(PACKAGE + "."):
        raise ValueError(f"Public paths start with '{PACKAGE}.'. Received: path={path}")

    def decorator(symbol):
        symbol._keras_resmem_export_path = path
        if isinstance(symbol, type) and hasattr(symbol, "get_config"):
            name = path.rsplit(".", 1)[-1]
            return keras.saving.register_keras_serializable(package=PACKAGE, name=name)(symbol)
        return symbol

    return decorator
