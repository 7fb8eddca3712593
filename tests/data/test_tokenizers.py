"""Tests for dypo_jax.data.tokenizers: SentencePiece training and round trips, HF tokenizer.json."""
import json
import os
import random

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dypo_jax.data import tokenizers as tk

_WORDS = ("apples", "boxes", "coins", "marbles", "pencils", "books", "cards", "stones", "the",
          "has", "gives", "takes", "buys", "sells", "total", "left", "each", "many", "how",
          "first", "then", "so", "we", "add", "subtract", "multiply", "result", "step", "Tom",
          "Ann", "Maria", "Omar", "friend", "shop", "more", "fewer", "times", "equals")

# Strings that must survive encode -> decode exactly (characters all occur in the corpus).
_ROUND_TRIP = (
    "12 + 7 = 19\nAnswer: 19",
    "  Tom has 305 apples.\n\n\nHow many   left?  ",
    "\n",
    "   ",
    " leading space and trailing newline\n",
    "0123456789 9876543210",
    "",
)


def _corpus(n: int = 300, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  lines = []
  for _ in range(n):
    a, b = rng.randint(0, 999), rng.randint(0, 99)
    op = rng.choice("+-*")
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    name, thing = rng.choice(_WORDS[28:34]), rng.choice(_WORDS[:8])
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 9)))
    spaces = " " * rng.randint(1, 3)
    lines.append(f"{name} has {a} {thing}, {words}.\n{spaces}Step: {a} {op} {b} = {result}\n"
                 f"Answer: {result}\nHow many? (Total, left; each!)")
  return lines


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp("sp") / "tiny")
  return tk.train_sentencepiece(_corpus(), vocab_size=192, out_prefix=prefix)


