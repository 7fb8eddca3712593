"""Tokenizers: one small interface over SentencePiece models and Hugging Face tokenizer.json files.

`Tokenizer` is what the sampler, data pipeline and evaluator see: `encode` / `decode` /
`encode_batch` / `id_of` and the `bos_id`, `eos_id`, `pad_id`, `vocab_size` facts. Two
implementations:

* `SentencePieceTokenizer` for the tiny models trained from scratch (`train_sentencepiece` builds
  one in-process from an iterable of strings);
* `HFTokenizer` for a Hugging Face `tokenizer.json` (what Qwen ships), read with the `tokenizers`
  package.

Conventions shared by both:

* `encode` never adds special tokens unless asked (`add_bos`, `add_eos`); special-token strings
  inside the text (e.g. "<|im_start|>") are recognised by `HFTokenizer` but not by SentencePiece,
  whose control symbols can only be produced by id.
* `decode` does not cut at the first eos: callers cut (the sampler knows where each row ended).
* `pad_id` is the model's pad token when it has one, else `eos_id` (pad positions are masked out
  everywhere, so any valid id will do); it is None only when there is neither.
* `vocab_size` is one more than the largest id the tokenizer can produce, i.e. the smallest model
  embedding that fits (see `check_vocab_fits`).
"""
import abc
from collections.abc import Iterable, Iterator, Sequence
import json
import os
import re
from typing import Any

import numpy as np
import sentencepiece as spm
import tokenizers as hf_tokenizers

from dypo_jax import errors

# Ids reserved by `train_sentencepiece`, in this order at the start of the vocabulary. The
# user-defined symbols ("\n" first) follow them from id 4 on.
SP_PAD_ID = 0
SP_UNK_ID = 1
SP_BOS_ID = 2
SP_EOS_ID = 3

TOKENIZER_KINDS = ("sentencepiece", "hf")

# Sentences longer than this many bytes are skipped by the SentencePiece trainer (its default is
# 4192, which would silently drop long worked solutions from the corpus).
_SP_MAX_SENTENCE_BYTES = 1 << 16


class TokenizerFileError(errors.BadInput, FileNotFoundError):
  """A tokenizer file is missing; both a ValueError (house style) and a FileNotFoundError."""


