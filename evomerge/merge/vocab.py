"""Vocabularies: merge models whose tokenizers differ (tokens added to some), with mergekit's semantics.

``tokenizer_source`` (a recipe field, and a run config field for searches) chooses the merged model's vocabulary:

* unset: the models are merged as they are stored (row ``i`` with row ``i``) and the tokenizer files of the
  first model that has them (base first) are copied. When the models' embedding row counts differ, this
  falls back to ``base`` (logged);
* ``base``: the base model's vocabulary (``base_model``, else the first model);
* ``union``: the base's vocabulary, then every token another model adds, in model order (base first, then
  the recipe's models): first their regular tokens, then their added tokens (as mergekit builds it);
* a model name: that model's vocabulary.

Every model's vocabulary tensors (``embed`` and ``lm_head`` tensors whose first dimension is the vocabulary:
``embed_tokens``, ``lm_head``; not position embeddings) are first laid out in the output vocabulary, by token,
and then merged by the recipe's method like any other tensor. A model that lacks a token gets, for that row,
the base model's row when the base has the token, else the row of the only model that has it, else the mean
of the rows of the models that have it (zero when none has it) — mergekit's fallback rules. A model without
tokenizer files is taken to have the tokenizer of the first model that has them (base first), cut to its own
row count; token ids at or beyond a model's row count are ignored.

``pad_to_multiple_of`` rounds the number of output rows up to a multiple; each model's padding rows are the
mean of its laid-out rows (mergekit's choice). The output config's ``vocab_size`` is the padded count; tied
embeddings stay tied (only ``embed_tokens`` is stored and laid out).

A vocabulary built from ``union`` or from a non-base model depends on which models a recipe reads (the
fallback rows do too); ``base`` does not.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import ConfigError, SourceMismatchError
from evomerge.io.folder import vocab_rows

log = logging.getLogger(__name__)

VOCAB_KINDS = ("embed", "lm_head")
KEYWORDS = ("base", "union")


def vocab_tensors(folder: Any) -> list[str]:
    """Names of the tensors whose first dimension is the vocabulary (embed_tokens, lm_head, ...)."""
    from evomerge.io import tensor_role

    rows = vocab_rows(folder)
    return [n for n in folder.tensor_names
            if tensor_role(n, folder.model_type).kind in VOCAB_KINDS and folder.shape(n)[:1] == (rows,)]


def set_vocab_size(config: dict[str, Any], size: int) -> dict[str, Any]:
    """A copy of ``config`` whose ``vocab_size`` (top level and/or ``text_config``) is ``size``."""
    out = dict(config)
    if isinstance(out.get("text_config"), dict) and "vocab_size" in out["text_config"]:
        out["text_config"] = {**out["text_config"], "vocab_size": size}
    if "vocab_size" in out or not isinstance(out.get("text_config"), dict):
        out["vocab_size"] = size
    return out


def tokenizer_donor(folders: Mapping[str, Any], first: str | None = None) -> str | None:
    """The first model (``first``, then in order) whose folder has tokenizer files; None when none has."""
    order = ([first] if first in folders else []) + [m for m in folders if m != first]
    return next((m for m in order if folders[m].tokenizer_files), None)


def effective_source(source: str | None, rows: Sequence[int | None]) -> str | None:
    """``source``, or ``"base"`` when it is unset and the models' embedding row counts differ."""
    if source is None and len(set(rows)) > 1:
        return "base"
    return source


def depends_on_models(source: str | None, base: str) -> bool:
    """Whether the vocabulary and fallback rows depend on the set of models read (``union``, another model)."""
    return source not in (None, "base", base)


