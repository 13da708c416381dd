"""PeftConfig: every setting of every fine-tuning method, in one flat dataclass.

| field          | meaning                                                     | used by                         |
|----------------|-------------------------------------------------------------|---------------------------------|
| method         | "full" or a name in peft.METHODS                            | all                             |
| r              | rank of the update B·A                                      | lora, dora, olora, pissa        |
| alpha          | scale numerator: s = alpha / r (alpha / √r with use_rslora) | lora, dora, olora, pissa        |
| dropout        | LoRA family: dropout on the adapter's input only (the base  | lora, dora, olora, pissa,       |
|                | sees the clean x); ETHER: on the layer's input; OFT: random | ether family, oft; not ia3      |
|                | blocks of R reset to I (BOFT's multiplicative dropout)      |                                 |
| targets        | which Linears to adapt (names below); None = the method's   | every method but full           |
|                | paper default                                               |                                 |
| use_rslora     | rank-stabilized scale s = alpha / √r (rsLoRA)               | lora, dora, olora, pissa        |
| init           | A's init: "kaiming" (uniform, a=√5) or "gaussian" (std 1/r) | lora, dora                      |
| oft_block_size | size b of each orthogonal block R_i (in / b blocks)         | oft                             |
| coft_eps       | COFT radius; 0 = COFT off                                   | oft                             |
| block_share    | one R_i shared by all blocks of a layer                     | oft                             |
| ether_nb       | number of diagonal blocks of H                              | ether, etherplus, etherplusHH   |
| flip_side      | put a one-sided H on the smaller side of a non-square W     | ether, etherplus                |
| quantize       | None or "nf4": frozen block Linears in 4-bit NF4 (QLoRA)    | methods whose layer class has   |
|                |                                                             | supports_quantize: lora, dora,  |
|                |                                                             | oft, ia3                        |
| base_dtype     | None (= float32) or "bfloat16" / "float16": dtype of the    | every method but full           |
|                | frozen block Linears; adapters stay float32                 |                                 |
| lora_plus_ratio| LoRA+: B trains at this multiple of the learning rate of A  | lora, dora, olora, pissa        |
|                | (Hayou et al. 2024 suggest 16); 0 = off                     | (and QLoRA / QDoRA)             |

Both inits are HF peft's; B starts at 0 either way. olora and pissa ignore `init`: their A, B
come from a QR / SVD of the weight. rsLoRA is method "lora" with use_rslora=True.

Target names (a target matches every module whose name equals it or ends with "." + it):
    "c_attn"       fused q|k|v projection            "attn.c_proj"  attention output projection
    "mlp.c_fc"     MLP up-projection                 "mlp.c_proj"   MLP down-projection
    "lm_head"      output head (tied to wte)
    "q", "k", "v"  one slice of c_attn (rows 0:C, C:2C, 2C:3C); adapters touch only those rows
Presets (growing sets of whole projections, e.g. for ablations):
    lora1 = c_attn;  lora2 = lora1 + attn.c_proj;  lora3 = lora2 + mlp.c_fc, mlp.c_proj;
    lora4 = lora3 + lm_head
"all": every Linear the method adapts well, its layer class's all_targets: lora4, except for three methods
(config/quickstart.py uses it, so that every method runs from it). For method full, "all" is what
it trains anyway, so it is accepted there.
    etherplusHH   lora3: ether_nb must divide both sides of the tied 50,257-row head, and 50257 =
                  29 x 1733 shares no divisor but 1 with the width, so only ether_nb=1 would do
    olora         lora3: its QR start diverges on the head at the usual learning rates
                  (peft/lora.py, "OLoRA on lm_head"); naming lm_head explicitly still adapts it
    ether         lora2: a reflection is not the identity at init, and reflecting the input of the
                  MLP or of the head wrecks the model: on models/gpt2-milton (val loss 6.63) ETHER
                  starts at 6.73 on q, v, 6.75 on lora2, 14.0 on lora3 and 11.4 on lm_head alone

Default targets (targets=None), from each method's paper (its layer class's default_targets):
    lora, dora, olora, pissa: q, v          LoRA (Hu et al. 2021) §7.1 adapts W_q and W_v
    ia3:   k, v, mlp.c_proj                 IA3 (Liu et al. 2022) rescales keys, values and the
                                            FFN's inner activation (= the input of mlp.c_proj)
    oft:   c_attn, attn.c_proj              OFT (Qiu et al. 2023) fine-tunes the attention
                                            projections q, k, v and out; q, k, v share their input,
                                            so here one R rotates it for the fused c_attn
    ether, etherplus, etherplusHH: q, v     the ETHER reference code adapts the q and v projections
"""

