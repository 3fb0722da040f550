"""A byte-level BPE tokenizer trained on the corpus, saved so transformers can load it.

Byte-level BPE round-trips any text exactly (decode(encode(x)) == x): there is no normaliser,
no added prefix space and no clean-up of spaces, all of which would change source code.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

EOS = "<|endoftext|>"  # the one special token: bos, eos and pad alike, and the file separator


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of ``vocab_size`` tokens on ``texts`` and save it in ``out_dir``."""
    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must exceed the 256 byte tokens + {EOS}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # use_regex splits on the GPT-2 pattern (words, numbers, punctuation, runs of spaces), so
    # merges stay inside such pieces; add_prefix_space=False keeps the text unchanged.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        # All 256 bytes are in the vocabulary even if the corpus lacks some: no unknown tokens.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return save_tokenizer(tok, out_dir)


def save_tokenizer(tok: Tokenizer, out_dir: Path) -> PreTrainedTokenizerFast:
    """Save ``tok`` as tokenizer.json + tokenizer_config.json + special_tokens_map.json."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        clean_up_tokenization_spaces=False,  # would rewrite " ." as "." and break round trips
        add_prefix_space=False,
        model_max_length=1 << 30,  # the models set their own limit in config.json
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    # transformers 5 records its internal class name; the public alias loads in 4.x and 5.x.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    special = out_dir / "special_tokens_map.json"
    if not special.exists():  # newer transformers no longer writes it; older readers want it
        special.write_text(
            json.dumps({"bos_token": EOS, "eos_token": EOS, "pad_token": EOS}, indent=2) + "\n"
        )
    return load_tokenizer(out_dir)


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """Load a saved tokenizer the way users will: through AutoTokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.eos_token != EOS:
        raise ValueError(f"tokenizer in {str(path)!r} has eos {tokenizer.eos_token!r}, not {EOS!r}")
    return tokenizer


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def decode(tokenizer: PreTrainedTokenizerFast, ids: list[int]) -> str:
    """Exact inverse of :func:`encode` (keeps every space)."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
