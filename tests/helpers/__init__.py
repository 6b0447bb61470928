"""Shared test helpers: tiny tokenizers and tiny random models, built offline in the test.

One module per kind of fixture: `tokenizers` (tiny byte-level BPE tokenizers), `hf_models`
(tiny random transformers + torch checkpoints written to a directory).
"""
