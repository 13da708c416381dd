"""
Prepare Shakespeare for training: text -> GPT-2 tokens -> train.bin / val.bin (see shards.py for the format).

    python data/shakespeare/prepare.py                     # tiny-shakespeare (downloads ~1 MB), else the bundled plays
    python data/shakespeare/prepare.py --offline           # the bundled plays (data/shakespeare/texts/, 8 plays)
    python data/shakespeare/prepare.py --input my.txt --out_dir data/mine   # any UTF-8 text file

Online, this is Karpathy's tiny-shakespeare (40,000 lines from several plays, as in nanoGPT). Offline (no
network, or --offline) it falls back to eight complete plays bundled in texts/, always the same files in the
same order, so offline runs are reproducible. The last 10% of the text is the validation split.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))  # the repo root, so this runs from any folder

import errors  # noqa: E402

errors.install()  # a UserError (missing file, non-UTF-8 text, ...) prints one `error:` line and exits 2

import shards  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"

if __name__ == "__main__":
    shards.prepare_cli(__doc__, texts_dir=os.path.join(HERE, "texts"), out_dir=HERE, url=URL)
