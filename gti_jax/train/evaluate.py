"""Evaluation of a trained model on the task's eval examples, with the popularity baseline.

An :class:`Evaluator` is built once per run (the encodings, the candidate trie, the
popularity ranking, the compiled loss function on the object, no module globals) and called
on a model, at the end of a run and, for a learning curve, during fine-tuning
(``eval.curve_every``).

What it measures, on the first ``eval.max_examples`` examples of ``data.eval``:

* ``eval_loss`` / ``perplexity``: teacher-forced loss on the completion (or loss segments);
* ``exact_match``: greedy decoding reproduces the completion;
* with candidates: constrained beam search over them, ``valid_rate``, Recall@K / NDCG@K;
* ``popularity_baseline``: the same metrics for ranking every candidate by how often it is
  a training target (``data.sft``), on exactly the same examples, so the model's numbers
  always stand beside what counting gives.

Examples are prompt/completion rows or sequence rows, one kind per file: a sequence row's
prompt is its segments but the last, rendered as in training (no chat template), and the
model is asked for the last segment with no end token after it (beams finish as soon as they
spell a candidate), which is how training presents a next item.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from gti_jax.metrics import popularity_baseline, retrieval_metrics, valid_rate
from gti_jax.models.decode import TrieConstraint, beam_search, generate
from gti_jax.models.sharding import model_mesh, put_rows
from gti_jax.progress import batches, progress
from gti_jax.train.data import (
    Batch,
    Batcher,
    DataError,
    Example,
    encode_eval_prompt,
    encode_examples,
    end_of_turn_id,
    target_positions,
    target_width,
)
from gti_jax.train.steps import batch_sharding, model_lm_loss

__all__ = ["Evaluator", "training_targets"]


def _padded(rows: list, size: int | None) -> list:
    """`rows` filled up to `size` (None: as they are) with copies of the last; the copies'
    outputs are dropped (rows of a batch never interact)."""
    return rows if size is None else rows + [rows[-1]] * (size - len(rows))


def training_targets(examples: Sequence[Example]) -> Counter:
    """How often each text is a training target: completions, or loss segments of sequence rows.

    >>> from gti_jax.train.data import segment_example
    >>> rows = [Example("p", "<x>"), segment_example([("H:", False), ("<x>", True), ("<y>", True)])]
    >>> sorted(training_targets(rows).items())
    [('<x>', 2), ('<y>', 1)]
    """
    counts: Counter = Counter()
    for ex in examples:
        if ex.segments is None:
            counts[ex.completion.strip()] += 1
        else:
            counts.update(text.strip() for text, loss in ex.segments if loss)
    return counts


def _equal_chunks(rows: list, size: int) -> list[tuple[int, list]]:
    """`(start, chunk)` pairs of at most `size` rows, all of one length (the last padded by
    repeating its last row): one batch shape, so one compiled beam search per prompt bucket.

    >>> [(i, len(c)) for i, c in _equal_chunks(list(range(10)), 4)]
    [(0, 4), (4, 4), (8, 4)]
    >>> [(i, len(c)) for i, c in _equal_chunks(list(range(65)), 32)]
    [(0, 22), (22, 22), (44, 22)]
    """
    if not rows:
        return []
    parts = -(-len(rows) // size)
    step = -(-len(rows) // parts)
    out = []
    for i in range(0, len(rows), step):
        chunk = rows[i : i + step]
        out.append((i, chunk + [chunk[-1]] * (step - len(chunk))))
    return out


class Evaluator:
    """Evaluates models on one task (see the module docstring).

    A model sharded on a mesh is evaluated where it is: the batches are placed with their
    rows over the mesh's batch axes (``mesh.rules``), padded to a multiple of those shards,
    so no process ever holds the whole model. On several processes every process calls the
    evaluator with the same model (each compiled call is a collective) and gets the same
    results.

    Args:
        cfg: the run's :class:`~gti_jax.train.config.TrainConfig` (``eval.*``, ``data.*``).
        tokenizer: the extended tokenizer.
        examples: the eval examples (all; ``eval.max_examples`` is applied here).
        candidates: the valid completions, or None for the distinct eval completions.
        train_examples: the fine-tuning examples, for the popularity baseline (may be empty).
        num_tokens: the tokenizer's size (table rows past it are never generated).

    Raises:
        DataError: an eval file mixing prompt/completion and sequence rows, or a sequence row
            whose last segment is not a target.
    """

    def __init__(
        self,
        cfg: Any,
        tokenizer: Any,
        examples: Sequence[Example],
        candidates: Sequence[str] | None,
        train_examples: Sequence[Example],
        *,
        num_tokens: int,
    ):
        self.cfg, self.tokenizer, self.num_tokens = cfg, tokenizer, int(num_tokens)
        ev = cfg.eval
        self.examples = list(examples if ev.max_examples is None else examples[: ev.max_examples])
        kinds = {ex.segments is not None for ex in self.examples}
        if len(kinds) > 1:
            raise DataError(
                "data.eval mixes prompt/completion rows and sequence rows; use one kind per file"
            )
        self.sequence = kinds == {True}
        for i, ex in enumerate(self.examples):
            if self.sequence and not ex.segments[-1][1]:
                raise DataError(
                    f"data.eval row {i + 1}: the last segment is what evaluation asks for and "
                    'must have "loss": true'
                )
        ct = cfg.data.chat_template
        self.end = end_of_turn_id(tokenizer, chat_template=ct)
        # encoded now: an example that does not fit data.max_len is found before training
        self.encoded = encode_examples(
            tokenizer, self.examples, max_len=cfg.data.max_len, chat_template=ct, source="eval"
        )
        self.targets = [ex.completion.strip() for ex in self.examples]
        self.prompts = [
            [
                int(t)
                for t in encode_eval_prompt(
                    tokenizer, ex, chat_template=ct, max_len=cfg.data.max_len
                )
            ]
            for ex in self.examples
        ]
        self.candidates = (
            list(dict.fromkeys(candidates)) if candidates is not None else sorted(set(self.targets))
        )
        self._seqs: dict[tuple[int, ...], str] = {}
        for c in self.candidates:
            self._seqs.setdefault(tuple(tokenizer.encode(c, add_special_tokens=False)), c)
        self.trie = (
            TrieConstraint.from_sequences(
                [list(k) for k in self._seqs], eos_id=None if self.sequence else self.end
            )
            if self._seqs
            else None
        )
        self.ks = tuple(ev.k)
        counts = training_targets(train_examples)
        self.popularity = (
            {c: counts.get(c.strip(), 0) for c in self.candidates} if train_examples else None
        )
        self._loss_fns: dict[Any, Any] = {}
        self._remembered: tuple[dict[str, Any], list[int | None], str] | None = None

    def remember_retrieval(self, metrics: dict, ranks: list, source: str) -> None:
        """Lets the next call reuse a ranking just computed on the same model (the curve's
        last point); ``results["retrieval_from"]`` then names `source`."""
        self._remembered = (dict(metrics), list(ranks), source)

    def forget_retrieval(self) -> None:
        """Drops a ranking kept by :meth:`remember_retrieval` (the model changed since)."""
        self._remembered = None

    def _loss_fn(self, graphdef):
        if graphdef not in self._loss_fns:

            @jax.jit
            def f(state, batch):
                return model_lm_loss(nnx.merge(graphdef, state), batch)

            self._loss_fns[graphdef] = f
        return self._loss_fns[graphdef]

    def _rows(self, model, size: int) -> tuple[Any, int | None]:
        """The sharding of `[B, T]` rows for `model` and `size` rounded up to a multiple of
        its batch shards; `(None, None)` for a model on one device."""
        mesh = model_mesh(model)
        if mesh is None:
            return None, None
        sharding = batch_sharding(mesh, self.cfg.mesh.rules)
        axes = sharding.spec[0] if sharding.spec else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        shards = math.prod(mesh.shape[a] for a in axes)
        return sharding, -(-size // shards) * shards

    def loss(self, model) -> dict[str, float]:
        """Teacher-forced loss and perplexity on the targets of the eval examples."""
        cfg, enc = self.cfg, self.encoded
        sharding, rows = self._rows(model, cfg.eval.batch_size)
        bs = rows or cfg.eval.batch_size
        buckets = Batcher(enc, batch_size=1, seed=0, max_len=cfg.data.max_len)
        graphdef, state = nnx.split(model)
        fn = self._loss_fn(graphdef)
        loss_sum, count = 0.0, 0.0
        for i in batches(len(enc), cfg.eval.batch_size, desc="eval loss"):
            chunk = enc[i : i + cfg.eval.batch_size]
            t = buckets.bucket_for(max(len(ids) for ids, _ in chunk))
            ids = np.zeros((bs, t), np.int32)
            lm = np.zeros((bs, t), np.float32)
            attn = np.zeros((bs, t), np.int32)
            for r, (x, m) in enumerate(chunk):  # rows past the chunk stay empty (fixed shapes)
                ids[r, : len(x)], lm[r, : len(x)], attn[r, : len(x)] = x, m, 1
            targets = target_positions(list(lm), t, target_width(buckets.max_targets, t))
            batch = Batch(*(put_rows(x, sharding) for x in (ids, lm, attn, targets)))
            s, n = fn(state, batch)
            loss_sum, count = loss_sum + float(s), count + float(n)
        loss = loss_sum / max(count, 1.0)
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    def exact_match(self, model) -> float:
        """Share of examples whose greedy continuation is exactly the completion."""
        bs, hits = self.cfg.eval.batch_size, 0
        if self.sequence:  # no end token: compare the first len(target) tokens
            want = [self.tokenizer.encode(t, add_special_tokens=False) for t in self.targets]
            n_new = max(len(w) for w in want)
        else:
            n_new = self.cfg.eval.max_new_tokens
        sharding, rows = self._rows(model, bs)
        for i in batches(len(self.prompts), bs, desc="greedy decoding"):
            chunk = self.prompts[i : i + bs]
            out = generate(
                model,
                _padded(chunk, rows),
                max_new_tokens=n_new,
                eos_ids=[] if self.sequence else [self.end],
                num_tokens=self.num_tokens,
                batch_sharding=sharding,
            )
            for j, seq in enumerate(out.sequences[: len(chunk)]):
                if self.sequence:
                    w = want[i + j]
                    hits += [int(t) for t in seq[: len(w)]] == list(w)
                else:
                    text = self.tokenizer.decode(
                        [t for t in seq if t != self.end], skip_special_tokens=False
                    ).strip()
                    hits += text == self.targets[i + j]
        return hits / len(self.prompts)

    def ranked(self, model) -> tuple[list[list[str]], list[str]]:
        """Constrained beam search: each example's candidates, best first, and every output."""
        beams = max(self.cfg.eval.beams, 1)
        max_new = max(len(k) for k in self._seqs) + (0 if self.sequence else 1)
        ranked, generated = [], []
        chunks = _equal_chunks(self.prompts, self.cfg.eval.beam_batch_size)
        sharding, rows = self._rows(model, len(chunks[0][1]) if chunks else 1)
        for i, chunk in progress(chunks, total=len(chunks), desc="beam search"):
            out = beam_search(
                model,
                _padded(chunk, rows),
                num_beams=beams,
                max_new_tokens=max_new,
                eos_ids=[] if self.sequence else [self.end],
                num_tokens=self.num_tokens,
                constraint=self.trie,
                batch_sharding=sharding,
            )
            for hyps in out.sequences[: min(len(chunk), len(self.prompts) - i)]:  # no padding
                names = []
                for h in hyps:
                    key = tuple(int(t) for t in h if self.sequence or t != self.end)
                    name = self._seqs.get(key)
                    generated.append(name if name is not None else self.tokenizer.decode(list(key)))
                    if name is not None:
                        names.append(name)
                ranked.append(names)
        return ranked, generated

    def retrieval(self, model) -> tuple[dict[str, Any], list[int | None]]:
        """Recall/NDCG@K of the model and of popularity, and each example's target rank."""
        ranked, generated = self.ranked(model)
        out: dict[str, Any] = {"valid_rate": valid_rate(generated, set(self.candidates))}
        out.update(retrieval_metrics(ranked, self.targets, ks=self.ks))
        ranks = [
            (names.index(t) + 1 if t in names else None)
            for names, t in zip(ranked, self.targets, strict=True)
        ]
        return out, ranks

    def popularity_baseline(self) -> dict[str, Any] | None:
        """Ranking every candidate by its training-target count, on the same examples."""
        if not self.popularity or not self.examples:
            return None
        out: dict[str, Any] = dict(popularity_baseline(self.popularity, self.targets, self.ks))
        out["num_eval"] = len(self.examples)
        out["counts_from"] = "training targets of data.sft (completions / loss segments)"
        return out

    def __call__(self, model) -> tuple[dict[str, Any], list[int | None]]:
        """Every figure of the module docstring, and each example's target rank (or None)."""
        if not self.examples:  # no data.eval, or eval.max_examples=0
            return {}, []
        results: dict[str, Any] = {"num_eval": len(self.examples)}
        results.update(self.loss(model))
        if self.cfg.eval.exact_match:
            results["exact_match"] = self.exact_match(model)
        ranks: list[int | None] = []
        if self.trie is not None:
            if self._remembered is not None:
                r, ranks, source = self._remembered
                self._remembered = None
                results["retrieval_from"] = source
            else:
                r, ranks = self.retrieval(model)
            results.update(r)
            beams, kmax = self.cfg.eval.beams, max(self.ks)
            if beams < kmax:
                results["note"] = (
                    f"eval.beams={beams} < max(eval.k)={kmax}: metrics at larger K count only "
                    f"{beams} results"
                )
        pop = self.popularity_baseline()
        if pop is not None:
            results["popularity_baseline"] = pop
        return results, ranks