import dataclasses
import difflib
import importlib.util
from dataclasses import dataclass

import configurator
from errors import UserError

PRESETS = {
    "lora1": ("c_attn",),
    "lora2": ("c_attn", "attn.c_proj"),
    "lora3": ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    "lora4": ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head"),
}
# train.py's keys for the PeftConfig fields: the same names, except two that would clash with
# train.py's own `dropout` (the model's) and `init_from`. '' on the command line means None.
TRAIN_KEYS = {"method": "method", "r": "r", "alpha": "alpha", "adapter_dropout": "dropout",
              "targets": "targets", "use_rslora": "use_rslora", "adapter_init": "init",
              "oft_block_size": "oft_block_size", "coft_eps": "coft_eps", "block_share": "block_share",
              "ether_nb": "ether_nb", "flip_side": "flip_side", "quantize": "quantize",
              "base_dtype": "base_dtype", "lora_plus_ratio": "lora_plus_ratio"}
INITS = ("kaiming", "gaussian")
QUANTIZE = (None, "nf4")
BASE_DTYPES = (None, "float32", "bfloat16", "float16")


def _known_method(name):
    """full or a name in peft.METHODS"""
    from peft import METHODS  # here, not at import time: peft/__init__.py imports this file
    if name in METHODS:
        return None
    if name.lower() == "rslora":
        hint = " (rsLoRA is method='lora' with use_rslora=True)"
    else:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown method{hint}; choose one of {', '.join(METHODS)}"


# the valid values of each field, as configurator rules: validate() checks them, and train.py and
# bench.py declare their PEFT keys with these same rules (train_domains)
DOMAINS = {
    "method": _known_method,
    "r": ">= 1",
    "alpha": "> 0",  # alpha = 0 would scale every update to nothing
    "dropout": "[0, 1)",
    "targets": configurator.ANY,  # names are checked against the model by inject()
    "use_rslora": configurator.ANY,
    "init": INITS,
    "oft_block_size": ">= 2",  # a 1x1 skew-symmetric block is 0: its Cayley rotation is I forever
    "coft_eps": ">= 0",
    "block_share": configurator.ANY,
    "ether_nb": ">= 1",
    "flip_side": configurator.ANY,
    "quantize": QUANTIZE,
    "base_dtype": BASE_DTYPES,
    "lora_plus_ratio": ">= 0",  # 0 = off
}


def train_domains():
    """DOMAINS under train.py's key names (TRAIN_KEYS), where '' stands for None."""
    out = {}
    for key, field in TRAIN_KEYS.items():
        rule = DOMAINS[field]
        out[key] = tuple("" if c is None else c for c in rule) if isinstance(rule, tuple) else rule
    return out