class Tokenizer(abc.ABC):
  """Text <-> token ids. Subclasses implement `_encode_texts`, `_decode_ids`, `id_of`."""

  # Subclasses set these four in __init__.
  _size: int
  _bos: int | None
  _eos: int | None
  _pad: int | None

  @property
  def vocab_size(self) -> int:
    """Largest id + 1: the smallest embedding that fits every id."""
    return self._size

  @property
  def bos_id(self) -> int | None:
    """Beginning-of-sequence id, or None (e.g. Qwen has no bos)."""
    return self._bos

  @property
  def eos_id(self) -> int | None:
    """End-of-sequence id, or None when the tokenizer names none."""
    return self._eos

  @property
  def pad_id(self) -> int | None:
    """Pad id; falls back to `eos_id` when the tokenizer has no pad token."""
    return self._pad

  @abc.abstractmethod
  def id_of(self, token: str) -> int:
    """Id of one vocabulary entry (piece / token string); ValueError naming it when absent."""

  @abc.abstractmethod
  def _encode_texts(self, texts: list[str]) -> list[list[int]]:
    """Encodes each text without adding any special token."""

  @abc.abstractmethod
  def _decode_ids(self, ids: list[int], skip_special: bool) -> str:
    """Decodes validated ids."""

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Encodes `text`; prepends bos / appends eos when asked (ValueError if the model has none)."""
    return self.encode_batch([text], add_bos=add_bos, add_eos=add_eos)[0]

  def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False,
                   add_eos: bool = False) -> list[list[int]]:
    """Encodes each of `texts` like `encode`; returns ragged lists (no padding)."""
    if isinstance(texts, str):
      raise ValueError(f"encode_batch takes a sequence of strings, got one string: {texts[:50]!r}")
    texts = list(texts)
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise ValueError(f"text {i} to encode is a {type(text).__name__}, not a str: {text!r:.80}")
    prefix = [self._special_id("bos", self.bos_id)] if add_bos else []
    suffix = [self._special_id("eos", self.eos_id)] if add_eos else []
    return [prefix + ids + suffix for ids in self._encode_texts(texts)]

  def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special: bool = True) -> str:
    """Decodes a 1-D list / array of ids; special tokens are dropped when `skip_special`.

    Nothing is cut at an eos: the caller decides where a sequence ends.
    """
    return self._decode_ids(self._check_ids(ids), skip_special)

  def _special_id(self, role: str, token_id: int | None) -> int:
    if token_id is None:
      raise ValueError(f"{self!r} has no {role} token, so add_{role}=True cannot be honoured")
    return token_id

  def _check_ids(self, ids: Sequence[int] | np.ndarray) -> list[int]:
    arr = np.asarray(ids)
    if arr.ndim != 1:
      raise ValueError(f"decode takes a 1-D sequence of ids, got shape {arr.shape}")
    if arr.size == 0:
      return []
    if not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"decode takes integer ids, got dtype {arr.dtype}")
    bad = np.flatnonzero((arr < 0) | (arr >= self.vocab_size))
    if bad.size:
      i = int(bad[0])
      raise ValueError(f"id {int(arr[i])} at position {i} is outside the vocabulary "
                       f"[0, {self.vocab_size}) of {self!r}")
    return arr.tolist()


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece `.model` file.

  Control symbols (pad / bos / eos) decode to "" with `skip_special=True` and to their piece
  ("<s>", "</s>", "<pad>") otherwise; unknown characters encode to unk and decode to " ⁇ ".
  """

  def __init__(self, model_path: str | os.PathLike[str]):
    self.path = os.fspath(model_path)
    if not os.path.isfile(self.path):
      raise TokenizerFileError(f"SentencePiece model file not found: {self.path!r}")
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(self.path)
    except (RuntimeError, OSError) as e:
      raise errors.BadInput(f"{self.path!r} is not a SentencePiece model: {e}") from e
    as_opt = lambda i: i if i >= 0 else None  # SentencePiece says -1 for "none".
    self._bos = as_opt(self._sp.bos_id())
    self._eos = as_opt(self._sp.eos_id())
    pad = as_opt(self._sp.pad_id())
    self._pad = pad if pad is not None else self._eos
    self._size = self._sp.GetPieceSize()

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self.path!r})"

  def id_of(self, token: str) -> int:
    token_id = self._sp.PieceToId(token)
    unk = self._sp.unk_id()
    if token_id == unk and token != self._sp.IdToPiece(unk):  # Unknown pieces map to unk.
      raise ValueError(f"token {token!r} is not in the vocabulary of {self!r}")
    return token_id

  def _encode_texts(self, texts: list[str]) -> list[list[int]]:
    return self._sp.Encode(texts)

  def _decode_ids(self, ids: list[int], skip_special: bool) -> str:
    if skip_special:
      return self._sp.Decode(ids)  # Drops control ids itself.
    # Decode the runs between control ids, and spell the control ids out.
    parts, run = [], []
    for i in ids:
      if self._sp.IsControl(i):
        parts.append(self._sp.Decode(run))
        parts.append(self._sp.IdToPiece(i))
        run = []
      else:
        run.append(i)
    parts.append(self._sp.Decode(run))
    return "".join(parts)