def padded(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{path}: cannot load its tokenizer: {exc}") from exc


def _union_tokenizer(base_tok: Any, toks: Sequence[tuple[Any, int]]) -> Any:
    """The base tokenizer plus every other token: regular tokens first, then added tokens (mergekit's order)."""
    import copy

    out = copy.deepcopy(base_tok)
    have = set(out.get_vocab())
    regular: list[str] = []
    added: list[Any] = []
    for tok, rows in toks:
        decoder = {i: t for i, t in tok.added_tokens_decoder.items() if i < rows}
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < rows and i not in decoder and t not in have:
                regular.append(t)
                have.add(t)
        for i in sorted(decoder):
            if decoder[i].content not in have:
                added.append(decoder[i])
                have.add(decoder[i].content)
    if regular:
        out.add_tokens(regular)
    if added:
        out.add_tokens(added)
    return out


def _vocab(tok: Any, rows: int | None) -> dict[str, int]:
    return {t: i for t, i in tok.get_vocab().items() if rows is None or i < rows}


@dataclass
class VocabPlan:
    """How the models' vocabulary tensors are laid out in the output vocabulary (see the module docstring).

    ``index[m][i]``: the row of model ``m`` holding output token ``i`` (-1: ``m`` lacks it). ``donors``
    ``(M, T)``: which models' rows make the fallback row of each token some model lacks. ``aligns`` is False
    when nothing moves (tensors merge as stored). The tokenizer written with the merge is ``tokenizer``
    (saved with ``save_pretrained``; union) or the files of folder ``tokenizer_dir``; both None: none.
    """

    source: str | None
    models: tuple[str, ...]
    tokens: int
    size: int
    index: dict[str, torch.Tensor] = field(default_factory=dict)
    donors: torch.Tensor | None = None
    aligns: bool = False
    tokenizer_dir: Path | None = None
    tokenizer: Any = None
    tokenizer_model: str | None = None
    pad: int | None = None

    def load_tokenizer(self) -> Any:
        """The output tokenizer as a transformers object (None when no model has tokenizer files)."""
        if self.tokenizer is not None:
            return self.tokenizer
        return load_tokenizer(self.tokenizer_dir) if self.tokenizer_dir is not None else None

    def describe(self) -> str:
        where = "a union built on " if self.source == "union" else ""
        tok = f"{where}{self.tokenizer_model!r}" if self.tokenizer_model else "none"
        return f"tokenizer_source {self.source or 'unset'}: {self.size} rows, tokenizer of {tok}"

    def align(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Lay every model's vocabulary tensor (rows = that model's tokens) out in the output vocabulary."""
        if not self.aligns:
            return dict(tensors)
        assert self.donors is not None
        first = tensors[self.models[0]]
        rest = tuple(first.shape[1:])
        need = ~torch.stack([self.index[m] >= 0 for m in self.models]).all(0)
        rows = need.nonzero().flatten()
        fill = torch.zeros((len(rows), *rest), dtype=torch.float32, device=first.device)
        count = torch.zeros(len(rows), dtype=torch.float32, device=first.device)
        for j, m in enumerate(self.models):
            mask = self.donors[j, rows]
            if bool(mask.any()):
                src = self.index[m][rows[mask]].to(first.device)
                fill[mask.to(first.device)] += tensors[m].index_select(0, src).to(torch.float32)
                count[mask.to(first.device)] += 1
        count = count.clamp(min=1).reshape(-1, *([1] * len(rest)))
        fill = fill / count
        out: dict[str, torch.Tensor] = {}
        for m in self.models:
            t = tensors[m]
            idx = self.index[m].to(t.device)
            res = torch.empty((self.size, *rest), dtype=t.dtype, device=t.device)
            have = idx >= 0
            res[: self.tokens][have] = t.index_select(0, idx[have])
            miss = ~have[rows.to(t.device)]
            if bool(miss.any()):
                res[rows.to(t.device)[miss]] = fill[miss].to(t.dtype)
            if self.size > self.tokens:
                res[self.tokens :] = torch.mean(res[: self.tokens], dim=0, dtype=torch.float32).to(t.dtype)
            out[m] = res
        return out


def _index(out_tokens: Sequence[str | None], vocab: dict[str, int], rows: int | None) -> torch.Tensor:
    idx = [vocab.get(t, -1) if t is not None else (i if rows is None or i < rows else -1)
           for i, t in enumerate(out_tokens)]
    return torch.tensor(idx, dtype=torch.long)


def plan_vocab(
    folders: Mapping[str, Any], base: str, source: str | None, pad_to_multiple_of: int | None = None
) -> VocabPlan:
    """Plan the output vocabulary of a merge of ``folders`` (opened model folders) with base model ``base``.

    Tokenizers are loaded only when the tensors must be laid out by token. Raises :class:`ConfigError` for an
    unknown ``source``, and when a vocabulary is needed but no model has tokenizer files.
    """
    models = (base, *[m for m in folders if m != base])
    if source is not None and source not in KEYWORDS and source not in folders:
        raise ConfigError(f"tokenizer_source {source!r}: use base, union or one of the models {list(models)}")
    rows = {m: vocab_rows(folders[m]) for m in models}
    eff = effective_source(source, list(rows.values()))
    if eff is None and pad_to_multiple_of and padded(rows[base] or 0, pad_to_multiple_of) != rows[base]:
        eff = "base"
    donor = tokenizer_donor(folders, base)
    if eff is None:
        n = rows[base] or 0
        return VocabPlan(None, models, n, n, tokenizer_dir=folders[donor].path if donor else None,
                         tokenizer_model=donor, pad=pad_to_multiple_of)
    if source is None:
        log.info("the models' vocabularies have %s rows: merging them by token into the base's vocabulary "
                 "(tokenizer_source: base)", sorted({r for r in rows.values() if r is not None}))
    if donor is None:
        folders_list = ", ".join(str(folders[m].path) for m in models)
        if len(set(rows.values())) > 1:
            tensor = (vocab_tensors(folders[base]) or ["the embeddings"])[0]
            counts = ", ".join(f"{rows[m]} in {m!r}" for m in models)
            raise SourceMismatchError(
                f"{tensor}: the vocabularies differ ({counts} rows) and no source folder has tokenizer files to "
                f"match them by token ({folders_list}); add the tokenizer files, or merge models of one vocabulary")
        raise ConfigError(f"tokenizer_source {eff}: no tokenizer files in any source folder ({folders_list}); "
                          "the vocabularies cannot be matched by token")
    toks: dict[str, Any] = {}
    for m in models:
        if folders[m].tokenizer_files:
            toks[m] = load_tokenizer(folders[m].path)
        else:
            log.warning("%s has no tokenizer files: taking it to have the tokenizer of %r", folders[m].path, donor)
    for m in models:
        toks.setdefault(m, toks[donor])
    vocabs = {m: _vocab(toks[m], rows[m]) for m in models}
    src = base if eff == "base" else eff
    if eff == "union":
        tokenizer = _union_tokenizer(toks[base], [(toks[m], rows[m] or 0) for m in models[1:]])
        out_vocab = tokenizer.get_vocab()
        tok_model, tok_dir = (base if folders[base].tokenizer_files else donor), None
    else:
        tokenizer = None
        out_vocab = _vocab(toks[src], rows[src])
        tok_model = src if folders[src].tokenizer_files else donor
        tok_dir = folders[tok_model].path
        if tok_model != src:
            log.warning("%r has no tokenizer files: writing the tokenizer of %r", src, tok_model)
    n = max(out_vocab.values(), default=-1) + 1
    out_tokens: list[str | None] = [None] * n
    for t, i in out_vocab.items():
        out_tokens[i] = t
    index = {m: _index(out_tokens, vocabs[m], rows[m]) for m in models}
    have = torch.stack([index[m] >= 0 for m in models])
    donors = have.clone()
    donors[1:, have[0]] = False  # the base has the token: its row
    donors[:, have.all(0)] = False  # every model has it: no fallback needed
    size = padded(n, pad_to_multiple_of)
    aligns = size != n or any(rows[m] != n or not torch.equal(index[m], torch.arange(n)) for m in models)
    missing = int((~have.any(0)).sum())
    if missing:
        log.warning("%d tokens of the output vocabulary are in no model: their rows are zero", missing)
    return VocabPlan(eff, models, n, size, index, donors, aligns, tok_dir, tokenizer, tok_model, pad_to_multiple_of)


def recipe_plan(recipe: Any, folders: Mapping[str, Any]) -> VocabPlan:
    """The :class:`VocabPlan` of a recipe over its opened folders (base first)."""
    return plan_vocab(folders, recipe.reference_model, recipe.tokenizer_source, recipe.pad_to_multiple_of)


__all__ = [
    "VOCAB_KINDS",
    "VocabPlan",
    "depends_on_models",
    "effective_source",
    "load_tokenizer",
    "plan_vocab",
    "recipe_plan",
    "set_vocab_size",
    "tokenizer_donor",
    "vocab_tensors",
]
