"""Training: one loop for every method and objective, and what it stands on.

loop.py is the loop as named stages (setup → restore → step → log / evaluate / save → finish) over
a TrainingState, and never names a method. Beside it: the loss (loss.py), AdamW and its schedule
(optim.py), checkpoints (checkpoint.py), FSDP2 (sharding.py), the allocator settings
(allocator.py), Ctrl-C and SIGTERM at a step boundary (interrupts.py), experiment trackers
(trackers.py), and the model as the loop runs it (model_setup.py: gradient checkpointing,
attention, packing, fused kernels, torch.compile), with the kernels it may swap in (attention.py,
fused.py). attention_choice.py is the one decision of which attention kernel a run uses, which
`plan` asks too.

May import: peftctl.data, peftctl.model, peftctl.recipe, peftctl.methods, peftctl.arch,
peftctl.core.
"""
