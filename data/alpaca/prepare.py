"""
Prepare Alpaca (tatsu-lab/alpaca) for instruction tuning: -> train.bin, train_mask.bin, val.bin, val_mask.bin
(tokens and loss mask; see instruct.py and shards.py).

    python data/alpaca/prepare.py                                   # download from the Hugging Face Hub
    python data/alpaca/prepare.py --input alpaca_data.json          # a local copy (json, jsonl or parquet), offline
    python data/alpaca/prepare.py --val_examples 2000 --max_length 512

Stanford Alpaca's 52,002 instruction / input / output records, in the Stanford prompt ("Below is an
instruction that describes a task ... ### Response:"). The loss is on the output only. Alpaca has no test
split: the last 5% of the examples (--val_fraction, or --val_examples N) are the validation split.
Sample from a tuned model with sample.py --template=alpaca.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))  # the repo root, so this runs from any folder

import errors  # noqa: E402

errors.install()  # a UserError (missing file, wrong schema, no network, ...) prints one `error:` line and exits 2

import instruct  # noqa: E402

if __name__ == "__main__":
    instruct.prepare_cli(__doc__, "alpaca", "tatsu-lab/alpaca", instruct.alpaca_turns, out_dir=HERE, template="alpaca")
