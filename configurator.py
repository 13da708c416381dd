"""
Configuration the nanoGPT way, without nanoGPT's traps.

A script keeps its defaults as plain module-level variables, then calls

    config = configurator.configure(defaults, sys.argv[1:])

where `defaults` maps each key to its default value. Arguments are applied left to right:

    python train.py config/finetune_shakespeare.py --batch_size=8 --learning_rate=3e-4

- `path/to/file.py` is plain Python executed with the current values in scope (so it can compute
  one setting from another); every top-level name it assigns must be a known key.
- `--key=value` sets one key. The value is converted to the type of the default:
  int (`--max_iters=100`), float (`--lr=1`, `--lr=3e-4`), bool (`true/false/1/0/yes/no`),
  str (taken as is, may contain '='), tuple (`--targets=q,v` or `--targets="('q','v')"`).
  Keys whose default is None accept a Python literal, `None`, or else a string.

Each script also declares the valid values of every key, in one dict next to its defaults:

    domains = {"batch_size": ">= 1", "dropout": "[0, 1)", "dtype": ("float32", "bfloat16", "float16"),
               "out_dir": configurator.PATH, "compile": configurator.ANY}
    config = configurator.configure(defaults, sys.argv[1:], domains)

A rule is an interval ("[a, b]", "(a, b)", "[a, b)", "(a, b]", or ">= a", "> a", "<= b", "< b"), a
tuple of the allowed values, a function value -> None or what is wrong, or ANY. A float is always
finite (nan and inf are refused). A script that forgets to declare a key does not start, so no key
escapes the check. Every value is checked after all files and overrides are applied, before the
script does anything, and a value outside its domain stops with one line that names the key, the
value, where it was set and the valid range.

`--help` lists every key with its default and rule; `--help=json` prints the same as one JSON object,
{key: {"default": value, "rule": text}}, for programs (compare.py reads train.py's keys this way; a
tuple default is a JSON list, read_help_json turns it back, and parse_rule reads each rule's text).

Unknown keys, wrong types and broken config files stop with one line (errors.UserError) that
names the key or the line and says how to fix it. A script that reads only a few keys of another
script's config files (push_to_hub.py reads out_dir from a training config) passes
ignore_unknown_from_files=True: keys it does not know are then skipped in config files, but are
still an error on the command line, where they can only be typos.
"""

import ast
import difflib
import json
import math
import os
import re

from errors import UserError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _unknown(key, known, where):
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else "; run with --help to list the keys"
    return UserError(f"unknown config key '{key}' {where}{hint}")


def _type_name(value):
    return type(value).__name__


def convert(key, text, default):
    """Turn the command-line string `text` into a value of the default's type."""
    if isinstance(default, bool):  # before int: bool is a subclass of int
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise UserError(f"--{key}={text}: expected a bool (true/false)")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise UserError(f"--{key}={text}: expected an int, e.g. --{key}={default}") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise UserError(f"--{key}={text}: expected a float, e.g. --{key}={default}") from None
    if isinstance(default, str):
        return text
    if isinstance(default, tuple):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = None
        if isinstance(value, (tuple, list)):
            return tuple(value)
        return tuple(part.strip() for part in text.split(",") if part.strip())
    # default None: a Python literal if it parses, else the raw string
    if text.strip() in ("None", "none", ""):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def check_type(key, value, default, where):
    """A value set in a config file must have the default's type (an int is a fine float)."""
    if default is None:
        return value
    if value is None:
        raise UserError(f"config key '{key}' {where} is None, but it must be of type {_type_name(default)} "
                        f"(e.g. {key} = {default!r}); remove the line to keep the default")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(f"config key '{key}' {where} must be of type bool, got {_type_name(value)} {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, tuple) and isinstance(value, (list, tuple)):
        return tuple(value)
    if isinstance(default, tuple) and isinstance(value, str):
        return (value,)
    if not isinstance(value, type(default)) or (isinstance(value, bool) and not isinstance(default, bool)):
        raise UserError(f"config key '{key}' {where} must be of type {_type_name(default)}, got {_type_name(value)} {value!r}")
    return value


def _run_config_file(path, config, defaults, origin, ignore_unknown=False):
    if not os.path.isfile(path):
        raise UserError(f"config file '{path}' does not exist (config files are given as paths, e.g. config/finetune_shakespeare.py)")
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (invalid byte 0x{e.object[e.start]:02x} at byte offset {e.start}); "
                        f"save it as UTF-8") from None
    try:
        code = compile(source, path, "exec")
    except SyntaxError as e:
        raise UserError(f"{path} line {e.lineno}: syntax error: {e.msg}") from None
    scope = dict(config)
    try:
        exec(code, scope)
    except SystemExit as e:  # exit() in a config file must not end the run silently with exit 0
        raise UserError(f"{path} calls exit({'' if e.code is None else repr(e.code)}); a config file only sets "
                        f"keys, so remove that call") from None
    except Exception as e:  # a config file is user code: report where it broke, in one line
        tb = e.__traceback__
        line = None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == path:
                line = tb.tb_lineno
            tb = tb.tb_next
        raise UserError(f"{path} line {line}: {type(e).__name__}: {e}") from None
    for key, value in scope.items():
        if key.startswith("_") or key == "__builtins__":
            continue
        if callable(value) or type(value).__name__ == "module":
            continue  # helper functions and imports inside a config file are fine
        if key not in defaults:
            if ignore_unknown:
                continue
            raise _unknown(key, list(defaults), f"in {path}")
        config[key] = check_type(key, value, defaults[key], f"in {path}")
        origin[key] = path


