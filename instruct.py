r"""
Instruction tuning data: prompt templates, the Guanaco / Alpaca / LIMA record formats, and the loss mask.

An instruction example is one or more turns, each a (prompt, response) pair of texts. We train on all of its
tokens but compute the loss only on the response tokens: the model should learn to answer, not to write
questions. Next to the usual token shard, preparation therefore writes a loss-mask shard of the same length
(see shards.py for the format):

    {split}.bin        uint16 token ids, examples back to back, each ending with <|endoftext|> (EOT)
    {split}_mask.bin   uint8, 1 = compute the loss on this token, 0 = prompt (no loss)

A two-turn guanaco example, as the text of its tokens:

    ### Human: Hi### Assistant:   Hello!   ### Human: And 2+2?### Assistant:   4   <|endoftext|>
    \____ prompt: mask 0 _____/   \_ 1 _/   \_________ prompt: mask 0 ________/   1         1

The EOT that ends an example has mask 1, so the model learns to stop after its answer. Every example starts
at position 0 or right after an EOT, which train.py uses to start its windows at example starts.

Templates (TEMPLATES, format_prompt):

    guanaco   "### Human: {instruction}### Assistant:"   the answer follows as " ..." (leading space), and the
              next turn starts with "### Human:" right after it. Used for timdettmers/openassistant-guanaco
              (where every record is already in this form) and for GAIR/lima, so that one template
              (sample.py --template=guanaco) serves models tuned on either.
    alpaca    the Stanford Alpaca prompt (tatsu-lab/alpaca), with or without an "### Input:" section.

Long examples. With max_length = N (1024 by default, GPT-2's context):
  - an example of at most N tokens (its final EOT included) is kept whole;
  - a longer one is cut to its first N-1 tokens plus an EOT whose mask is 0: the EOT still separates it from
    the next example, but the model is not taught to stop in the middle of an answer;
  - an example with no response token left after the cut (its first prompt alone is N-1 tokens or more) is
    dropped: there would be nothing to learn from it.
The preparation prints how many examples were cut and dropped.
"""

import os
import sys

import numpy as np
from tqdm import tqdm

import shards
import tokenizer
from errors import UserError

# -----------------------------------------------------------------------------
# prompt templates

# Stanford Alpaca's PROMPT_DICT (github.com/tatsu-lab/stanford_alpaca, train.py), verbatim.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
HUMAN, ASSISTANT = "### Human:", "### Assistant:"

# name -> template. prompt_input is used when the example has an input (None: the template has no input
# section); stop lists where an answer ends when the model goes on instead of emitting EOT.
TEMPLATES = {
    "guanaco": {
        "prompt_input": None,
        "prompt_no_input": HUMAN + " {instruction}" + ASSISTANT,
        "stop": [HUMAN, ASSISTANT],
    },
    "alpaca": {
        "prompt_input": ALPACA_PROMPT_INPUT,
        "prompt_no_input": ALPACA_PROMPT_NO_INPUT,
        "stop": ["### Instruction:", "### Input:", "### Response:", "Below is an instruction that describes a task"],
    },
}


