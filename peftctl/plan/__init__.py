"""Everything known before the weights load: the method on a weightless model, and the memory a run needs.

skeleton.py builds the model on the meta device and puts the recipe's method on it (refusals, the
targets, what will train: the checks `validate`, `plan`, `train` and `bakeoff` run first);
memory_plan.py is `peftctl plan`'s arithmetic (weights, gradients, AdamW states, activations) from
that skeleton; activations.py counts what a training step keeps for its backward pass, per layer
and kernel.

May import: peftctl.train (which kernels a run will use), peftctl.export (a saved adapter to
continue), peftctl.data, peftctl.model, peftctl.recipe, peftctl.methods, peftctl.arch,
peftctl.core.
"""
