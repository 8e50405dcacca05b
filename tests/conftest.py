import torch

# The tests' models are tiny: one thread does their matmuls as fast as two, and avoids the
# OpenMP spin-waiting that makes parallel processes on a 2-core machine 10-50× slower.
torch.set_num_threads(1)
