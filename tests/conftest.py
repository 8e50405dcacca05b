import os

# Tests never reach a network: anything that would ask the Hub fails at once instead (the Hub
# tests build the cache layouts they read). Set before huggingface_hub is imported: it reads
# the variable once.
os.environ["HF_HUB_OFFLINE"] = "1"

import torch

# The tests' models are tiny: one thread does their matmuls as fast as two, and avoids the
# OpenMP spin-waiting that makes parallel processes on a 2-core machine 10-50× slower.
torch.set_num_threads(1)
