"""Tests for instruct.py and data/{guanaco,alpaca,lima}/prepare.py: templates, record parsing, the loss mask,
long examples, and the command lines run as users run them (as scripts, offline)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import instruct
import shards
import tokenizer
from errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
DATASETS = {  # name -> (fixture, record parser)
    "guanaco": ("guanaco.jsonl", instruct.guanaco_turns),
    "alpaca": ("alpaca.json", instruct.alpaca_turns),
    "lima": ("lima.jsonl", instruct.lima_turns),
}
EOT_TEXT = "<|endoftext|>"


def fixture(name):
    return os.path.join(FIXTURES, DATASETS[name][0])


def fixture_examples(name):
    examples, _ = instruct.parse_records(shards.read_records(fixture(name)), DATASETS[name][1], name)
    return examples


def run(name, *args, cwd, env=None):
    script = os.path.join(ROOT, "data", name, "prepare.py")
    return subprocess.run([sys.executable, script, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def one_error_line(r):
    """The single `error: ...` line a failed script prints (and nothing else on stderr)."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


# -----------------------------------------------------------------------------
# templates

def test_alpaca_prompts_are_stanfords():
    assert instruct.format_prompt("alpaca", "Sort these.", "3, 1, 2") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSort these.\n\n### Input:\n3, 1, 2\n\n### Response:\n")
    assert instruct.format_prompt("alpaca", "Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSay hi.\n\n### Response:\n")
    # braces in the user's text are text, not format fields
    assert "{x}" in instruct.format_prompt("alpaca", "Print {x}.", "{0}")


def test_alpaca_fixture_text_column_matches():
    """The Hub's alpaca has a `text` column: the prompt followed by the output."""
    for rec in shards.read_records(fixture("alpaca")):
        [(prompt, response)] = instruct.alpaca_turns(rec)
        assert prompt + response == rec["text"]


def test_guanaco_prompt_and_template_errors():
    assert instruct.format_prompt("guanaco", "Hi there") == "### Human: Hi there### Assistant:"
    with pytest.raises(UserError, match=r"unknown prompt template 'chatml'; known templates: alpaca, guanaco"):
        instruct.format_prompt("chatml", "Hi")
    with pytest.raises(UserError, match="guanaco template has no input"):
        instruct.format_prompt("guanaco", "Hi", "more")
    with pytest.raises(UserError, match="known templates"):
        instruct.stop_strings("nope")


def test_stop_strings():
    assert "### Human:" in instruct.stop_strings("guanaco")
    assert "### Instruction:" in instruct.stop_strings("alpaca")
    assert instruct.cut_at_stop("guanaco", " Paris.### Human: and Italy?") == " Paris."
    assert instruct.cut_at_stop("alpaca", "Red.\n\n### Instruction:\nMore") == "Red.\n\n"
    assert instruct.cut_at_stop("alpaca", "no stop here") == "no stop here"


# -----------------------------------------------------------------------------
# record parsers

@pytest.mark.parametrize("sep", ["", "\n", "\n\n", " "])
def test_guanaco_multi_turn(sep):
    text = f"### Human: Hi!{sep}### Assistant: Hello.{sep}### Human: 2+2?{sep}### Assistant: 4{sep}"
    turns = instruct.guanaco_turns({"text": text})
    assert turns == [(f"### Human: Hi!{sep}### Assistant:", f" Hello.{sep}"),
                     (f"### Human: 2+2?{sep}### Assistant:", f" 4{sep}")]
    assert "".join(p + r for p, r in turns) == text  # nothing lost, nothing added
    assert turns[0][0] == instruct.format_prompt("guanaco", "Hi!" + sep)


