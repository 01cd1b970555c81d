"""Write lmtrain/data/gpt2/tokenizer.json.gz, GPT-2's byte-level BPE for `tokenizer=gpt2`, from OpenAI's ranks.

    pip download --no-deps --no-binary :all: openai-whisper==20250625   # a source archive, 0.8 MB
    tar xzf openai_whisper-20250625.tar.gz
    python scripts/convert_gpt2_tokenizer.py openai_whisper-20250625/whisper/assets/gpt2.tiktoken

The source: `gpt2.tiktoken` as OpenAI ships it in openai-whisper (MIT, Copyright (c) 2022 OpenAI): one line per
token, its bytes in base64 and its rank, which is GPT-2's token id (encoder.json's, from openai/gpt-2, MIT). The
script checks the file's SHA-256 first, so the shipped tokenizer can be rebuilt byte for byte.

The conversion is the usual one. Token ids are the ranks. A token's text is its bytes through GPT-2's byte-to-
character table (every byte a printable character). A token of several bytes was made by exactly one merge, and
its rank is that merge's place in the merge list: running BPE on its bytes with only the merges of lower rank
leaves the two parts that merge. `<|endoftext|>` is id 50,256. The pipeline is GPT-2's, as transformers'
GPT2TokenizerFast builds it: GPT-2's split pattern and byte-to-character step (ByteLevel, no prefix space), BPE,
and the ByteLevel decoder.

With `--check-tiktoken`, the result is compared, id for id, with tiktoken's own GPT-2 encoder built from the same
file (needs `pip install tiktoken`): an implementation that shares no code with this one.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import io
import sys
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "lmtrain" / "data" / "gpt2" / "tokenizer.json.gz"
SOURCE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # whisper 20250625's gpt2.tiktoken
END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256
# GPT-2's split pattern, as in openai/gpt-2's encoder.py (tiktoken's "gpt2" encoding uses the same)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_characters() -> dict[int, str]:
    """GPT-2's table from bytes to printable characters: printable Latin-1 bytes stand for themselves, the others
    (controls, space, ...) take the characters from U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # "!".."~", "¡".."¬", "®".."ÿ"
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_ranks(path: Path) -> dict[bytes, int]:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SOURCE_SHA256:
        sys.exit(f"{path}: SHA-256 {digest}, expected {SOURCE_SHA256} (openai-whisper 20250625's gpt2.tiktoken)")
    ranks = {}
    for line in data.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts whose merge made `token`: BPE on its bytes, with only the merges ranked below it."""
    limit, parts = ranks[token], [bytes([b]) for b in token]
    while True:
        pairs = [(ranks.get(a + b), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
        candidates = [(rank, i) for rank, i in pairs if rank is not None and rank < limit]
        if not candidates:
            break
        _, i = min(candidates)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {limit}) is not one merge of lower-ranked tokens: {parts}")
    return parts[0], parts[1]


def build(ranks: dict[bytes, int]) -> Tokenizer:
    chars = byte_characters()
    text = lambda b: "".join(chars[x] for x in b)
    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [merge_of(token, ranks) for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(token) > 1]
    vocab[END_OF_TEXT] = END_OF_TEXT_ID
    if sorted(vocab.values()) != list(range(END_OF_TEXT_ID + 1)):
        raise ValueError("the ranks are not the ids 0..50255")
    bpe = models.BPE(vocab=vocab, merges=[(text(a), text(b)) for a, b in merges], dropout=None,
                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(END_OF_TEXT, special=True)])
    return tokenizer


SAMPLES = ["Hello world", " Hello world", "The quick brown fox jumps over the lazy dog.", "  two  spaces\n\n\ttab",
           "def f(x):\n    return x ** 2  # square\n", "naïve café, Straße, Ελληνικά, 日本語のテキスト, 한국어",
           "emoji 🎉🚀 and a family 👨‍👩‍👧", f"one document{END_OF_TEXT}the next", "it's they're we've I'm you'll he'd",
           "numbers 123456 3.14159 1e-9", "\u0000\u0001 control bytes \x7f", "   \n   ", ""]


def check_with_tiktoken(tokenizer: Tokenizer, ranks: dict[bytes, int]) -> None:
    import tiktoken

    reference = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                  special_tokens={END_OF_TEXT: END_OF_TEXT_ID})
    corpus = SAMPLES + [Path(__file__).read_text(encoding="utf-8"), (ROOT / "README.md").read_text(encoding="utf-8")]
    for text in corpus:
        ours = tokenizer.encode(text, add_special_tokens=False).ids
        theirs = reference.encode(text, allowed_special="all")
        if ours != theirs:
            sys.exit(f"differs from tiktoken on {text[:60]!r}: {ours[:20]} vs {theirs[:20]}")
    print(f"same ids as tiktoken's GPT-2 encoder on {len(corpus)} texts "
          f"({sum(len(t) for t in corpus):,} characters)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="gpt2.tiktoken from openai-whisper 20250625")
    parser.add_argument("--check-tiktoken", action="store_true", help="compare with tiktoken's encoder")
    args = parser.parse_args()
    ranks = read_ranks(args.source)
    tokenizer = build(ranks)
    if args.check_tiktoken:
        check_with_tiktoken(tokenizer, ranks)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as f:  # mtime 0: reproducible bytes
        f.write(tokenizer.to_str().encode("utf-8"))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(buffer.getvalue())
    print(f"wrote {OUT.relative_to(ROOT)}: {tokenizer.get_vocab_size():,} tokens, "
          f"{len(buffer.getvalue()):,} bytes, SHA-256 {hashlib.sha256(buffer.getvalue()).hexdigest()}")


if __name__ == "__main__":
    main()
