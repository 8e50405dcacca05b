"""peftctl: parameter-efficient fine-tuning of language models from YAML recipes."""

import os

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