def test_guanaco_unanswered_and_bad_records():
    assert instruct.guanaco_turns({"text": "### Human: A?### Assistant: B.### Human: C?"}) == [
        ("### Human: A?### Assistant:", " B.")]  # the unanswered last question is dropped
    assert instruct.guanaco_turns({"text": "### Human: A?### Assistant: "}) == []  # nothing answered: skip
    with pytest.raises(UserError, match=r"^g.jsonl record 4 field 'text' has no '### Assistant:' turn; expected "
                                        r"timdettmers/openassistant-guanaco's schema"):
        instruct.guanaco_turns({"text": "### Human: only a question"}, where="g.jsonl record 4")
    with pytest.raises(UserError, match=r"^g.jsonl record 0 has no field 'text' \(fields: prompt\)"):
        instruct.guanaco_turns({"prompt": "x"}, where="g.jsonl record 0")
    with pytest.raises(UserError, match="does not start with '### Human:'"):
        instruct.guanaco_turns({"text": "Hello### Assistant: hi"})


def test_guanaco_fixture():
    examples = fixture_examples("guanaco")
    records = shards.read_records(fixture("guanaco"))
    assert len(examples) == len(records) == 8
    assert [len(e) for e in examples] == [1, 2, 1, 3, 1, 2, 1, 1]
    for turns, rec in zip(examples, records):
        joined = "".join(p + r for p, r in turns)
        assert rec["text"].startswith(joined) and "### Assistant:" not in rec["text"][len(joined):]


def test_alpaca_record_errors():
    with pytest.raises(UserError) as e:
        instruct.alpaca_turns({"instruction": "a", "input": ""}, where="alpaca.json record 3")
    assert str(e.value) == ("alpaca.json record 3 has no field 'output' (fields: instruction, input); "
                            "expected tatsu-lab/alpaca's schema: instruction, input, output")
    with pytest.raises(UserError, match=r"record 1 field 'output' is a list, expected a string"):
        instruct.alpaca_turns({"instruction": "a", "input": "", "output": ["b"]}, where="record 1")
    # a missing (or null) input is an empty input; an empty output is no answer
    assert instruct.alpaca_turns({"instruction": "a", "output": "b"}) == [(instruct.format_prompt("alpaca", "a"), "b")]
    assert instruct.alpaca_turns({"instruction": "a", "input": None, "output": "b"})[0][1] == "b"
    assert instruct.alpaca_turns({"instruction": "a", "input": "", "output": " "}) == []


def test_lima_turns():
    q = instruct.lima_turns({"conversations": ["Q1", "A1", "Q2", "A2"], "source": "multi_turn"})
    assert q == [("### Human: Q1### Assistant:", " A1"), ("### Human: Q2### Assistant:", " A2")]
    odd = instruct.lima_turns({"conversations": ["Q1", "A1", "Q2"], "source": "multi_turn"})
    assert odd == [("### Human: Q1### Assistant:", " A1")]  # the unanswered last question is dropped
    assert instruct.lima_turns({"conversations": ["Only a question?"], "source": "test"}) == []
    with pytest.raises(UserError, match=r"^l.jsonl record 2 field 'conversations' item 1 is a int"):
        instruct.lima_turns({"conversations": ["Q", 3]}, where="l.jsonl record 2")
    with pytest.raises(UserError, match=r"field 'conversations' is a str, expected a list"):
        instruct.lima_turns({"conversations": "Q"})


def test_lima_fixture_skips_question_only(capsys):
    records = shards.read_records(fixture("lima"))
    examples, skipped = instruct.parse_records(records, instruct.lima_turns, "lima.jsonl")
    assert (len(records), len(examples), skipped) == (9, 8, 1)
    assert "skipped 1 of 9 records" in capsys.readouterr().out
    assert [len(e) for e in examples] == [1, 1, 1, 2, 1, 1, 1, 1]


# -----------------------------------------------------------------------------
# tokens and mask

