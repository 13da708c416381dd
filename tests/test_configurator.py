"""configurator.py: --key=value conversion, config files, declared domains, and one-line errors."""
import argparse
import json
import os
import re
import subprocess
import sys

import pytest

import configurator
from errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = {"batch_size": 8, "learning_rate": 3e-4, "compile": False, "out_dir": "out",
            "targets": (), "quantize": None}
DOMAINS = {"batch_size": ">= 1", "learning_rate": "(0, 1]", "compile": configurator.ANY, "out_dir": configurator.PATH,
           "targets": configurator.ANY, "quantize": (None, "nf4")}


def configure(defaults, argv):
    return configurator.configure(defaults, argv, DOMAINS)


defaults_from = configurator.defaults_from


def test_overrides_take_the_default_type():
    c = configure(DEFAULTS, ["--batch_size=4", "--learning_rate=1", "--compile=true",
                             "--out_dir=runs/a=b", "--targets=q,v", "--quantize=nf4"])
    assert c["batch_size"] == 4 and isinstance(c["learning_rate"], float) and c["learning_rate"] == 1.0
    assert c["compile"] is True and c["out_dir"] == "runs/a=b"  # values may contain '='
    assert c["targets"] == ("q", "v") and c["quantize"] == "nf4"
    assert configure(DEFAULTS, ["--compile=False", "--targets=('c_attn',)"])["targets"] == ("c_attn",)
    assert configure(DEFAULTS, ["--compile=False"])["compile"] is False
    assert configure(DEFAULTS, ["--learning_rate=3e-5"])["learning_rate"] == 3e-5


