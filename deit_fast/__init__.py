"""deit-fast: fast, trustworthy training of DeiT vision transformers."""

__version__ = "0.1.0"
