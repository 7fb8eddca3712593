"""Shared, fully local toy tokenizer + prompt set for the peer baselines.

Used by both tunix_grpo_tiny.py and trl_grpo_tiny.py so that both peers see the
same vocabulary, the same prompts (same token counts) and the same reward; the
project's own W1 benchmarks (benchmarks/w1.py, benchmarks/w1_step.py) import it
from here too (benchmarks/peers/tiny_tok.py), so all contenders share the token ids.

* Word-level vocabulary trained in-process with HF `tokenizers`
  (WordLevelTrainer over a synthetic corpus): no hub download.
* Wrapped in `transformers.PreTrainedTokenizerFast` with <pad>=0, <s>=1, </s>=2.
* Every prompt is exactly PROMPT_WORDS words == PROMPT_WORDS tokens, so the
  tokenized prompt length is deterministic (Tunix prepends BOS -> +1 token).
"""
import random

N_WORDS = 509            # + 3 special tokens = 512 vocab
SPECIALS = ["<pad>", "<s>", "</s>"]
WORDS = [f"w{i:03d}" for i in range(N_WORDS)]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(
        vocab_size=N_WORDS + len(SPECIALS), special_tokens=SPECIALS, min_frequency=1
    )
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(64)) for _ in range(400)]
    corpus.append(" ".join(WORDS))  # make sure every word is seen
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<pad>",
    )
    assert hf.pad_token_id == 0 and hf.bos_token_id == 1 and hf.eos_token_id == 2, (
        hf.pad_token_id, hf.bos_token_id, hf.eos_token_id)
    assert len(hf) == N_WORDS + len(SPECIALS), len(hf)
    return hf


def make_prompts(n, prompt_words, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(prompt_words)) for _ in range(n)]


def toy_reward(prompts, completions, **kwargs):
    """Fraction of completion words whose id is even (+ small length bonus)."""
    out = []
    for c in completions:
        if isinstance(c, list):  # TRL conversational format (not used here)
            c = c[-1]["content"] if c else ""
        ws = c.split()
        good = sum(1 for w in ws if len(w) == 4 and w[0] == "w" and w[1:].isdigit()
                   and int(w[1:]) % 2 == 0)
        out.append(good / max(len(ws), 1) + 0.01 * min(len(ws), 32) / 32)
    return out
