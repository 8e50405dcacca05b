"""Greedy decoding by its definition, as an oracle for `generate`.

Each new token is the argmax of the model's logits at the last position, where the whole sequence
so far (prompt and generated tokens) is run through the model again at every step: no KV cache,
no cache positions, nothing carried from one step to the next, so nothing that a cache-handling
bug in transformers, peft or peftctl could share. Positions follow what `generate` gives a left-
padded batch (a token's position is the number of real tokens before it), and a row that has
emitted EOS is filled with the pad token from then on; the loop ends when every row has.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_without_cache(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         max_new_tokens: int, eos_id: int | None, pad_id: int) -> torch.Tensor:
    sequence, mask = input_ids, attention_mask
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        logits = model(input_ids=sequence, attention_mask=mask, position_ids=positions, use_cache=False).logits
        token = logits[:, -1].argmax(-1).masked_fill(finished, pad_id)
        sequence = torch.cat((sequence, token[:, None]), dim=1)
        mask = torch.cat((mask, torch.ones_like(token)[:, None]), dim=1)
        if eos_id is not None:
            finished |= token == eos_id
        if finished.all():
            break
    return sequence
