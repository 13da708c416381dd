"""
Token shards: the .bin files training reads, and the text -> train.bin/val.bin preparation that writes them.

File format (little-endian), one flat array per file:

    bytes 0..1023   header, 128 int64 words:
                      [0] magic     = 0x4452485354464550, the ASCII bytes "PEFTSHRD" (visible in a hex dump)
                      [1] version   = 1
                      [2] n_items   number of items that follow
                      [3] itemsize  bytes per item, which is also the kind of shard:
                                      2 = "tokens": uint16 GPT-2 token ids (50257 < 65536 fits)
                                      1 = "mask":   uint8 loss mask, 1 = compute the loss on this
                                                    position, 0 = prompt (no loss)
                      [4] prep_id   the preparation this shard belongs to: prepare.py writes the same id
                                    (a hash of all the shards it writes) into each of them, and train.py
                                    refuses a train.bin and val.bin (and masks) whose ids differ.
                                    0 = none (written on its own by write_shard, or before ids existed)
                      [5..127] zeros (room for later versions)
    bytes 1024..    the n_items items, so the file is exactly 1024 + n_items * itemsize bytes

read_shard() memory-maps the items (no copy, a 10 GB shard opens instantly) after checking all of the
above, so a truncated download, a half-written file or some other .bin fails with one clear line.
write_shard() writes a temp file in the same folder and renames it over the target (os.replace is atomic),
so a crash mid-write never leaves a half shard behind under the real name. write_prepared() does that for a
whole preparation (train.bin, val.bin, masks, template.txt): every temp file first, the renames last, so an
interrupted prepare.py leaves the old set in place (or, killed between two renames, a set with two
different prep_ids, which train.py refuses), never a new train.bin silently paired with an old val.bin.

Preparation (used by data/*/prepare.py):

    docs = [read_text(path) for path in text_files(folder)]   # strict UTF-8, sorted file order
    prepare(docs, out_dir)                                     # -> out_dir/train.bin, out_dir/val.bin

Documents are joined with <|endoftext|> (GPT-2's document separator); the last ~10% of the characters
become the validation split, cut at a paragraph (else line, else word) end, where GPT-2's tokenizer always
splits, so train + val tokens are exactly the tokens of the whole text.
"""

import hashlib
import os
import re
import sys
import tempfile
import urllib.request

import numpy as np
from tqdm import tqdm

import tokenizer
from errors import UserError

MAGIC = int.from_bytes(b"PEFTSHRD", "little")  # 0x4452485354464550
VERSION = 1
HEADER_BYTES = 1024
HEADER_WORDS = HEADER_BYTES // 8  # 128 int64 words
KINDS = {"tokens": np.uint16, "mask": np.uint8}  # kind -> item dtype


# -----------------------------------------------------------------------------
# reading and writing shards

def _dtype(kind):
    if kind not in KINDS:
        raise ValueError(f"unknown shard kind {kind!r}; expected one of {sorted(KINDS)}")
    return np.dtype(KINDS[kind])


def _kind_of(itemsize):
    """Header itemsize -> kind name, or None if no kind has that itemsize."""
    for kind, dtype in KINDS.items():
        if np.dtype(dtype).itemsize == itemsize:
            return kind
    return None


def _prepare_hint(path):
    """How to (re)create the shard at `path`: its folder's prepare.py if there is one."""
    folder = os.path.dirname(os.path.abspath(path))
    script = os.path.join(folder, "prepare.py")
    if os.path.exists(script):
        return f"python {os.path.relpath(script)}"
    return f"python data/<name>/prepare.py --out_dir {folder}"


def write_shard(path, array, kind="tokens"):
    """Write a 1-D array of token ids (kind="tokens") or 0/1 loss-mask values (kind="mask") to `path`."""
    os.replace(_write_temp(path, array, kind), path)  # atomic: readers see the old file or the new one