@pytest.mark.parametrize("name", sorted(DATASETS))
def test_encode_example_mask(name):
    for turns in fixture_examples(name):
        ids, mask = instruct.encode_example(turns)
        ids, mask = np.array(ids), np.array(mask)
        assert len(ids) == len(mask) and ids[-1] == tokenizer.EOT and mask[-1] == 1
        assert tokenizer.EOT not in ids[:-1]
        assert tokenizer.decode(ids) == "".join(p + r for p, r in turns) + EOT_TEXT
        assert tokenizer.decode(ids[mask == 1]) == "".join(r for _, r in turns) + EOT_TEXT
        assert tokenizer.decode(ids[mask == 0]) == "".join(p for p, _ in turns)
        # the prompt tokens are exactly what sample.py feeds the model: encode(formatted prompt)
        assert list(ids[:len(tokenizer.encode(turns[0][0]))]) == tokenizer.encode(turns[0][0])


def segments(ids):
    """Split a token shard into examples at EOT (each example keeps its EOT)."""
    ends = np.flatnonzero(ids == tokenizer.EOT) + 1
    assert ends[-1] == len(ids)
    return np.split(np.asarray(ids), ends[:-1])


def test_prepare_examples_cut_and_drop(tmp_path, capsys):
    short = [("### Human: Hi### Assistant:", " Hello.")]
    long_answer = [("### Human: Count### Assistant:", " one two three four five six seven eight nine ten")]
    long_prompt = [("### Human: " + "word " * 30 + "### Assistant:", " ok")]
    full = [instruct.encode_example(t) for t in (short, long_answer, long_prompt)]
    max_length = 16
    assert len(full[0][0]) <= max_length < len(full[1][0]) and len(tokenizer.encode(long_prompt[0][0])) >= max_length
    stats = instruct.prepare_examples([short, long_answer, long_prompt], str(tmp_path), "train", max_length)
    out = capsys.readouterr().out
    assert stats["examples"] == 2 and stats["cut"] == 1 and stats["dropped"] == 1
    assert "train: 1 cut to --max_length=16, 1 dropped" in out
    ids = shards.read_shard(tmp_path / "train.bin")
    mask = shards.read_shard(tmp_path / "train_mask.bin", kind="mask")
    assert len(ids) == len(mask) == stats["tokens"] == len(full[0][0]) + max_length
    assert stats["response_tokens"] == int(mask.sum())
    first, second = segments(ids)
    assert first.tolist() == full[0][0] and mask[:len(first)].tolist() == full[0][1]
    # the cut example: its first max_length-1 tokens, then an EOT the model is not taught to emit
    assert second.tolist() == full[1][0][:max_length - 1] + [tokenizer.EOT]
    assert mask[len(first):].tolist() == full[1][1][:max_length - 1] + [0]


def test_prepare_examples_nothing_usable(tmp_path):
    long_prompt = [("### Human: " + "word " * 30 + "### Assistant:", " ok")]
    with pytest.raises(UserError, match="no usable val example: all 1 have a first prompt of 15\\+ tokens; raise --max_length"):
        instruct.prepare_examples([long_prompt], str(tmp_path), "val", 16)
    with pytest.raises(UserError, match="no val examples"):
        instruct.prepare_examples([], str(tmp_path), "val", 16)


# -----------------------------------------------------------------------------
# the command lines, offline

def printed_counts(stdout, split):
    m = re.search(rf"^{split}: ([\d,]+) examples?, ([\d,]+) tokens", stdout, flags=re.M)
    c = re.search(rf"^{split}: ([\d,]+) cut to --max_length=\d+, ([\d,]+) dropped", stdout, flags=re.M)
    return tuple(int(x.replace(",", "")) for x in m.groups() + c.groups())


