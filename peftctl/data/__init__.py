"""Training data: rows in, token ids with loss masks out.

rows.py reads rows from files, folders and Hub datasets, maps their columns and checks them, row by
row; tokenize.py renders each row (a conversation, alpaca, completion text) with the tokenizer's
chat template into token ids with the prompt masked, and packs or pads them into batches.

May import: peftctl.model, peftctl.recipe, peftctl.methods, peftctl.arch, peftctl.core.
"""