def rule_text(rule):
    """A rule as --help shows it: an interval as written, a tuple as its repr (both read back by
    parse_rule), a function by its docstring."""
    if isinstance(rule, tuple):
        return repr(rule)
    if callable(rule):
        return (rule.__doc__ or "checked by the script").strip().splitlines()[0]
    return "" if rule == ANY else rule


def parse_rule(text):
    """The rule of a `--help` line back (an interval or a tuple), or ANY for what only the script can check."""
    try:
        value = ast.literal_eval(text)
        if isinstance(value, tuple):
            return value
    except (ValueError, SyntaxError):
        pass
    try:
        _interval(text)
        return text
    except RuntimeError:
        return ANY


def help_text(defaults, domains):
    width = max(len(k) for k in defaults)
    lines = ["usage: [config/file.py ...] [--key=value ...]", "keys, defaults  # valid values:"]
    for k, v in defaults.items():
        rule = rule_text(domains[k])
        lines.append(f"  --{k.ljust(width)} = {v!r}" + (f"  # {rule}" if rule else ""))
    return "\n".join(lines)


def help_json(defaults, domains):
    """--help=json: {key: {"default": value, "rule": text}} as one line of JSON (rule_text of each rule)."""
    return json.dumps({k: {"default": v, "rule": rule_text(domains[k])} for k, v in defaults.items()})


def read_help_json(text):
    """The inverse of help_json: (defaults {key: value}, rules {key: rule}) with tuple defaults as tuples
    again (JSON has only lists) and each rule as parse_rule reads it (ANY for what only the script checks)."""
    keys = json.loads(text)
    defaults = {k: tuple(v["default"]) if isinstance(v["default"], list) else v["default"] for k, v in keys.items()}
    return defaults, {k: parse_rule(v["rule"]) for k, v in keys.items()}


