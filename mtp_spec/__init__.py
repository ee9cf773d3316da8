"""mtp-spec: speculative decoding with DeepSeek-V3's multi-token-prediction module."""

from mtp_spec.config import ConfigError, ModelArgs
from mtp_spec.loader import load
from mtp_spec.model import Transformer

__version__ = "0.1.0"

__all__ = ["ConfigError", "ModelArgs", "Transformer", "load", "__version__"]
