"""The ground floor: what every other package shares.

One error type a user ever sees (errors.py), result folders written atomically (files.py), JSON
that every parser reads (jsontext.py), Hub ids and the Hugging Face cache (hub.py), and the checks
on state dicts read from disk (state_dicts.py).

May import: nothing of peftctl outside this package.
"""
