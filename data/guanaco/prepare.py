"""
Prepare Guanaco (timdettmers/openassistant-guanaco) for instruction tuning: -> train.bin, train_mask.bin,
val.bin, val_mask.bin (tokens and loss mask; see instruct.py and shards.py).

    python data/guanaco/prepare.py                                  # download from the Hugging Face Hub
    python data/guanaco/prepare.py --input guanaco.jsonl            # a local copy (json, jsonl or parquet), offline
    python data/guanaco/prepare.py --max_length 512 --out_dir data/guanaco-512

The highest-rated conversation paths of OpenAssistant (9,846 train, 518 test records), each one field
`text` = "### Human: ...### Assistant: ...### Human: ...". The loss is on the assistant's answers only.
The Hub's test split is the validation split; with --input (or --val_examples / --val_fraction) the last
examples of the file are held out instead. Sample from a tuned model with sample.py --template=guanaco.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))  # the repo root, so this runs from any folder

import errors  # noqa: E402

errors.install()  # a UserError (missing file, wrong schema, no network, ...) prints one `error:` line and exits 2

import instruct  # noqa: E402

if __name__ == "__main__":
    instruct.prepare_cli(__doc__, "guanaco", "timdettmers/openassistant-guanaco", instruct.guanaco_turns,
                         out_dir=HERE, template="guanaco")
