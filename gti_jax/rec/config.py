"""The recommendation front end's config: the ``rec.*`` keys, and what ``prepare`` reads.

:class:`RecConfig` is the ``rec`` section of a whole run (:class:`gti_jax.pipeline.RunConfig`)
and of :class:`PrepareConfig`, the config of ``python -m gti_jax.rec.prepare`` (``model``,
``seed``, ``data.max_len`` and ``rec.*``). :func:`check_rec` holds the section's range and
cross-field checks. Built and parsed by the config engine, :mod:`gti_jax.config`.

Example:
  >>> from gti_jax.config import load
  >>> load(PrepareConfig, None, ["rec.levels=2"], validate=check_prepare).rec.levels
  2
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gti_jax.config import ConfigError, at_least, check

__all__ = [
    "REC_PATH_KEYS",
    "PrepareConfig",
    "PrepareDataConfig",
    "RecConfig",
    "check_prepare",
    "check_rec",
]

RecDatasetName = Literal["movielens-100k", "amazon-2014", "amazon-2018", "amazon-2023", "csv"]
SemanticIdMethod = Literal["rq_kmeans", "rq_vae"]
RecTask = Literal["prompt", "sequence"]

# rec.paths keys each dataset needs (required, optional).
REC_PATH_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "movielens-100k": ((), ("dir",)),
    "amazon-2014": (("reviews", "meta"), ()),
    "amazon-2018": (("reviews", "meta"), ()),
    "amazon-2023": (("reviews", "meta"), ()),
    "csv": (("interactions", "items"), ()),
}


@dataclass(frozen=True)
class RecConfig:
    """The recommendation front end (python -m gti_jax.rec.prepare): data -> semantic IDs -> files."""

    dataset: RecDatasetName = "movielens-100k"
    """Source: movielens-100k (ships with recbole), amazon-2014 (Beauty/Sports/Toys: JSON or
    Python-literal lines), amazon-2018, amazon-2023 (JSON lines; all optionally gzip) or csv
    (interactions CSV + items JSONL)."""

    paths: dict[str, str] = field(default_factory=dict)
    """Input files: amazon-*: {reviews, meta}; csv: {interactions, items}; movielens-100k:
    optional {dir} holding ml-100k.inter and ml-100k.item (default: recbole's copy)."""

    min_interactions: int = 5
    """k-core: users and items with fewer interactions are dropped, repeatedly."""

    task: RecTask = "prompt"
    """prompt: one chat prompt per sliding window (history -> next item); sequence: one row
    per user (chunk) of their time-ordered item IDs after rec.sequence_prefix, the loss on
    every item after the first, so one forward pass trains all of that user's windows."""

    max_history: int = 5
    """Most recent items shown in a next-item prompt's history (rec.task=prompt)."""

    sequence_items: int | None = None
    """rec.task=sequence: most items in one row; longer histories are cut into chunks. null:
    as many as fit data.max_len (8 tokens kept for the prefix)."""

    sequence_overlap: int = 8
    """rec.task=sequence: items a chunk repeats from the previous one as context only (every
    target keeps at least this much history); must be < rec.sequence_items."""

    sequence_prefix: str = "History:"
    """rec.task=sequence: the text before the first item of every row and evaluation prompt."""

    max_sequence_length: int | None = None
    """Keep each user's last N interactions before the k-core filter; null: all."""

    embeddings: str = "backbone"
    """Item embeddings for the semantic IDs: backbone (mean-pooled final hidden states of
    `model` over each item's text) or a .npy file [num_items, D] in the filtered item order."""

    embed_batch_size: int = 32
    """Item texts embedded at once (backbone embeddings)."""

    embed_max_len: int = 64
    """Longest item text in tokens (backbone embeddings); longer texts are cut."""

    semantic_ids: SemanticIdMethod = "rq_kmeans"
    """Quantizer: rq_kmeans (residual k-means) or rq_vae (the paper's RQ-VAE)."""

    semantic_ids_file: str | None = None
    """Import precomputed semantic IDs instead of computing them: a JSON map item id (or
    index) -> code tokens, e.g. LC-Rec's .index.json {"0": ["<a_12>", "<b_3>", ...]}. Every
    item left after filtering must be covered, with IDs of one length and no two alike.
    null: computed by rec.semantic_ids."""

    levels: int = 3
    """Quantizer levels; one more disambiguation level is added when IDs collide."""

    codebook_size: int = 32
    """Codes per level (new tokens per level); at most the number of items."""

    rqvae_steps: int = 2000
    """Optimizer steps of the RQ-VAE (semantic_ids=rq_vae)."""

    history_with_titles: bool = False
    """Show each history item's title after its ID in next-item prompts."""

    max_train_examples: int | None = None
    """Keep this many training examples (a seeded random subset, in order); null: all."""

    max_eval_users: int | None = None
    """Keep this many users in valid/test (a seeded random subset, the same for both); null:
    all."""

    seed: int | None = None
    """Seed of the semantic IDs and the subsets; null: the top-level seed."""


@dataclass(frozen=True)
class PrepareDataConfig:
    """What preparation reads of the trainer's data section."""

    max_len: int = 128
    """Longest prompt + completion in tokens (rec.task=sequence rows are sized to fit it)."""


@dataclass(frozen=True)
class PrepareConfig:
    """``python -m gti_jax.rec.prepare``: the rec section, and the keys of a run it reads."""

    model: str = "smollm2-135m"
    """The backbone that embeds the items (rec.embeddings=backbone): Hugging Face checkpoint
    directory, GGUF file, or alias."""

    seed: int = 0
    """Seed of the semantic IDs and the subsets when rec.seed is null."""

    data: PrepareDataConfig = field(default_factory=PrepareDataConfig)
    """What preparation reads of the trainer's data section."""

    rec: RecConfig = field(default_factory=RecConfig)
    """The recommendation data preparation."""


def check_rec(rec: RecConfig) -> None:
    """Range and cross-field checks of the ``rec`` section (one ConfigError line each)."""
    required, optional = REC_PATH_KEYS[rec.dataset]
    unknown = sorted(set(rec.paths) - set(required) - set(optional))
    check(
        not unknown,
        f"rec.paths has key(s) {', '.join(unknown)} that rec.dataset={rec.dataset} does not use; "
        f"it takes {', '.join(required + optional) or 'none'}",
    )
    missing = [k for k in required if not rec.paths.get(k)]
    if missing:
        raise ConfigError(
            f"rec.dataset={rec.dataset} needs rec.paths.{missing[0]}; set "
            + " ".join(f"rec.paths.{k}=FILE" for k in required)
        )
    check(
        rec.embeddings == "backbone" or rec.embeddings.endswith(".npy"),
        f"rec.embeddings must be 'backbone' or a .npy file, got {rec.embeddings!r}",
    )
    at_least("rec.min_interactions", rec.min_interactions, 1)
    at_least("rec.max_history", rec.max_history, 1)
    at_least("rec.sequence_items", rec.sequence_items, 2)
    at_least("rec.sequence_overlap", rec.sequence_overlap, 0)
    if rec.sequence_items is not None:
        check(
            rec.sequence_overlap < rec.sequence_items,
            f"rec.sequence_overlap={rec.sequence_overlap} must be < rec.sequence_items="
            f"{rec.sequence_items}; lower the overlap or raise the items",
        )
    at_least("rec.max_sequence_length", rec.max_sequence_length, 3)
    at_least("rec.embed_batch_size", rec.embed_batch_size, 1)
    at_least("rec.embed_max_len", rec.embed_max_len, 1)
    check(
        1 <= rec.levels <= 25,
        f"rec.levels must be in [1, 25] (one letter a..z per level, one spare for "
        f"disambiguation), got {rec.levels}",
    )
    at_least("rec.codebook_size", rec.codebook_size, 2)
    at_least("rec.rqvae_steps", rec.rqvae_steps, 1)
    at_least("rec.max_train_examples", rec.max_train_examples, 1)
    at_least("rec.max_eval_users", rec.max_eval_users, 1)
    at_least("rec.seed", rec.seed, 0)


def check_prepare(cfg: PrepareConfig) -> None:
    """The checks of :class:`PrepareConfig` (the same messages as a whole run's)."""
    check(bool(cfg.model), "model must name a checkpoint directory, GGUF file or alias")
    at_least("seed", cfg.seed, 0)
    at_least("data.max_len", cfg.data.max_len, 2)
    check_rec(cfg.rec)