def _template(name):
    if name not in TEMPLATES:
        raise UserError(f"unknown prompt template {name!r}; known templates: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def format_prompt(template, instruction, input=""):
    """The text the model sees before its answer, e.g. format_prompt("guanaco", "Hi") = "### Human: Hi### Assistant:".
    Training encodes exactly this text as the prompt, so a model answers best when sampled from it."""
    t = _template(template)
    if input:
        if t["prompt_input"] is None:
            raise UserError(f"the {template} template has no input section; put the input into the instruction")
        return t["prompt_input"].format(instruction=instruction, input=input)
    return t["prompt_no_input"].format(instruction=instruction)


def stop_strings(template):
    """Strings that end an answer in `template` when the model goes on instead of emitting EOT."""
    return list(_template(template)["stop"])


def cut_at_stop(template, text):
    """`text` (a generated answer) up to the first of the template's stop strings, if it contains one."""
    cut = min([i for i in (text.find(s) for s in stop_strings(template)) if i >= 0], default=len(text))
    return text[:cut]


# -----------------------------------------------------------------------------
# tokens and loss mask

def _count(n, noun):
    """_count(1, "example") = "1 example", _count(2000, "example") = "2,000 examples"."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def encode_example(turns):
    """turns = [(prompt1, response1), (prompt2, response2), ...] -> (ids, mask), two lists of equal length.

        ids  = encode(prompt1) + encode(response1) + encode(prompt2) + ... + [EOT]
        mask =     0 ... 0     +     1 ... 1       +     0 ... 0     + ... + [1]

    Prompt and response are encoded separately, as at inference: sample.py encodes the formatted prompt
    alone and the model continues from its last token, so training must show the very same prompt tokens.
    Encoded as one text, a token could span the boundary ("### Assistant: " + "Red" is ":", " Red" as one
    text but ":", " ", "Red" apart) and the model would learn continuations it never meets when sampling;
    this is also why the guanaco prompt ends at "### Assistant:" and its answers start with a space.
    So ids may differ from encode(full text), but decode(ids) is exactly the
    concatenated text followed by "<|endoftext|>"."""
    if not turns:
        raise ValueError("encode_example needs at least one (prompt, response) turn")
    ids, mask = [], []
    for prompt, response in turns:
        p, r = tokenizer.encode(prompt), tokenizer.encode(response)
        ids += p + r
        mask += [0] * len(p) + [1] * len(r)
    ids.append(tokenizer.EOT)
    mask.append(1)  # learn to stop after the last answer
    return ids, mask


def encode_examples(examples, max_length=1024, split="train"):
    """Encode `examples` (a list of turn lists) back to back, cutting or dropping the long ones (see the
    module docstring). Returns (ids, mask, stats): uint16 and uint8 arrays and a dict of counts."""
    if max_length < 2:
        raise UserError(f"--max_length={max_length} is too small; give at least 2 (one token and the EOT)")
    ids_parts, mask_parts = [], []
    cut = dropped = 0
    for turns in tqdm(examples, desc=f"tokenizing {split}", unit="ex", disable=len(examples) < 5000):
        ids, mask = encode_example(turns)
        if len(ids) > max_length:
            ids = ids[:max_length - 1] + [tokenizer.EOT]
            mask = mask[:max_length - 1] + [0]  # a separator, not an end of answer to learn
            if not any(mask):  # the first prompt alone fills the window: no response token left
                dropped += 1
                continue
            cut += 1
        ids_parts.append(np.array(ids, dtype=np.uint16))
        mask_parts.append(np.array(mask, dtype=np.uint8))
    if not ids_parts:
        if dropped:
            raise UserError(f"no usable {split} example: all {dropped} have a first prompt of {max_length - 1}+ "
                            f"tokens; raise --max_length")
        raise UserError(f"no {split} examples to prepare")
    ids, mask = np.concatenate(ids_parts), np.concatenate(mask_parts)
    stats = {"examples": len(ids_parts), "tokens": len(ids), "response_tokens": int(mask.sum()),
             "cut": cut, "dropped": dropped, "max_length": max_length}
    return ids, mask, stats


def write_examples(out_dir, split, ids, mask, stats):
    """Write out_dir/{split}.bin and out_dir/{split}_mask.bin and print the counts."""
    shards.write_shard(os.path.join(out_dir, f"{split}.bin"), ids, kind="tokens")
    shards.write_shard(os.path.join(out_dir, f"{split}_mask.bin"), mask, kind="mask")
    print_counts(split, stats)


def print_counts(split, stats):
    print(f"{split}: {_count(stats['examples'], 'example')}, {stats['tokens']:,} tokens, "
          f"{stats['response_tokens'] / stats['tokens']:.1%} of them response tokens (trained on)")
    print(f"{split}: {stats['cut']:,} cut to --max_length={stats['max_length']}, "
          f"{stats['dropped']:,} dropped (first prompt too long)")
    sys.stdout.flush()


TEMPLATE_FILE = "template.txt"  # next to the shards: the prompt template the examples were written in


def read_template(data_dir):
    """The prompt template of a prepared data folder, or None (plain text, or prepared by hand)."""
    path = os.path.join(data_dir, TEMPLATE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def prepare_examples(examples, out_dir, split, max_length=1024):
    """Encode `examples` and write out_dir/{split}.bin and out_dir/{split}_mask.bin. Prints and returns the
    counts: examples, tokens, response_tokens, cut, dropped (and max_length)."""
    ids, mask, stats = encode_examples(examples, max_length, split)
    write_examples(out_dir, split, ids, mask, stats)
    return stats


# -----------------------------------------------------------------------------
# record parsers: one Hub record -> a list of (prompt, response) turns ([] = no answered turn: skip it)

GUANACO_SCHEMA = f"timdettmers/openassistant-guanaco's schema: text = '{HUMAN} ...{ASSISTANT} ...'"
ALPACA_SCHEMA = "tatsu-lab/alpaca's schema: instruction, input, output"
LIMA_SCHEMA = "GAIR/lima's schema: conversations = [human, assistant, human, ...] (strings)"


def _field(record, name, kind, where, schema, optional=False):
    """record[name], checked to be of type `kind`; a missing or mistyped field is one clear UserError."""
    if name not in record or (optional and record[name] is None):
        if optional:
            return kind()
        fields = ", ".join(record) or "none"
        raise UserError(f"{where} has no field '{name}' (fields: {fields}); expected {schema}")
    value = record[name]
    if not isinstance(value, kind):
        expected = {"str": "string"}.get(kind.__name__, kind.__name__)
        raise UserError(f"{where} field '{name}' is a {type(value).__name__}, expected a {expected}; "
                        f"expected {schema}")
    return value


def guanaco_turns(record, where="record"):
    """timdettmers/openassistant-guanaco: {"text": "### Human: ...### Assistant: ...### Human: ..."}.

    The text is cut after each "### Assistant:", and each answer runs to the next "### Human:", so the
    turns put back together are exactly the record's text (whatever whitespace it has between turns).
    A final "### Human:" turn without an answer is dropped."""
    text = _field(record, "text", str, where, GUANACO_SCHEMA)
    text = text.lstrip()
    if ASSISTANT not in text:
        raise UserError(f"{where} field 'text' has no '{ASSISTANT}' turn; expected {GUANACO_SCHEMA}")
    if not text.startswith(HUMAN):
        raise UserError(f"{where} field 'text' does not start with '{HUMAN}'; expected {GUANACO_SCHEMA}")
    turns, pos = [], 0
    while (a := text.find(ASSISTANT, pos)) >= 0:
        prompt_end = a + len(ASSISTANT)
        h = text.find(HUMAN, prompt_end)
        answer_end = h if h >= 0 else len(text)
        turns.append((text[pos:prompt_end], text[prompt_end:answer_end]))
        pos = answer_end
    while turns and not turns[-1][1].strip():  # "### Assistant:" with nothing after it: not answered
        turns.pop()
    return turns


def alpaca_turns(record, where="record"):
    """tatsu-lab/alpaca: {"instruction", "input", "output"} (its "text" column is ignored) -> one turn,
    the Stanford prompt (with an "### Input:" section when input is not empty) and the output.
    A missing input counts as empty; an empty output is no answer (the record is skipped)."""
    instruction = _field(record, "instruction", str, where, ALPACA_SCHEMA)
    input = _field(record, "input", str, where, ALPACA_SCHEMA, optional=True)
    output = _field(record, "output", str, where, ALPACA_SCHEMA)
    if not output.strip():
        return []
    return [(format_prompt("alpaca", instruction, input), output)]


def lima_turns(record, where="record"):
    """GAIR/lima: {"conversations": [human, assistant, human, assistant, ...], "source": ...}, in the
    guanaco template: "### Human: {q}### Assistant:" then " {a}" (both stripped of outer whitespace).
    An odd-length conversation ends with an unanswered question (LIMA's test split is all questions):
    that last turn is dropped."""
    conv = _field(record, "conversations", list, where, LIMA_SCHEMA)
    for i, message in enumerate(conv):
        if not isinstance(message, str):
            raise UserError(f"{where} field 'conversations' item {i} is a {type(message).__name__}, "
                            f"expected a string; expected {LIMA_SCHEMA}")
    return [(format_prompt("guanaco", conv[i].strip()), " " + conv[i + 1].strip())
            for i in range(0, len(conv) - 1, 2)]


# -----------------------------------------------------------------------------
# the command line shared by data/guanaco, data/alpaca and data/lima

def parse_records(records, parse_turns, source):
    """Records -> (examples, skipped): the turn lists of the records with at least one answered turn, and
    how many records had none. `source` names the records in errors, e.g. "alpaca.json"."""
    examples, skipped = [], 0
    for i, record in enumerate(records):
        turns = parse_turns(record, where=f"{source} record {i}")
        if turns:
            examples.append(turns)
        else:
            skipped += 1
    if skipped:
        print(f"{source}: skipped {skipped:,} of {len(records):,} records with no answered turn")
    return examples, skipped


def _load_hub(hub_id, gated):
    """Download a dataset with `datasets` -> {split name: list of records}. Any failure is one UserError."""
    fix = "pass --input FILE (a .json, .jsonl or .parquet file in its schema) to prepare a local copy"
    if gated:
        fix += (f", or accept its terms at https://huggingface.co/datasets/{hub_id} and log in with "
                f"`huggingface-cli login`")
    try:
        import datasets
    except ImportError:
        raise UserError(f"downloading {hub_id} needs the datasets package: pip install datasets; or {fix}") from None
    print(f"loading {hub_id} from the Hugging Face Hub")
    sys.stdout.flush()
    datasets.logging.set_verbosity_error()  # no retry warnings: a failure is reported below, in one line
    try:
        dd = datasets.load_dataset(hub_id)
    except Exception as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        if "gated" in reason.lower() or "GatedRepo" in reason:
            raise UserError(f"{hub_id} is a gated dataset and this machine is not allowed to download it "
                            f"({reason}); {fix}") from None
        raise UserError(f"could not load {hub_id} from the Hugging Face Hub ({reason}); {fix}") from None
    return {split: dd[split].to_list() for split in dd}


def prepare_cli(description, name, hub_id, parse_turns, argv=None, out_dir=None, template="guanaco", gated=False):
    """The command line of data/{name}/prepare.py: records (--input FILE, else the Hub's `hub_id`) ->
    parse_turns -> {train,val}.bin and {train,val}_mask.bin in --out_dir.

    Validation split: the dataset's own test split when the Hub has one with answers (and neither
    --val_examples nor --val_fraction is given); otherwise the last examples of the training records
    (a deterministic tail: the same file always gives the same split)."""
    import argparse
    import configurator
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    configurator.one_line_argparse(parser)
    parser.add_argument("--input", metavar="FILE",
                        help=f"a .json, .jsonl or .parquet file in {hub_id}'s schema (works offline); "
                             f"default: download {hub_id} from the Hub")
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", name)
    parser.add_argument("--out_dir", default=out_dir,
                        help="where to write train.bin, train_mask.bin, val.bin, val_mask.bin (default: %(default)s)")
    parser.add_argument("--max_length", type=int, default=1024,
                        help="longest example in tokens; longer ones are cut (default: %(default)s, GPT-2's context)")
    parser.add_argument("--val_examples", type=int, default=None,
                        help="hold out this many examples (the last ones) for validation")
    parser.add_argument("--val_fraction", type=float, default=None,
                        help="hold out this share of the examples (the last ones) for validation (default: 0.05 "
                             "when the dataset has no test split with answers)")
    args = parser.parse_args(argv)  # the valid values of every argument (configurator's rules):
    configurator.check_args(args, {"input": configurator.PATH, "out_dir": configurator.PATH, "max_length": ">= 2",
                                   "val_examples": ">= 1", "val_fraction": "(0, 1)"})
    shards.check_prepare_out(args.out_dir, ["train.bin", "train_mask.bin", "val.bin", "val_mask.bin", TEMPLATE_FILE])
    tail_asked = args.val_examples is not None or args.val_fraction is not None

    val_examples = None
    if args.input:
        if os.path.isfile(args.input) and os.path.getsize(args.input) == 0:
            raise UserError(f"{args.input} is empty; give a .json, .jsonl or .parquet file in {hub_id}'s schema")
        records = shards.read_records(args.input)
        if not records:
            raise UserError(f"{args.input} holds no records; give a file in {hub_id}'s schema")
        print(f"preparing {len(records):,} records of {args.input}")
        examples, _ = parse_records(records, parse_turns, args.input)
        source = args.input
    else:
        splits = _load_hub(hub_id, gated)
        if "train" not in splits:
            raise UserError(f"{hub_id} on the Hub has no train split (splits: {', '.join(splits)}); pass --input FILE")
        examples, _ = parse_records(splits["train"], parse_turns, f"{hub_id} train")
        source = f"{hub_id} train"
        test = next((s for s in ("test", "validation") if s in splits), None)
        if test is not None and tail_asked:
            print(f"the {test} split of {hub_id} is not used: --val_examples/--val_fraction hold out the end of train")
        elif test is not None:
            val_examples, _ = parse_records(splits[test], parse_turns, f"{hub_id} {test}")
            if val_examples:
                print(f"val: the {test} split of {hub_id} ({len(val_examples):,} examples)")
            else:
                print(f"the {test} split of {hub_id} has no answers; holding out the end of train instead")
                val_examples = None

    if val_examples is None:  # hold out a deterministic tail of the examples
        n = len(examples)
        if n < 2:
            raise UserError(f"{source} has {_count(n, 'usable example')}; need at least 2 "
                            f"(one to train on, one to validate)")
        fraction = args.val_fraction if args.val_fraction is not None else 0.05
        n_val = args.val_examples if args.val_examples is not None else max(1, round(n * fraction))
        if n_val >= n:
            raise UserError(f"holding out {n_val} of the {n} examples of {source} leaves none to train on; "
                            f"give a smaller --val_examples or --val_fraction")
        how = f"--val_examples={n_val}" if args.val_examples is not None else f"--val_fraction={fraction}"
        print(f"val: the last {_count(n_val, 'example')} of the {n:,} of {source} ({how})")
        examples, val_examples = examples[:n - n_val], examples[n - n_val:]

    train = encode_examples(examples, args.max_length, "train")
    val = encode_examples(val_examples, args.max_length, "val")  # both encoded before anything is written
    # train and val, tokens and masks and the template: published together, as one preparation
    shards.write_prepared(args.out_dir, {"train.bin": (train[0], "tokens"), "train_mask.bin": (train[1], "mask"),
                                         "val.bin": (val[0], "tokens"), "val_mask.bin": (val[1], "mask")},
                          texts={TEMPLATE_FILE: template + "\n"})
    print_counts("train", train[2])
    print_counts("val", val[2])
    print(f"wrote train.bin, train_mask.bin, val.bin, val_mask.bin and {TEMPLATE_FILE} to {args.out_dir}")
    print(f"prompt template: {template} (sample.py --template={template})")
