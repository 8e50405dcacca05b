"""What training bought, scored: held-out loss, perplexity, token accuracy and generations, base vs adapter.

scores.py computes the figures on held-out rows (response tokens only, as training masks them) and
the greedy generations scored against the references; samples.py writes a run's sample replies
(the base before the method, then base + adapter); task_metrics.py scores the other tasks'
predictions (classification: accuracy, macro-F1, per class, the confusion matrix; seq2seq: ROUGE,
exact match). Reading `peftctl eval`'s arguments is the
command's business (cli/), not this package's.

May import: peftctl.train (the loss), peftctl.export (adapters to score), peftctl.data,
peftctl.model, peftctl.recipe, peftctl.methods, peftctl.arch, peftctl.core.
"""