def check_outputs(folder, examples, stdout, n_val=1):
    """The four shards in `folder` hold `examples` (the last n_val are val), each example ending at an EOT."""
    for split, part in (("train", examples[:-n_val]), ("val", examples[-n_val:])):
        ids = shards.read_shard(os.path.join(folder, f"{split}.bin"))
        mask = shards.read_shard(os.path.join(folder, f"{split}_mask.bin"), kind="mask")
        assert len(ids) == len(mask)
        encoded = [instruct.encode_example(t) for t in part]
        assert [s.tolist() for s in segments(ids)] == [i for i, _ in encoded]
        assert mask.tolist() == [x for _, m in encoded for x in m]
        assert printed_counts(stdout, split) == (len(part), len(ids), 0, 0)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_cli_input_fixture(name, tmp_path):
    r = run(name, "--input", fixture(name), "--out_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "val: the last 1 example of the" in r.stdout
    check_outputs(tmp_path / "out", fixture_examples(name), r.stdout)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_cli_input_parquet(name, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    src = tmp_path / f"{name}.parquet"
    pq.write_table(pa.Table.from_pylist(shards.read_records(fixture(name))), src)
    r = run(name, "--input", str(src), "--out_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    check_outputs(tmp_path / "out", fixture_examples(name), r.stdout)


def test_cli_max_length_and_val_examples(tmp_path):
    max_length = 20
    r = run("guanaco", "--input", fixture("guanaco"), "--out_dir", str(tmp_path), "--max_length", str(max_length),
            "--val_examples", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "val: the last 3 examples of the 8 of" in r.stdout and "(--val_examples=3)" in r.stdout
    examples = fixture_examples("guanaco")
    for split, part in (("train", examples[:-3]), ("val", examples[-3:])):
        lengths = [len(instruct.encode_example(t)[0]) for t in part]
        first_prompts = [len(tokenizer.encode(t[0][0])) for t in part]
        dropped = sum(p >= max_length - 1 for p in first_prompts)
        cut = sum(n > max_length for n in lengths) - dropped
        kept = len(part) - dropped
        n_tokens = sum(min(n, max_length) for n, p in zip(lengths, first_prompts) if p < max_length - 1)
        assert printed_counts(r.stdout, split) == (kept, n_tokens, cut, dropped)
        ids = shards.read_shard(tmp_path / f"{split}.bin")
        assert len(ids) == n_tokens and max(len(s) for s in segments(ids)) <= max_length
    assert printed_counts(r.stdout, "train")[2:] == (4, 1)  # the test does exercise both the cut and the drop


@pytest.mark.parametrize("content, suffix, expected", [
    (b"", ".jsonl", "is empty"),
    (b"\n\n", ".jsonl", "holds no records"),
    (b"[]", ".json", "holds no records"),
    (b"a,b\n1,2\n", ".csv", "expected a .json, .jsonl or .parquet file"),
    ('{"text": "### Human: Café### Assistant: oui"}\n'.encode("latin-1"), ".jsonl", "is not UTF-8 text"),
    (b'{"text": "### Human: a### Assistant: b"}\n{"text": \n', ".jsonl", "line 2 is not valid JSON"),
    (json.dumps([{"question": "q", "answer": "a"}]).encode(), ".json",
     "record 0 has no field 'text' (fields: question, answer); expected timdettmers/openassistant-guanaco's schema"),
])
def test_cli_bad_input(tmp_path, content, suffix, expected):
    src = tmp_path / f"data{suffix}"
    src.write_bytes(content)
    line = one_error_line(run("guanaco", "--input", str(src), "--out_dir", str(tmp_path / "out"), cwd=tmp_path))
    assert expected in line and f"data{suffix}" in line, line
    assert not (tmp_path / "out").exists()


def test_cli_wrong_schema(tmp_path):
    line = one_error_line(run("alpaca", "--input", fixture("lima"), "--out_dir", str(tmp_path), cwd=tmp_path))
    assert line.endswith("lima.jsonl record 0 has no field 'instruction' (fields: conversations, source); "
                         "expected tatsu-lab/alpaca's schema: instruction, input, output")
    line = one_error_line(run("lima", "--input", fixture("guanaco"), "--out_dir", str(tmp_path), cwd=tmp_path))
    assert "guanaco.jsonl record 0 has no field 'conversations' (fields: text)" in line


def test_cli_bad_flags(tmp_path):
    args = ["--input", fixture("alpaca"), "--out_dir", str(tmp_path)]
    assert "--val_fraction=1.5" in one_error_line(run("alpaca", *args, "--val_fraction", "1.5", cwd=tmp_path))
    assert "leaves none to train on" in one_error_line(run("alpaca", *args, "--val_examples", "9", cwd=tmp_path))
    assert "--max_length=1: must be an integer >= 2" in one_error_line(run("alpaca", *args, "--max_length", "1", cwd=tmp_path))


def test_cli_writes_nothing_when_val_is_unusable(tmp_path):
    src = tmp_path / "g.jsonl"
    texts = ["### Human: Hi### Assistant: Hello.", "### Human: " + "word " * 30 + "### Assistant: ok"]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    line = one_error_line(run("guanaco", "--input", str(src), "--out_dir", str(tmp_path / "out"),
                              "--max_length", "16", cwd=tmp_path))
    assert line == "error: no usable val example: all 1 have a first prompt of 15+ tokens; raise --max_length"
    assert not (tmp_path / "out").exists()  # train is not written either: no half-prepared folder


def test_cli_hub_offline(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = run("alpaca", "--out_dir", str(tmp_path / "out"), cwd=tmp_path, env=env)
    line = one_error_line(r)
    assert "tatsu-lab/alpaca" in line and "--input" in line and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# the Hub path, with a stand-in for the `datasets` package (the real one needs the network)

class FakeSplit(list):
    def to_list(self):
        return list(self)


def fake_datasets(monkeypatch, splits=None, error=None):
    import types

    def load_dataset(hub_id):
        if error is not None:
            raise error
        return {name: FakeSplit(records) for name, records in splits.items()}
    fake = types.SimpleNamespace(load_dataset=load_dataset,
                                 logging=types.SimpleNamespace(set_verbosity_error=lambda: None))
    monkeypatch.setitem(sys.modules, "datasets", fake)


def test_hub_test_split_is_val(monkeypatch, tmp_path, capsys):
    records = shards.read_records(fixture("guanaco"))
    fake_datasets(monkeypatch, {"train": records[:6], "test": records[6:]})
    instruct.prepare_cli("", "guanaco", "timdettmers/openassistant-guanaco", instruct.guanaco_turns,
                         argv=["--out_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "val: the test split of timdettmers/openassistant-guanaco (2 examples)" in out
    check_outputs(tmp_path, fixture_examples("guanaco"), out, n_val=2)


def test_hub_question_only_test_split_falls_back_to_tail(monkeypatch, tmp_path, capsys):
    questions = [{"conversations": ["Question only?"], "source": "test"}] * 3
    fake_datasets(monkeypatch, {"train": shards.read_records(fixture("lima")), "test": questions})
    instruct.prepare_cli("", "lima", "GAIR/lima", instruct.lima_turns, argv=["--out_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "the test split of GAIR/lima has no answers; holding out the end of train instead" in out
    assert "val: the last 1 example of the 8 of GAIR/lima train (--val_fraction=0.05)" in out
    check_outputs(tmp_path, fixture_examples("lima"), out)


def test_hub_gated_and_unreachable(monkeypatch, tmp_path):
    fake_datasets(monkeypatch, error=RuntimeError("Dataset 'GAIR/lima' is a gated dataset on the Hub."))
    with pytest.raises(UserError, match=r"^GAIR/lima is a gated dataset .*huggingface-cli login"):
        instruct.prepare_cli("", "lima", "GAIR/lima", instruct.lima_turns, argv=["--out_dir", str(tmp_path)], gated=True)
    fake_datasets(monkeypatch, error=ConnectionError("Couldn't reach 'tatsu-lab/alpaca' on the Hub"))
    with pytest.raises(UserError, match=r"^could not load tatsu-lab/alpaca .*Couldn't reach.*pass --input FILE"):
        instruct.prepare_cli("", "alpaca", "tatsu-lab/alpaca", instruct.alpaca_turns, argv=["--out_dir", str(tmp_path)])
