"""
Prepare Milton for training: text -> GPT-2 tokens -> train.bin / val.bin (see shards.py for the format).

    python data/milton/prepare.py                          # the six bundled works (data/milton/texts/)
    python data/milton/prepare.py --input my.txt --out_dir data/mine   # any UTF-8 text file

The corpus (about 1.1 MB: Paradise Lost, Paradise Regained, Comus, Areopagitica, the shorter poems and the
Latin poems in Cowper's translation) ships with the repo, so nothing is downloaded. The files are read in
sorted order and joined with <|endoftext|>; the last 10% of the text is the validation split. This is the
corpus the small bundled base model is pretrained on (a second domain for fine-tuning on Shakespeare).
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))  # the repo root, so this runs from any folder

import errors  # noqa: E402

errors.install()  # a UserError (missing file, non-UTF-8 text, ...) prints one `error:` line and exits 2

import shards  # noqa: E402

if __name__ == "__main__":
    shards.prepare_cli(__doc__, texts_dir=os.path.join(HERE, "texts"), out_dir=HERE)
