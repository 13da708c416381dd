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

Unknown keys, wrong types and broken config files stop with one line (errors.UserError) that
names the key or the line and says how to fix it. A script that reads only a few keys of another
script's config files (push_to_hub.py reads out_dir from a training config) passes
ignore_unknown_from_files=True: keys it does not know are then skipped in config files, but are
still an error on the command line, where they can only be typos.
"""

import ast
import difflib
import os

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
    if default is None or value is None:
        return value
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


def _run_config_file(path, config, defaults, ignore_unknown=False):
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


def help_text(defaults):
    width = max(len(k) for k in defaults)
    lines = ["usage: [config/file.py ...] [--key=value ...]", "keys and defaults:"]
    lines += [f"  --{k.ljust(width)} = {v!r}" for k, v in defaults.items()]
    return "\n".join(lines)


def configure(defaults, argv, ignore_unknown_from_files=False):
    """Apply config files and --key=value overrides in order; return the final {key: value}.

    ignore_unknown_from_files: skip unknown keys set by config files (not on the command line)."""
    config = dict(defaults)
    for arg in argv:
        if arg in ("-h", "--help"):
            print(help_text(defaults))
            raise SystemExit(0)
        if not arg.startswith("--"):
            _run_config_file(arg, config, defaults, ignore_unknown_from_files)
            continue
        if "=" not in arg:
            raise UserError(f"'{arg}': write overrides as --key=value")
        key, text = arg[2:].split("=", 1)
        if key not in defaults:
            raise _unknown(key, list(defaults), "on the command line")
        config[key] = convert(key, text, defaults[key])
    return config


def defaults_from(namespace):
    """The config keys of a script: its public module-level values of simple types, in order."""
    simple = (int, float, bool, str, tuple, type(None))
    return {k: v for k, v in namespace.items() if not k.startswith("_") and isinstance(v, simple)}