@pytest.mark.parametrize("arg, message", [
    ("--batchsize=4", "unknown config key 'batchsize' on the command line; did you mean 'batch_size'?"),
    ("--batch_size=4.5", "--batch_size=4.5: expected an int"),
    ("--compile=maybe", "--compile=maybe: expected a bool"),
    ("--learning_rate=fast", "--learning_rate=fast: expected a float"),
    ("--batch_size", "write overrides as --key=value"),
    ("nope.py", "config file 'nope.py' does not exist"),
])
def test_bad_arguments_name_the_problem(arg, message):
    with pytest.raises(UserError) as e:
        configure(DEFAULTS, [arg])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_config_file_is_python_and_checked(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("batch_size = 2\nlearning_rate = batch_size * 1e-4\ntargets = ['q', 'v']\nimport math\n_private = 3\n")
    c = configure(DEFAULTS, [str(f), "--batch_size=16"])  # later arguments win
    assert c["batch_size"] == 16 and c["learning_rate"] == pytest.approx(2e-4) and c["targets"] == ("q", "v")

    f.write_text("batch_size = 2\nlearnin_rate = 1e-3\n")
    with pytest.raises(UserError, match=r"unknown config key 'learnin_rate' in .*c.py; did you mean 'learning_rate'"):
        configure(DEFAULTS, [str(f)])
    f.write_text("batch_size = 2\nlearning_rate = (\n")
    with pytest.raises(UserError, match=r"c.py line 2: syntax error"):
        configure(DEFAULTS, [str(f)])
    f.write_text("batch_size = '8'\n")
    with pytest.raises(UserError, match="config key 'batch_size' in .*c.py must be of type int, got str"):
        configure(DEFAULTS, [str(f)])
    f.write_text("x = 1\nbatch_size = 1 // 0\n")
    with pytest.raises(UserError, match=r"c.py line 2: ZeroDivisionError"):
        configure(DEFAULTS, [str(f)])


def test_help_lists_keys(capsys):
    with pytest.raises(SystemExit):
        configure(DEFAULTS, ["--help"])
    assert "--learning_rate" in capsys.readouterr().out


def test_defaults_from_keeps_simple_public_values():
    ns = {"a": 1, "_b": 2, "f": print, "s": "x", "t": (1,), "n": None, "m": pytest}
    assert defaults_from(ns) == {"a": 1, "s": "x", "t": (1,), "n": None}


@pytest.mark.parametrize("arg, message", [
    ("--batch_size=0", "--batch_size=0: must be an integer >= 1"),
    ("--batch_size=-3", "--batch_size=-3: must be an integer >= 1"),
    ("--learning_rate=0", "--learning_rate=0.0: must be a number in (0, 1]"),
    ("--learning_rate=1.5", "--learning_rate=1.5: must be a number in (0, 1]"),
    ("--learning_rate=nan", "--learning_rate=nan: must be a finite number"),
    ("--learning_rate=inf", "--learning_rate=inf: must be a finite number"),
    ("--quantize=nf8", "--quantize=nf8: must be one of None, nf4 (did you mean 'nf4'?)"),
    ("--out_dir=", "--out_dir=: must not be empty"),
])
def test_values_outside_the_declared_domain_are_one_line(arg, message):
    with pytest.raises(UserError) as e:
        configure(DEFAULTS, [arg])
    assert str(e.value) == message


def test_the_domain_is_checked_after_files_and_names_where_it_was_set(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("batch_size = 0\n")
    with pytest.raises(UserError, match=r"--batch_size=0 \(set in .*c.py\): must be an integer >= 1"):
        configure(DEFAULTS, [str(f)])
    assert configure(DEFAULTS, [str(f), "--batch_size=2"])["batch_size"] == 2  # a later override fixes it
    f.write_text("learning_rate = float('nan')\n")
    with pytest.raises(UserError, match="finite"):
        configure(DEFAULTS, [str(f)])


def test_interval_bounds_are_exact():
    check = configurator.check
    for rule, inside, outside in [("[0, 1)", (0, 0.5, 0.999), (-1e-9, 1)), ("(0, 1]", (1e-9, 1), (0, 1.0001)),
                                  ("> 2", (2.5,), (2,)), ("<= 3", (3, -7), (3.5,)), ("[1, 65536]", (1, 65536), (0, 65537))]:
        for v in inside:
            check("k", v, rule)
        for v in outside:
            with pytest.raises(UserError):
                check("k", v, rule)
    with pytest.raises(UserError):
        check("k", True, ">= 0")  # a bool is not a number here
    with pytest.raises(UserError):
        check("k", "3", ">= 0")


def test_a_key_without_a_declared_domain_stops_the_script():
    with pytest.raises(RuntimeError, match="without a declared domain: extra"):
        configurator.configure(dict(DEFAULTS, extra=1), [], DOMAINS)


def test_none_in_a_config_file_is_refused_unless_the_default_is_none(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("batch_size = None\n")
    with pytest.raises(UserError, match="config key 'batch_size' in .*c.py is None, but it must be of type int"):
        configure(DEFAULTS, [str(f)])
    f.write_text("quantize = None\n")
    assert configure(DEFAULTS, [str(f)])["quantize"] is None


@pytest.mark.parametrize("body", ["import sys\nsys.exit()\n", "exit(0)\n", "raise SystemExit(3)\n"])
def test_a_config_file_that_exits_is_an_error_not_a_silent_success(tmp_path, body):
    f = tmp_path / "c.py"
    f.write_text("batch_size = 2\n" + body)
    with pytest.raises(UserError, match=r"c.py calls exit\(.*\); a config file only sets keys"):
        configure(DEFAULTS, [str(f)])


def test_upper_case_module_constants_are_never_keys():
    assert defaults_from({"EOT": 50256, "ROOT": "/x", "eot": 1, "batch_size": 2}) == {"eot": 1, "batch_size": 2}


def test_help_shows_each_rule_and_parse_rule_reads_it_back(capsys):
    with pytest.raises(SystemExit):
        configure(DEFAULTS, ["--help"])
    rules = {}
    for line in capsys.readouterr().out.splitlines():
        m = re.match(r"\s+--(\w+)\s*= (.*?)(?:  # (.*))?$", line)
        if m:
            rules[m.group(1)] = configurator.parse_rule(m.group(3) or "")
    assert rules["batch_size"] == ">= 1" and rules["learning_rate"] == "(0, 1]" and rules["quantize"] == (None, "nf4")
    assert rules["out_dir"] == configurator.ANY and rules["compile"] == configurator.ANY


def test_help_json_gives_every_default_and_rule_for_programs(capsys):
    """--help=json: {key: {"default", "rule"}}; read_help_json gives back the defaults (tuples as tuples)
    and the rules parse_rule reads from --help, so a program never parses the --help table."""
    with pytest.raises(SystemExit):
        configure(DEFAULTS, ["--help=json"])
    text = capsys.readouterr().out
    assert json.loads(text)["batch_size"] == {"default": 8, "rule": ">= 1"}
    defaults, rules = configurator.read_help_json(text)
    assert defaults == DEFAULTS and type(defaults["targets"]) is tuple and type(defaults["learning_rate"]) is float
    assert rules == {"batch_size": ">= 1", "learning_rate": "(0, 1]", "compile": configurator.ANY,
                     "out_dir": configurator.ANY, "targets": configurator.ANY, "quantize": (None, "nf4")}
    with pytest.raises(UserError, match=r"'--help=yaml': write --help \(a table\) or --help=json"):
        configure(DEFAULTS, ["--help=yaml"])


def test_argparse_errors_are_one_line():
    parser = configurator.one_line_argparse(argparse.ArgumentParser())
    parser.add_argument("--n", type=int)
    with pytest.raises(UserError, match=r"^argument --n: invalid int value: 'x'; run with --help for usage$"):
        parser.parse_args(["--n=x"])
    with pytest.raises(UserError, match="unrecognized arguments: --m"):
        parser.parse_args(["--m=1"])
    configurator.check_args(parser.parse_args(["--n=3"]), {"n": ">= 1"})
    with pytest.raises(UserError, match="--n=0: must be an integer >= 1"):
        configurator.check_args(parser.parse_args(["--n=0"]), {"n": ">= 1"})


SCRIPTS = ["train.py", "sample.py", "eval.py", "compare.py", "bench.py", "make_base.py", "push_to_hub.py"]


def test_every_script_declares_a_domain_for_every_key():
    """--help runs configure(), which refuses a key without a declared domain; numeric keys all have a range,
    and no UPPER_CASE constant leaks in as a key."""
    procs = {s: subprocess.Popen([sys.executable, s, "--help"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True) for s in SCRIPTS}
    for script, p in procs.items():
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, f"{script} --help: {out[-500:]}"
        keys = re.findall(r"^\s+--(\w+)\s*= (.*?)(?:  # (.*))?$", out, re.M)
        assert keys and all(k == k.lower() for k, _, _ in keys), script
        for key, default, rule in keys:
            if isinstance(eval(default), (int, float)) and not isinstance(eval(default), bool) and key != "seed":
                assert rule, f"{script} --{key} has no valid range"