def train_sentencepiece(texts: Iterable[str], *, vocab_size: int, out_prefix: str,
                        model_type: str = "bpe", user_defined_symbols: Sequence[str] = (),
                        character_coverage: float = 1.0,
                        byte_fallback: bool = False) -> SentencePieceTokenizer:
  """Trains a SentencePiece model in-process and saves `<out_prefix>.model` (and `.vocab`).

  Ids: pad=0 ("<pad>"), unk=1 ("<unk>"), bos=2 ("<s>"), eos=3 ("</s>"), then "\\n" at 4, then
  `user_defined_symbols` in order, then learned pieces. Digits are always single-digit pieces.
  Whitespace is kept verbatim (no normalisation, no dummy prefix, whitespace-only pieces allowed),
  so `decode(encode(s)) == s` for any `s` built from characters seen in training (with
  `byte_fallback=True`, for any `s`; that reserves 256 byte pieces, so vocab_size must exceed 256
  plus the specials).

  Args:
    texts: training texts; each may span several lines.
    vocab_size: total vocabulary size, specials included.
    out_prefix: path prefix of the saved model; its folder must exist.
    model_type: "bpe", "unigram", "char" or "word".
    user_defined_symbols: extra pieces always kept whole (e.g. "<think>").
    character_coverage: fraction of characters covered; the rest encode to unk.
    byte_fallback: encode unseen characters as UTF-8 byte pieces instead of unk.

  Returns:
    The trained tokenizer, loaded from `<out_prefix>.model`.

  Raises:
    ValueError: on an empty corpus, a non-string text, or a vocab_size the corpus cannot fill
      ("Vocabulary size too high", e.g. a too-uniform corpus) or that is too small for its
      characters.
  """
  symbols = ["\n"] + [s for s in user_defined_symbols if s != "\n"]
  for s in symbols:
    if not isinstance(s, str) or not s:
      raise ValueError(f"user_defined_symbols must be non-empty strings, got {s!r}")
  out_dir = os.path.dirname(os.path.abspath(out_prefix))
  if not os.path.isdir(out_dir):
    raise ValueError(f"out_prefix {out_prefix!r}: folder {out_dir!r} does not exist")
  stats = {"n": 0}

  def sentences() -> Iterator[str]:
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise ValueError(f"training text {i} is a {type(text).__name__}, not a str: {text!r:.80}")
      if text:
        stats["n"] += 1
        yield text

  try:
    spm.SentencePieceTrainer.Train(
        sentence_iterator=sentences(), model_prefix=out_prefix, vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage,
        pad_id=SP_PAD_ID, unk_id=SP_UNK_ID, bos_id=SP_BOS_ID, eos_id=SP_EOS_ID,
        user_defined_symbols=symbols, split_digits=True, byte_fallback=byte_fallback,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        max_sentence_length=_SP_MAX_SENTENCE_BYTES, minloglevel=2)
  except RuntimeError as e:
    msg = str(e)
    if stats["n"] == 0:
      raise errors.BadInput("train_sentencepiece: the training corpus has no non-empty text") from e
    if "Vocabulary size too high" in msg:
      limit = re.search(r"value <= (\d+)", msg)
      hint = f" (at most {limit.group(1)} for this corpus)" if limit else ""
      raise errors.BadInput(
          f"train_sentencepiece: vocab_size={vocab_size} is too high for this corpus "
          f"(SentencePiece: 'Vocabulary size too high'); the corpus is too small or too uniform "
          f"to yield that many pieces: use a smaller vocab_size{hint} or a more varied corpus"
      ) from e
    if "smaller than required_chars" in msg:
      raise ValueError(
          f"train_sentencepiece: vocab_size={vocab_size} is too small for the characters of this "
          f"corpus plus the special pieces; use a larger vocab_size. SentencePiece said: {msg}"
      ) from e
    raise ValueError(f"train_sentencepiece (out_prefix={out_prefix!r}) failed: {msg}") from e
  return SentencePieceTokenizer(out_prefix + ".model")


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json`, read with the `tokenizers` package.

  `path` is the tokenizer.json file or a folder holding it. Special tokens are named, for each of
  bos / eos / pad, by the first of these (in the same folder) that mentions the role:
  tokenizer_config.json and special_tokens_map.json (`"<role>_token"`: a string, an
  `{"content": ...}` dict, or null meaning "none"), then config.json (`"<role>_token_id"`: an id
  or a list whose first id is taken). For Qwen this gives eos "<|im_end|>" (instruct) or
  "<|endoftext|>" (base), pad "<|endoftext|>" and no bos.
  """

  def __init__(self, path: str | os.PathLike[str]):
    path = os.fspath(path)
    if os.path.isdir(path):
      folder, file = path, os.path.join(path, "tokenizer.json")
    else:
      folder, file = os.path.dirname(path), path
    if not os.path.isfile(file):
      raise TokenizerFileError(f"Hugging Face tokenizer file not found: {file!r}")
    self.path = file
    try:
      self._tok = hf_tokenizers.Tokenizer.from_file(file)
    except Exception as e:  # The Rust side raises plain Exception subclasses.
      raise errors.BadInput(f"{file!r} is not a valid Hugging Face tokenizer.json: {e}") from e
    # A tokenizer.json may switch these on; encode must return exactly the tokens of the text.
    self._tok.no_truncation()
    self._tok.no_padding()
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self._size = max(vocab.values()) + 1 if vocab else 0
    configs = [(name, _read_json(os.path.join(folder, name)))
               for name in ("tokenizer_config.json", "special_tokens_map.json", "config.json")]
    self._bos = self._resolve_special("bos", configs)
    self._eos = self._resolve_special("eos", configs)
    pad = self._resolve_special("pad", configs)
    self._pad = pad if pad is not None else self._eos

  def __repr__(self) -> str:
    return f"HFTokenizer({self.path!r})"

  def id_of(self, token: str) -> int:
    token_id = self._tok.token_to_id(token)
    if token_id is None:
      raise ValueError(f"token {token!r} is not in the vocabulary of {self!r}")
    return token_id

  def _encode_texts(self, texts: list[str]) -> list[list[int]]:
    return [enc.ids for enc in self._tok.encode_batch(texts, add_special_tokens=False)]

  def _decode_ids(self, ids: list[int], skip_special: bool) -> str:
    return self._tok.decode(ids, skip_special_tokens=skip_special)

  def _resolve_special(self, role: str, configs: list[tuple[str, dict[str, Any] | None]]
                       ) -> int | None:
    """Id of the bos / eos / pad token named by the first config file that mentions `role`."""
    for name, cfg in configs:
      if cfg is None:
        continue
      key = f"{role}_token_id" if name == "config.json" else f"{role}_token"
      if key not in cfg:
        continue
      value = cfg[key]
      where = f"{key} in {os.path.join(os.path.dirname(self.path), name)!r}"
      if value is None:
        return None
      if name == "config.json":
        if isinstance(value, list) and value:
          value = value[0]
        if not isinstance(value, int) or not 0 <= value < self._size:
          raise errors.BadInput(f"{where} is {cfg[key]!r}, not an id in [0, {self._size})")
        return value
      if isinstance(value, dict):
        value = value.get("content")
      if not isinstance(value, str):
        raise errors.BadInput(f"{where} is {cfg[key]!r}; expected a token string or {{'content': ...}}")
      token_id = self._tok.token_to_id(value)
      if token_id is None:
        raise errors.BadInput(f"{where} names {value!r}, which is not in {self.path!r}")
      return token_id
    return None


def _read_json(path: str) -> dict[str, Any] | None:
  """The JSON object in `path`, or None when the file does not exist."""
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path!r} is not valid JSON: {e}") from e
  if not isinstance(data, dict):
    raise ValueError(f"{path!r} holds a JSON {type(data).__name__}, expected an object")
  return data


def load_tokenizer(kind: str, path: str | os.PathLike[str]) -> Tokenizer:
  """Loads a tokenizer: kind "sentencepiece" (a .model file) or "hf" (tokenizer.json / folder)."""
  if kind == "sentencepiece":
    return SentencePieceTokenizer(path)
  if kind == "hf":
    return HFTokenizer(path)
  raise ValueError(f"unknown tokenizer kind {kind!r}; allowed kinds: {TOKENIZER_KINDS}")


def check_vocab_fits(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """Raises ValueError unless every id of `tokenizer` indexes the model's embedding.

  A model vocabulary larger than the tokenizer's is fine (models pad theirs up, e.g. Qwen2.5's
  151936 embedding rows for 151665 tokenizer ids).
  """
  if isinstance(model_vocab_size, bool) or not isinstance(model_vocab_size, (int, np.integer)):
    raise ValueError(f"model_vocab_size must be an int, got {model_vocab_size!r}")
  if tokenizer.vocab_size > model_vocab_size:
    raise ValueError(
        f"tokenizer vocab_size {tokenizer.vocab_size} ({tokenizer!r}) exceeds the model's "
        f"vocab_size {model_vocab_size}: token ids up to {tokenizer.vocab_size - 1} would index "
        f"past the embedding")