class TestSentencePiece:

  def test_saved_model_and_reserved_ids(self, sp_tok):
    assert os.path.isfile(sp_tok.path) and sp_tok.path.endswith("tiny.model")
    assert sp_tok.vocab_size == 192
    assert (sp_tok.pad_id, sp_tok.bos_id, sp_tok.eos_id) == (
        tk.SP_PAD_ID, tk.SP_BOS_ID, tk.SP_EOS_ID) == (0, 2, 3)
    assert sp_tok.id_of("<unk>") == tk.SP_UNK_ID == 1
    assert sp_tok.id_of("\n") == 4
    assert sp_tok.id_of("<s>") == 2 and sp_tok.id_of("</s>") == 3

  @pytest.mark.parametrize("text", _ROUND_TRIP)
  def test_round_trip_is_identity(self, sp_tok, text):
    ids = sp_tok.encode(text)
    assert all(0 <= i < sp_tok.vocab_size for i in ids)
    assert sp_tok.decode(ids) == text
    assert sp_tok.decode(np.asarray(ids, np.int32)) == text

  def test_digits_are_single_pieces(self, sp_tok):
    # Every piece holding a digit is that digit alone (no "19", no "▁1"): number tokens are
    # the same wherever the number stands.
    pieces = [sp_tok.decode([i], skip_special=False) for i in range(sp_tok.vocab_size)]
    assert sorted(p for p in pieces if any(c.isdigit() for c in p)) == list("0123456789")
    ids = sp_tok.encode("305 + 1999")
    assert [sp_tok.decode([i]) for i in ids if sp_tok.decode([i]).isdigit()] == list("3051999")

  def test_newline_is_its_own_piece(self, sp_tok):
    ids = sp_tok.encode("19\n\nAnswer")
    assert ids.count(sp_tok.id_of("\n")) == 2

  def test_bos_eos_and_special_decoding(self, sp_tok):
    ids = sp_tok.encode("1 + 2 = 3", add_bos=True, add_eos=True)
    assert ids[0] == 2 and ids[-1] == 3 and 2 not in ids[1:-1] and 3 not in ids[1:-1]
    assert sp_tok.decode(ids) == "1 + 2 = 3"
    assert sp_tok.decode(ids, skip_special=False) == "<s>1 + 2 = 3</s>"
    # decode does not cut at eos: what follows it is still decoded.
    tail = ids + sp_tok.encode(" more") + [sp_tok.pad_id]
    assert sp_tok.decode(tail) == "1 + 2 = 3 more"
    assert sp_tok.decode(tail, skip_special=False) == "<s>1 + 2 = 3</s> more<pad>"

  def test_encode_batch_matches_encode(self, sp_tok):
    texts = list(_ROUND_TRIP)
    batch = sp_tok.encode_batch(texts, add_eos=True)
    assert batch == [sp_tok.encode(t, add_eos=True) for t in texts]
    with pytest.raises(ValueError, match="one string"):
      sp_tok.encode_batch("abc")
    with pytest.raises(ValueError, match="text 1 .*int"):
      sp_tok.encode_batch(["a", 3])

  def test_reload_gives_same_ids(self, sp_tok):
    again = tk.load_tokenizer("sentencepiece", sp_tok.path)
    assert isinstance(again, tk.SentencePieceTokenizer)
    for text in _ROUND_TRIP + tuple(_corpus(20, seed=1)):
      assert again.encode(text) == sp_tok.encode(text)
    assert again.vocab_size == sp_tok.vocab_size

  def test_unknown_character_and_piece(self, sp_tok):
    # "Q" never occurs in the corpus: it becomes unk (lossy), and the message names the piece.
    assert sp_tok.encode("Q") == [tk.SP_UNK_ID]
    with pytest.raises(ValueError, match="'Qx'"):
      sp_tok.id_of("Qx")

  def test_decode_rejects_bad_ids(self, sp_tok):
    with pytest.raises(ValueError, match="id 192 at position 1"):
      sp_tok.decode([5, 192])
    with pytest.raises(ValueError, match="id -1"):
      sp_tok.decode(np.array([-1]))
    with pytest.raises(ValueError, match="1-D"):
      sp_tok.decode(np.zeros((2, 2), np.int32))
    assert sp_tok.decode([]) == ""

  def test_user_defined_symbols_stay_whole(self, tmp_path):
    corpus = [f"<think>{line}</think>" for line in _corpus(100)]
    tok = tk.train_sentencepiece(corpus, vocab_size=128, out_prefix=str(tmp_path / "u"),
                                 user_defined_symbols=("<think>", "</think>"))
    assert (tok.id_of("<think>"), tok.id_of("</think>")) == (5, 6)
    ids = tok.encode("<think>1 + 1 = 2\n</think>")
    assert ids[0] == 5 and ids[-1] == 6 and ids[-2] == 4
    assert tok.decode(ids) == "<think>1 + 1 = 2\n</think>"

  def test_byte_fallback_round_trips_unseen_characters(self, tmp_path):
    tok = tk.train_sentencepiece(_corpus(100), vocab_size=320, out_prefix=str(tmp_path / "b"),
                                 byte_fallback=True)
    text = "Qé → ∑ 12\n"
    assert tk.SP_UNK_ID not in tok.encode(text)
    assert tok.decode(tok.encode(text)) == text

  def test_too_uniform_corpus_gives_clear_error(self, tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=4000 is too high.*smaller vocab_size"):
      tk.train_sentencepiece(["1 + 1 = 2"] * 50, vocab_size=4000, out_prefix=str(tmp_path / "x"))

  def test_too_small_vocab_and_empty_corpus(self, tmp_path):
    with pytest.raises(ValueError, match="vocab_size=10 is too small"):
      tk.train_sentencepiece(_corpus(20), vocab_size=10, out_prefix=str(tmp_path / "s"))
    with pytest.raises(ValueError, match="no non-empty text"):
      tk.train_sentencepiece(["", ""], vocab_size=64, out_prefix=str(tmp_path / "e"))
    with pytest.raises(ValueError, match="training text 1 is a int"):
      tk.train_sentencepiece(["ab", 7], vocab_size=64, out_prefix=str(tmp_path / "i"))
    with pytest.raises(ValueError, match="does not exist"):
      tk.train_sentencepiece(["ab"], vocab_size=64, out_prefix=str(tmp_path / "no" / "p"))

  def test_missing_or_bad_model_file(self, tmp_path):
    missing = str(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match="missing.model"):
      tk.SentencePieceTokenizer(missing)
    with pytest.raises(ValueError, match="missing.model"):
      tk.load_tokenizer("sentencepiece", missing)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model.*not a SentencePiece model"):
      tk.SentencePieceTokenizer(str(junk))


_HF_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _build_hf_dir(folder, tokenizer_config=None, **extra_files):
  """Trains a tiny byte-level BPE (Qwen-style) and saves tokenizer.json (+ config files)."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=400, special_tokens=list(_HF_SPECIALS), show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_corpus(200), trainer=trainer)
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(folder, "tokenizer.json"))
  if tokenizer_config is not None:
    extra_files["tokenizer_config.json"] = tokenizer_config
  for name, content in extra_files.items():
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
      json.dump(content, f)
  return folder


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("hf") / "qwenish")
  # As Qwen2.5-Math-Instruct ships it: eos <|im_end|>, pad <|endoftext|>, bos null.
  return _build_hf_dir(folder, {"bos_token": None, "eos_token": "<|im_end|>",
                                "pad_token": "<|endoftext|>", "model_max_length": 4096})


class TestHF:

  def test_special_ids_from_tokenizer_config(self, hf_dir):
    tok = tk.load_tokenizer("hf", hf_dir)
    assert isinstance(tok, tk.HFTokenizer)
    # BpeTrainer puts the special tokens first, in order.
    assert [tok.id_of(s) for s in _HF_SPECIALS] == [0, 1, 2]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 2, 0)
    assert tok.vocab_size == 400
    with pytest.raises(ValueError, match="no bos token"):
      tok.encode("1", add_bos=True)

  @pytest.mark.parametrize("text", _ROUND_TRIP + ("Qé → ∑ 12\n\t tabs",))
  def test_round_trip_is_identity(self, hf_dir, text):
    tok = tk.HFTokenizer(os.path.join(hf_dir, "tokenizer.json"))  # The file path works too.
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids)) == text

  def test_special_tokens_in_text_and_decoding(self, hf_dir):
    tok = tk.HFTokenizer(hf_dir)
    text = "<|im_start|>user\n2 + 2<|im_end|>\n"
    ids = tok.encode(text, add_eos=True)
    assert ids[0] == 1 and ids.count(2) == 2 and ids[-1] == 2
    assert tok.decode(ids, skip_special=False) == text + "<|im_end|>"
    assert tok.decode(ids) == "user\n2 + 2\n"
    assert tok.decode(ids + tok.encode(" after")) == "user\n2 + 2\n after"  # No cut at eos.
    with pytest.raises(ValueError, match="'<|nope|>'"):
      tok.id_of("<|nope|>")

  def test_matches_transformers(self, hf_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(hf_dir, "tokenizer.json"))
    tok = tk.HFTokenizer(hf_dir)
    texts = list(_ROUND_TRIP) + _corpus(10, seed=3) + ["<|im_start|>system\nhi<|im_end|>"]
    for text in texts:
      assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
    assert tok.encode_batch(texts) == [ref.encode(t, add_special_tokens=False) for t in texts]

  def test_special_tokens_map_and_config_json_fallbacks(self, tmp_path):
    folder = _build_hf_dir(
        str(tmp_path / "base"),
        **{"special_tokens_map.json": {"eos_token": {"content": "<|endoftext|>"}},
           "config.json": {"bos_token_id": 1, "eos_token_id": [2, 0]}})
    tok = tk.HFTokenizer(folder)
    # eos from special_tokens_map.json wins over config.json; bos only in config.json; no pad
    # anywhere, so pad falls back to eos.
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 0, 0)

  def test_no_config_files(self, tmp_path):
    tok = tk.HFTokenizer(_build_hf_dir(str(tmp_path / "bare")))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, None, None)
    with pytest.raises(ValueError, match="no eos token"):
      tok.encode_batch(["1"], add_eos=True)

  def test_config_errors_name_the_file(self, tmp_path):
    folder = _build_hf_dir(str(tmp_path / "bad"), {"eos_token": "<|missing|>"})
    with pytest.raises(ValueError, match=r"eos_token in .*tokenizer_config.json.*'<\|missing\|>'"):
      tk.HFTokenizer(folder)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
      f.write("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json.*not valid JSON"):
      tk.HFTokenizer(folder)
    folder2 = _build_hf_dir(str(tmp_path / "bad2"), **{"config.json": {"eos_token_id": 99999}})
    with pytest.raises(ValueError, match=r"eos_token_id in .*config.json.*99999"):
      tk.HFTokenizer(folder2)

  def test_missing_or_bad_file(self, tmp_path):
    with pytest.raises(tk.TokenizerFileError, match=r"nowhere.*tokenizer.json"):
      tk.HFTokenizer(str(tmp_path / "nowhere" / "tokenizer.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty.*tokenizer.json"):
      tk.load_tokenizer("hf", str(tmp_path / "empty"))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a valid Hugging Face tokenizer.json"):
      tk.HFTokenizer(str(bad))


def test_load_tokenizer_unknown_kind():
  with pytest.raises(ValueError, match=r"'tiktoken'.*\('sentencepiece', 'hf'\)"):
    tk.load_tokenizer("tiktoken", "x")


def test_check_vocab_fits(sp_tok):
  tk.check_vocab_fits(sp_tok, 192)
  tk.check_vocab_fits(sp_tok, 256)  # Models pad their vocab up: fine.
  with pytest.raises(ValueError, match=r"vocab_size 192 .* model's vocab_size 128"):
    tk.check_vocab_fits(sp_tok, 128)
  with pytest.raises(ValueError, match="must be an int"):
    tk.check_vocab_fits(sp_tok, 128.0)