@dataclass
class PeftConfig:
    method: str = "full"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None
    use_rslora: bool = False
    init: str = "kaiming"
    oft_block_size: int = 32
    coft_eps: float = 0.0
    block_share: bool = False
    ether_nb: int = 32
    flip_side: bool = False
    quantize: str | None = None
    base_dtype: str | None = None
    lora_plus_ratio: float = 0.0

    def __post_init__(self):
        # accept "q,v" or ["q", "v"] (command lines, JSON) and store a tuple, so configs compare equal
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        elif self.targets is not None:
            self.targets = tuple(self.targets)
        if self.targets == ():
            self.targets = None
        self.validate()

    @classmethod
    def from_train_config(cls, config):
        """The PeftConfig of a train.py config ({train.py key: value}, see TRAIN_KEYS)."""
        return cls(**{field: (None if config[key] == "" else config[key]) for key, field in TRAIN_KEYS.items()})

    def validate(self):
        """Raise UserError (one line) for any setting that cannot work."""
        from peft import METHODS
        if not isinstance(self.r, int) or isinstance(self.r, bool):
            raise UserError(f"r={self.r!r}: the rank must be an integer >= 1")
        for field, rule in DOMAINS.items():
            configurator.check(field, getattr(self, field), rule)
        if self.targets is not None and not all(isinstance(t, str) and t for t in self.targets):
            raise UserError(f"targets={self.targets!r}: expected names such as q, v, c_attn, mlp.c_fc or lora1..lora4")
        if self.lora_plus_ratio and not getattr(METHODS[self.method], "lora_plus_params", ()):
            raise UserError(f"lora_plus_ratio={self.lora_plus_ratio}: LoRA+ speeds up the B matrices of "
                            f"lora, dora, olora and pissa; method '{self.method}' has none, so drop lora_plus_ratio")
        if self.method == "full":
            for field in ("targets", "quantize", "base_dtype"):
                value = getattr(self, field)
                if value is not None and not (field == "targets" and value == ("all",)):  # "all": what full trains
                    raise UserError(f"method 'full' trains every weight, so {field} does not apply; "
                                    f"drop it (--{field}=) or choose an adapter method (e.g. --method=lora)")
            return
        if self.quantize is not None:
            if not METHODS[self.method].supports_quantize:
                raise UserError(f"method '{self.method}' does not support quantize='{self.quantize}'; "
                                f"use lora or dora (QLoRA / QDoRA), or drop quantize")
            if importlib.util.find_spec("bitsandbytes") is None:
                raise UserError(f"quantize='{self.quantize}' needs bitsandbytes: pip install bitsandbytes")

    def resolved_targets(self):
        """The target names this config adapts: the default if targets is None, presets and "all" expanded."""
        from peft import METHODS
        cls = METHODS[self.method]
        names = self.targets if self.targets is not None else (cls.default_targets if cls else ())
        out = []
        for name in names:
            if name == "all":
                name = cls.all_targets if cls else "lora4"  # full: every weight, the adapters' lora4 and more
            for t in PRESETS.get(name, (name,)):
                if t not in out:
                    out.append(t)
        return tuple(out)

    def hf_targets(self):
        """(the whole modules HF peft adapts for these targets, a note or None): HF adapts whole modules
        only, so the q/k/v slices of c_attn become the whole c_attn (the layers' hf_peft_counterpart)."""
        ours = self.resolved_targets()
        whole = list(dict.fromkeys("c_attn" if t in ("q", "k", "v") else t for t in ours))
        note = None if list(ours) == whole else f"HF adapts the whole {', '.join(whole)} (ours: {', '.join(ours)})"
        return whole, note

    def scale(self):
        """s of the LoRA family: alpha / r, or alpha / sqrt(r) for rsLoRA."""
        return self.alpha / (self.r ** 0.5 if self.use_rslora else self.r)

    def asdict(self):
        d = dataclasses.asdict(self)
        if d["targets"] is not None:
            d["targets"] = list(d["targets"])  # JSON has no tuples
        return d

    @classmethod
    def from_dict(cls, d):
        """Inverse of asdict (e.g. read back from a checkpoint's JSON). Unknown keys are an error."""
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise UserError(f"unknown PeftConfig key '{key}'{hint}; known keys: {', '.join(fields)}")
        return cls(**d)


def fields_used(method):
    """The PeftConfig fields `method` reads (its layer class's config_fields, + quantize if supported)."""
    from peft import METHODS
    cls = METHODS[method]
    if cls is None:
        return ()
    return cls.config_fields + (("quantize",) if cls.supports_quantize else ())
