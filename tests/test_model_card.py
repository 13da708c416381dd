"""model_card.py: the training command on the card, from the checkpoint's record of train.py's defaults
(the rest of the card is checked on real exports in tests/test_push_to_hub.py)."""

import json
import shlex

import configurator
import model_card

# a few of train.py's keys with its defaults, as train.py records them in a checkpoint's meta["defaults"]
DEFAULTS = {"out_dir": "out", "overwrite": False, "init_from": "gpt2", "dataset": "shakespeare", "method": "full",
            "r": 8, "alpha": 16.0, "targets": (), "quantize": "", "learning_rate": 3e-4, "decay_lr": True,
            "device": "cpu"}
ARGS = ["--out_dir=out-lora", "--overwrite=true", "--init_from=resume", "--method=lora", "--r=4",
        "--targets=q,v,mlp.c_fc", "--learning_rate=0.001", "--decay_lr=false", "--alpha=16.0"]


def meta_of(args, with_defaults):
    """The meta a checkpoint of `train.py args` holds (JSON: tuples become lists); a resumed run's
    base is the one it started from."""
    config = configurator.configure(DEFAULTS, args, {k: configurator.ANY for k in DEFAULTS})
    meta = json.loads(json.dumps({"config": dict(config, EOT=50256), "base": {"init_from": "models/gpt2-milton"}}))
    if with_defaults:
        meta["defaults"] = json.loads(json.dumps(DEFAULTS))
    return config, meta


def rerun(command):
    """The config train.py would build from the card's command."""
    argv = shlex.split(command)
    assert argv[:2] == ["python", "train.py"]
    return configurator.configure(DEFAULTS, argv[2:], {k: configurator.ANY for k in DEFAULTS})


def test_command_lists_the_keys_that_differ_from_the_recorded_defaults():
    config, meta = meta_of(ARGS, with_defaults=True)
    command = model_card.train_command(meta)
    assert command == ("python train.py --out_dir=out-lora --init_from=models/gpt2-milton --method=lora --r=4 "
                       "--targets=q,v,mlp.c_fc --learning_rate=0.001 --decay_lr=false")
    assert rerun(command) == dict(config, overwrite=False, init_from="models/gpt2-milton")


def test_command_without_recorded_defaults_writes_every_key():
    """A checkpoint written before train.py recorded its defaults: every training key, still exact."""
    config, meta = meta_of(ARGS, with_defaults=False)
    command = model_card.train_command(meta)
    assert "--overwrite" not in command and "EOT" not in command  # never a training key
    assert [a.split("=")[0] for a in shlex.split(command)[2:]] == [f"--{k}" for k in DEFAULTS if k != "overwrite"]
    assert "--alpha=16.0" in command and "--quantize=" in command and "--targets=q,v,mlp.c_fc" in command
    assert rerun(command) == dict(config, overwrite=False, init_from="models/gpt2-milton")
