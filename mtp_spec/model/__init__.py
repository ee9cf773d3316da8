from mtp_spec.model.mtp import MTP, MTPOutput
from mtp_spec.model.transformer import ModelOutput, Transformer

__all__ = ["MTP", "MTPOutput", "ModelOutput", "Transformer"]