def _write_temp(path, array, kind="tokens", prep_id=0):
    """Write the shard for `path` to a temp file beside it (fsynced) and return the temp file's name."""
    dtype = _dtype(kind)
    arr = np.asarray(array)
    if arr.ndim != 1:
        raise ValueError(f"write_shard wants a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise UserError(f"cannot write {path}: no {kind} to write (is the input text empty?)")
    if arr.dtype.kind not in "iub":  # ints, unsigned ints, bools only: never silently truncate floats
        raise ValueError(f"write_shard wants integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    top = 1 if kind == "mask" else np.iinfo(dtype).max  # a mask is 0/1; token ids must fit uint16
    if lo < 0 or hi > top:
        raise UserError(f"cannot write {path}: {kind} values must lie in [0, {top}], got [{lo}, {hi}]")
    header = np.zeros(HEADER_WORDS, dtype="<i8")
    header[:5] = [MAGIC, VERSION, arr.size, dtype.itemsize, prep_id]
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header.tobytes())
            f.write(arr.astype(dtype.newbyteorder("<"), copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600 (owner only); a shard is ordinary data
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp


def _is_shard(path):
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little") == MAGIC


def check_prepare_out(out_dir, names):
    """Before any work: out_dir can be written, and each of `names` there is either absent or a shard this
    repo wrote (re-running prepare.py replaces its own earlier shards; anyone else's file is refused)."""
    import outputs
    outputs.check_output(out_dir, overwrite=True, folder=True, key="--out_dir", what="prepared data")
    for name in names:
        outputs.check_output(os.path.join(out_dir, name), overwrite=True, key="--out_dir",
                             ours=_is_shard if name.endswith(".bin") else None)


def write_prepared(out_dir, arrays, texts=None):
    """Publish a whole preparation in out_dir: arrays = {name: (array, kind)} shards, texts = {name: str}
    small text files (template.txt). All are written to temp files first and renamed at the end, and every
    shard carries the same prep_id, a hash of all of them (so preparing the same text again gives the same
    id). Returns the prep_id."""
    h = hashlib.sha256()
    for name, (array, kind) in sorted(arrays.items()):
        h.update(f"{name}:{kind}:".encode())
        h.update(np.ascontiguousarray(np.asarray(array).astype(_dtype(kind))).tobytes())
    prep_id = int.from_bytes(h.digest()[:8], "little") >> 1 or 1  # a positive int64, never 0
    os.makedirs(out_dir, exist_ok=True)
    temps = {}
    try:
        for name, (array, kind) in arrays.items():
            temps[name] = _write_temp(os.path.join(out_dir, name), array, kind, prep_id)
        for name, text in (texts or {}).items():
            temps[name] = tmp = os.path.join(out_dir, f".{name}.tmp-{os.getpid()}")
            with open(tmp, "w") as f:
                f.write(text)
        for name, tmp in list(temps.items()):  # the publish step: renames only, a few microseconds
            os.replace(tmp, os.path.join(out_dir, name))
            del temps[name]
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
    return prep_id


def preparation_id(path):
    """The prep_id in the header of the shard at `path` (read_shard it first), 0 if it has none."""
    with open(path, "rb") as f:
        return int(np.frombuffer(f.read(HEADER_BYTES), dtype="<i8")[4])


def check_same_preparation(paths):
    """One clear line unless the shards at `paths` (train.bin, val.bin, masks) come from one preparation.
    Returns their prep_id (0: shards written without one, e.g. before prep_ids existed)."""
    ids = {path: preparation_id(path) for path in paths}
    if len(set(ids.values())) > 1:
        (a, ia), (b, ib) = sorted(ids.items(), key=lambda kv: kv[1])[::len(ids) - 1]
        raise UserError(f"{a} and {b} come from different preparations (prep_id {ia:x} and {ib:x}: an interrupted "
                        f"or partial prepare.py?); re-run {_prepare_hint(a)}")
    return next(iter(ids.values()))


def read_shard(path, kind="tokens"):
    """Memory-map the items of the shard at `path` (read-only np.memmap, uint16 tokens or uint8 mask)."""
    dtype = _dtype(kind)
    if not os.path.exists(path):
        raise UserError(f"missing shard {path}; create it with: {_prepare_hint(path)}")
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not a shard file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < 8 or int.from_bytes(head[:8], "little") != MAGIC:
        raise UserError(f"{path} is not a token shard written by this repo (bad magic); "
                        f"re-run prepare.py ({_prepare_hint(path)})")
    if len(head) < HEADER_BYTES:
        raise UserError(f"{path} is truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header; "
                        f"re-run {_prepare_hint(path)}")
    header = np.frombuffer(head, dtype="<i8")
    version, n_items, itemsize = (int(x) for x in header[1:4])
    if version != VERSION:
        raise UserError(f"{path} is a version {version} shard, this code reads version {VERSION}; "
                        f"re-run {_prepare_hint(path)}")
    if itemsize != dtype.itemsize:
        found = _kind_of(itemsize)
        if found is None:
            raise UserError(f"{path} has itemsize {itemsize}, which is no shard kind of this repo; "
                            f"re-run {_prepare_hint(path)}")
        raise UserError(f"{path} is a {found} shard, expected a {kind} shard")
    expected = HEADER_BYTES + n_items * itemsize
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise UserError(f"{path} is {what}: expected {expected} bytes ({n_items} items), found {size}; "
                        f"re-run {_prepare_hint(path)}")
    if n_items == 0:
        raise UserError(f"{path} holds no items; re-run {_prepare_hint(path)} on a longer text")
    return np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r", offset=HEADER_BYTES, shape=(n_items,))


# -----------------------------------------------------------------------------
# text -> train.bin / val.bin

def read_text(path):
    """Read a UTF-8 text file. Drops a byte order mark and turns Windows line ends (\\r\\n) into \\n,
    so the same text saved on any OS gives the same tokens."""
    if not os.path.exists(path):
        raise UserError(f"no such file: {path}")
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; give a text file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text: invalid byte 0x{data[e.start]:02x} at byte offset "
                        f"{e.start}; convert it first, e.g. iconv -f latin1 -t utf-8 in.txt > out.txt") from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def read_records(path):
    """Read a list of records (dicts) from a .json (a list of objects), .jsonl (one object per line) or
    .parquet file: the forms the Hugging Face Hub serves datasets in. Any error is one line naming the file."""
    import json
    if not os.path.exists(path):
        raise UserError(f"no such file: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"reading {path} needs pyarrow: pip install pyarrow (or give a .json/.jsonl file)") from None
        try:
            records = pq.read_table(path).to_pylist()
        except Exception as e:
            raise UserError(f"{path} is not a readable parquet file ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    elif ext in (".json", ".jsonl"):
        text = read_text(path)
        try:
            if ext == ".json":
                records = json.loads(text)
            else:
                records = []
                for line_no, line in enumerate(text.split("\n"), 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise UserError(f"{path} line {line_no} is not valid JSON: {e.msg} (column {e.colno})") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    else:
        raise UserError(f"{path}: expected a .json, .jsonl or .parquet file")
    if isinstance(records, dict):  # {"train": [...]} or {"data": [...]}: one list inside
        lists = [v for v in records.values() if isinstance(v, list)]
        records = lists[0] if len(lists) == 1 else records
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a list of records (JSON objects), found a {type(records).__name__}")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise UserError(f"{path}: record {i} is a {type(rec).__name__}, expected a JSON object")
    return records


def text_files(folder):
    """The *.txt files of `folder`, in sorted order (so every machine builds the same corpus)."""
    names = sorted(name for name in os.listdir(folder) if name.endswith(".txt"))
    if not names:
        raise UserError(f"no .txt files in {folder}")
    return [os.path.join(folder, name) for name in names]


def download_text(url, timeout=10.0):
    """Fetch a UTF-8 text from `url`, or return None (after printing one line) on any network trouble."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode("utf-8").replace("\r\n", "\n")
    except Exception as e:  # no network, DNS failure, timeout, HTTP error, bad bytes: all mean "fall back"
        reason = " ".join(str(e).split())  # keep it on one line
        print(f"could not download {url} ({type(e).__name__}: {reason}); using the bundled texts instead")
        return None


# Places where GPT-2's pre-tokenizer always cuts, so encode(a + b) == encode(a) + encode(b) for a/b split
# there: between a non-space and a newline or space. The piece ending at the non-space cannot grow into
# the whitespace, and `a` ending on a non-space means none of a's pieces looks past the cut (cutting right
# AFTER whitespace is not safe: "\n\n" at the very end of a string is one token, mid-text it is two).
# Strongest first: before a blank line, before a line break, before a space.
BOUNDARIES = [re.compile(r"(?<=\S)(?=\n\n)"), re.compile(r"(?<=\S)(?=\n)"), re.compile(r"(?<=\S)(?= )")]
CHUNK_CHARS = 1 << 16  # tokenize big texts ~64K characters at a time (progress bar, bounded memory)


def _chunks(text, size=CHUNK_CHARS):
    """Cut `text` into pieces of about `size` characters at line ends (safe tokenizer boundaries)."""
    start = 0
    while start < len(text):
        m = BOUNDARIES[1].search(text, start + size) if start + size < len(text) else None
        end = m.end() if m else len(text)
        yield text[start:end]
        start = end


def _encode_doc(text, pbar):
    """Tokenize one document chunk by chunk; the result equals tokenizer.encode(text)."""
    parts = []
    for chunk in _chunks(text):
        parts.append(np.array(tokenizer.encode(chunk), dtype=np.uint16))  # uint16: 2 bytes a token in RAM
        pbar.update(len(chunk))
    return parts


def _split_point(text, target, slack):
    """A tokenizer-safe cut position inside `text` near character `target`, or None if `text` has none.
    Prefers a paragraph end within `slack` characters of the target, then a line end, then a word end;
    failing all three, the nearest boundary of any kind."""
    lo, hi = max(1, target - slack), min(len(text) - 1, target + slack)
    for pattern in BOUNDARIES:
        near = [m.start() for m in pattern.finditer(text, lo, min(len(text), hi + 3)) if lo <= m.start() <= hi]
        if near:
            return min(near, key=lambda c: abs(c - target))
    anywhere = [m.start() for p in BOUNDARIES for m in p.finditer(text) if 0 < m.start() < len(text)]
    return min(anywhere, key=lambda c: abs(c - target)) if anywhere else None


def split_docs(docs, val_fraction=0.1):
    """Split a list of documents into (train_docs, val_docs): the last `val_fraction` of the characters go
    to val, cut at a tokenizer-safe boundary inside the document where that point falls."""
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    total = sum(len(d) for d in docs)
    target = round(total * (1 - val_fraction))  # first character of val, counted over all documents
    slack = max(1, min(target, total - target) // 4)  # how far the cut may move: keeps 90/10 roughly 90/10
    seen = 0
    for i, doc in enumerate(docs):
        if seen + len(doc) > target:
            local = target - seen
            cut = 0 if local == 0 else _split_point(doc, local, slack)  # 0: val starts exactly at this document
            if cut is not None:
                return docs[:i] + ([doc[:cut]] if cut else []), [doc[cut:]] + docs[i + 1:]
            # no boundary at all in this document (one long word?): put all of it on the nearer side
            options = [(docs[:i], docs[i:]), (docs[:i + 1], docs[i + 1:])]
            if local > len(doc) / 2:
                options.reverse()
            for train_docs, val_docs in options:
                if train_docs and val_docs:
                    return train_docs, val_docs
            break
        seen += len(doc)
    raise UserError(f"the text ({total} characters) is too short to split into train and val; "
                    f"give at least a few lines of text")


def encode_docs(docs, desc="tokenizing"):
    """Tokenize documents and join them with EOT: doc0 EOT doc1 EOT ... docN. Returns a uint16 array."""
    total = sum(len(d) for d in docs)
    parts = []
    with tqdm(total=total, desc=desc, unit="char", unit_scale=True, disable=total < 4 * CHUNK_CHARS) as pbar:
        for i, doc in enumerate(docs):
            if i:
                parts.append(np.array([tokenizer.EOT], dtype=np.uint16))
            parts.extend(_encode_doc(doc, pbar))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def prepare(docs, out_dir, val_fraction=0.1):
    """Text (one string, or a list of documents) -> out_dir/train.bin and out_dir/val.bin.
    Prints the token count of each and returns (train_ids, val_ids)."""
    if isinstance(docs, str):
        docs = [docs]
    docs = [d for d in docs if d]
    if not docs:
        raise UserError("the text is empty; nothing to prepare")
    train_docs, val_docs = split_docs(docs, val_fraction)
    train_ids = encode_docs(train_docs, desc="tokenizing train")
    val_ids = encode_docs(val_docs, desc="tokenizing val")
    if len(train_ids) == 0 or len(val_ids) == 0:
        raise UserError("the text is too short to split into train and val; give at least a few lines")
    write_prepared(out_dir, {"train.bin": (train_ids, "tokens"), "val.bin": (val_ids, "tokens")})
    print(f"train has {len(train_ids):,} tokens")
    print(f"val has {len(val_ids):,} tokens")
    print(f"wrote train.bin and val.bin to {out_dir}")
    sys.stdout.flush()
    return train_ids, val_ids


def prepare_cli(description, texts_dir, out_dir, url=None, argv=None):
    """The command line shared by data/*/prepare.py: pick the text (--input file, else a download from
    `url` unless --offline, else the bundled texts_dir/*.txt) and prepare train.bin/val.bin from it."""
    import argparse
    import configurator
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    configurator.one_line_argparse(parser)
    parser.add_argument("--input", metavar="FILE", help="prepare this UTF-8 text file instead of the default corpus")
    parser.add_argument("--out_dir", default=out_dir, help="where to write train.bin and val.bin (default: %(default)s)")
    parser.add_argument("--offline", action="store_true",
                        help="do not try to download; use the bundled texts" if url else "accepted for symmetry: this corpus is bundled, nothing is downloaded")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="share of the text (its end) used for validation")
    args = parser.parse_args(argv)
    configurator.check_args(args, {"input": configurator.PATH, "out_dir": configurator.PATH, "val_fraction": "(0, 1)"})
    check_prepare_out(args.out_dir, ["train.bin", "val.bin"])  # before any download or tokenizing

    if args.input:
        print(f"preparing {args.input}")
        docs = [read_text(args.input)]
    else:
        text = download_text(url) if url and not args.offline else None
        if text is not None:
            print(f"preparing {url}")
            docs = [text]
        else:
            files = text_files(texts_dir)
            where = os.path.relpath(texts_dir, os.path.dirname(os.path.abspath(__file__)))  # from the repo root
            print(f"preparing the {len(files)} bundled texts in {where}")
            docs = [read_text(path) for path in files]  # one document per file, joined by <|endoftext|>
    prepare(docs, args.out_dir, args.val_fraction)
