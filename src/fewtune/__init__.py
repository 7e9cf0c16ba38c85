"""fewtune: compare few-shot adaptation methods for language models, in-domain and out-of-domain."""

__version__ = "0.1.0"
