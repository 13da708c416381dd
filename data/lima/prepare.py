"""
Prepare LIMA (GAIR/lima) for instruction tuning: -> train.bin, train_mask.bin, val.bin, val_mask.bin
(tokens and loss mask; see instruct.py and shards.py).

    huggingface-cli login                                           # LIMA is gated: accept its terms on the Hub first
    python data/lima/prepare.py                                     # download from the Hugging Face Hub
    python data/lima/prepare.py --input lima_train.jsonl            # a local copy (json, jsonl or parquet), offline

1,030 carefully chosen conversations (`conversations` = [human, assistant, human, ...]), written in the
guanaco template ("### Human: ...### Assistant: ..."), so sample.py --template=guanaco serves a model tuned on
either. The loss is on the answers only. LIMA's test split holds questions without answers, so the last 5% of
the training examples (--val_fraction, or --val_examples N) are the validation split.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))  # the repo root, so this runs from any folder

import errors  # noqa: E402

errors.install()  # a UserError (missing file, wrong schema, no network, ...) prints one `error:` line and exits 2

import instruct  # noqa: E402

if __name__ == "__main__":
    instruct.prepare_cli(__doc__, "lima", "GAIR/lima", instruct.lima_turns, out_dir=HERE, template="guanaco", gated=True)