def configure(defaults, argv, domains, ignore_unknown_from_files=False):
    """Apply config files and --key=value overrides in order, check every value against `domains`
    ({key: rule}, one for each key of `defaults`), and return the final {key: value}.

    ignore_unknown_from_files: skip unknown keys set by config files (not on the command line)."""
    undeclared = [k for k in defaults if k not in domains]
    if undeclared:  # the script's own bug, not the user's: every key needs a declared domain
        raise RuntimeError(f"config keys without a declared domain: {', '.join(undeclared)}")
    config, origin = dict(defaults), {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(help_text(defaults, domains))
            raise SystemExit(0)
        if arg.startswith("--help="):
            if arg != "--help=json":
                raise UserError(f"'{arg}': write --help (a table) or --help=json (for programs)")
            print(help_json(defaults, domains))
            raise SystemExit(0)
        if not arg.startswith("--"):
            _run_config_file(arg, config, defaults, origin, ignore_unknown_from_files)
            continue
        if "=" not in arg:
            raise UserError(f"'{arg}': write overrides as --key=value")
        key, text = arg[2:].split("=", 1)
        if key not in defaults:
            raise _unknown(key, list(defaults), "on the command line")
        config[key] = convert(key, text, defaults[key])
        origin.pop(key, None)
    for key, value in config.items():
        check(key, value, domains[key], f" (set in {origin[key]})" if key in origin else "")
    return config


def is_key(name):
    """Config keys are lower-case public names; UPPER_CASE module constants (EOT, ROOT) never are."""
    return not name.startswith("_") and name == name.lower()


def defaults_from(namespace):
    """The config keys of a script: its public lower-case module-level values of simple types, in order."""
    simple = (int, float, bool, str, tuple, type(None))
    return {k: v for k, v in namespace.items() if is_key(k) and isinstance(v, simple)}


# -----------------------------------------------------------------------------
# domains: the valid values of each key

ANY = "any"  # every value of the key's type


def PATH(value):
    """a path, not empty"""
    return None if str(value).strip() else "must not be empty"


def DEVICE(value):
    """cpu, cuda, cuda:N or mps, available on this machine"""
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", value):
        return "must be cpu, cuda, cuda:N or mps"
    import torch  # here: configurator itself does not need torch
    if value.startswith("cuda") and not torch.cuda.is_available():
        return "CUDA is not available on this machine; use --device=cpu"
    if value.startswith("cuda:") and int(value[5:]) >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
    if value == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available on this machine; use --device=cpu"
    return None


DTYPES = ("float32", "bfloat16", "float16")
_BOUND = re.compile(r"\s*(>=|>|<=|<)\s*(\S+)\s*$")
_INTERVAL = re.compile(r"\s*([\[(])\s*([^,]+),\s*([^\])]+)([\])])\s*$")


def _interval(rule):
    """'[1, inf)' or '>= 1' -> (lo, lo_closed, hi, hi_closed)."""
    m = _BOUND.match(rule)
    if m:
        op, x = m.group(1), float(m.group(2))
        return (x, op == ">=", math.inf, False) if op[0] == ">" else (-math.inf, False, x, op == "<=")
    m = _INTERVAL.match(rule)
    if not m:
        raise RuntimeError(f"bad domain rule {rule!r}")
    return float(m.group(2)), m.group(1) == "[", float(m.group(3)), m.group(4) == "]"


def _describe(rule, value):
    kind = "an integer" if isinstance(value, int) else "a number"
    m = _BOUND.match(rule)
    return f"{kind} {m.group(1)} {m.group(2)}" if m else f"{kind} in {rule.strip()}"


def check(key, value, rule, where=""):
    """Raise UserError (one line: key, value, where it was set, the valid range) if `value` breaks `rule`."""
    shown = ",".join(map(str, value)) if isinstance(value, tuple) else value

    def fail(why):
        raise UserError(f"--{key}={shown}{where}: {why}")

    if isinstance(value, float) and not math.isfinite(value):
        fail("must be a finite number")
    if rule == ANY:
        return
    if isinstance(rule, tuple):
        if value not in rule:
            close = difflib.get_close_matches(str(value), [str(c) for c in rule], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            fail(f"must be one of {', '.join(repr(c) if c == '' else str(c) for c in rule)}{hint}")
        return
    if callable(rule):
        why = rule(value)
        if why:
            fail(why)
        return
    lo, lo_closed, hi, hi_closed = _interval(rule)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(f"must be {_describe(rule, 0.0)}")
    if value < lo or value > hi or (value == lo and not lo_closed) or (value == hi and not hi_closed):
        fail(f"must be {_describe(rule, value)}")


def check_args(args, domains):
    """The same check for an argparse namespace (the prepare scripts): {dest: rule}; None values pass."""
    for key, rule in domains.items():
        value = getattr(args, key)
        if value is not None:
            check(key, value, rule)


def one_line_argparse(parser):
    """Make an argparse parser report a bad argument as one `error:` line (a UserError), like every
    other script, instead of argparse's usage block."""
    def error(message):
        raise UserError(f"{message}; run with --help for usage")
    parser.error = error
    return parser
