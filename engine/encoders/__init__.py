"""3D encoders behind one registry and one small contract (`rafmedia.engine.encoders.base`).

Build one with `create_encoder(name, **options)`; list them with `list_encoders()`. Each module of this package
registers its encoders when it is imported; a new module is added to the import line below.
"""
from rafmedia.engine.encoders import cnn, transformers  # noqa: F401  (register their encoders)
from rafmedia.engine.encoders.base import ENCODERS, EncoderConfig, PooledEncoder, create_encoder, list_encoders

__all__ = ["ENCODERS", "EncoderConfig", "PooledEncoder", "create_encoder", "list_encoders"]
