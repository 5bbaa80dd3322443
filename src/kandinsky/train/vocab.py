"""Tokenizers trained on the caption corpus with the ``tokenizers`` library.

* CLIP (prior side): byte-level BPE with CLIP's normaliser, pre-tokeniser and ``</w>`` word ends, saved as a
  transformers ``CLIPTokenizer`` (vocab: 256 bytes, 256 bytes + ``</w>``, the learned merges, then the
  ``<|startoftext|>`` / ``<|endoftext|>`` specials, as OpenAI's vocabulary is laid out).
* M-CLIP (decoder side): a unigram (sentencepiece-style) model, saved as a transformers ``XLMRobertaTokenizer``
  with XLM-R's special ids: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>`` last.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

CLIP_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
                r"[^\s\p{L}\p{N}]+")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
XLMR_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE, in byte order (GPT-2 / CLIP ``bytes_to_unicode``)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    codes, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + extra)
            extra += 1
    table = dict(zip(keep, codes, strict=True))
    return [chr(table[b]) for b in range(256)]


def train_clip_tokenizer(corpus: list[str], vocab_size: int, max_length: int, folder: Path) -> Any:
    """Train the CLIP BPE on ``corpus`` and save a ``CLIPTokenizer`` to ``folder``; returns it."""
    from transformers import CLIPTokenizer

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    alphabet = _byte_alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=alphabet, end_of_word_suffix="</w>")
    tok.train_from_iterator(corpus, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, list) else m.split(" ") for m in merges]
    vocab: dict[str, int] = {}
    for piece in alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]:
        vocab.setdefault(piece, len(vocab))
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text(
            "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
        clip_tok = CLIPTokenizer(vocab=str(Path(tmp) / "vocab.json"), merges=str(Path(tmp) / "merges.txt"),
                                 model_max_length=max_length)
    clip_tok.save_pretrained(str(folder))
    return CLIPTokenizer.from_pretrained(str(folder))


def train_mclip_tokenizer(corpus: list[str], vocab_size: int, folder: Path) -> Any:
    """Train the sentencepiece-style unigram model on ``corpus`` and save an ``XLMRobertaTokenizer``.

    The pieces are learned by BPE merges over Metaspace words and scored by their log frequency in the
    BPE-tokenised corpus (``tokenizers``' UnigramTrainer degenerates to single characters on a corpus this
    repetitive); every character of the corpus is kept as a fallback piece. Returns the saved tokenizer.
    """
    from transformers import XLMRobertaTokenizer

    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " ")])
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.normalizer = normalizer
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"],
                                                        show_progress=False))
    counts = Counter(t for enc in bpe.encode_batch(corpus) for t in enc.tokens if t != "<unk>")
    total = sum(counts.values())
    scores = {piece: math.log(c / total) for piece, c in counts.items()}
    floor = min(scores.values(), default=0.0) - 1.0
    for ch in sorted({ch for text in corpus for ch in normalizer.normalize_str(text).replace(" ", "▁")} | {"▁"}):
        scores.setdefault(ch, floor)
    pieces = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    vocab = [(s, 0.0) for s in XLMR_SPECIALS] + pieces + [("<mask>", 0.0)]
    xlmr = XLMRobertaTokenizer(vocab=vocab, model_max_length=77)
    xlmr.save_pretrained(str(folder))
    return XLMRobertaTokenizer.from_pretrained(str(folder))


def load_clip_tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


def load_mclip_tokenizer(folder: Path) -> Any:
    from transformers import XLMRobertaTokenizer

    return XLMRobertaTokenizer.from_pretrained(str(folder))
