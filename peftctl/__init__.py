"""peftctl: parameter-efficient fine-tuning of language models from YAML recipes."""

import os

# peftctl works from local files only: make any accidental hub access fail fast instead of
# hanging on a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
