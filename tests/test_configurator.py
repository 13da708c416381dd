"""configurator.py: --key=value conversion, config files, and one-line errors."""
import pytest

from configurator import configure, defaults_from
from errors import UserError

DEFAULTS = {"batch_size": 8, "learning_rate": 3e-4, "compile": False, "out_dir": "out",
            "targets": (), "quantize": None}


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
