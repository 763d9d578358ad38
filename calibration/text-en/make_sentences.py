"""Rebuild sentences.txt and provenance.tsv (run by hand; nothing at run time needs it).

Sources (see README.md): Jane Austen's six novels as shipped in Debian's `r-cran-janeaustenr`
(texts from Project Gutenberg, public domain; package MIT) and docstrings of CPython's standard
library (PSF License). Usage, from this folder, on a Debian machine:

    apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*_all.deb deb/
    python3 make_sentences.py deb/usr/lib/R/site-library/janeaustenr/data

The script is deterministic: the same inputs and Python minor version give the same files.
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import random
import re
import struct
import sys
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOVELS = {"emma": "Emma", "mansfieldpark": "Mansfield Park", "northangerabbey": "Northanger Abbey",
          "persuasion": "Persuasion", "prideprejudice": "Pride and Prejudice",
          "sensesensibility": "Sense and Sensibility"}
PER_NOVEL = 60
PY_SENTENCES = 140
STDLIB = ["argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
          "contextlib", "copy", "csv", "datetime", "decimal", "difflib", "email", "fractions", "functools",
          "gzip", "hashlib", "heapq", "html", "http.client", "imaplib", "inspect", "io", "ipaddress",
          "itertools", "json", "logging", "mailbox", "math", "multiprocessing", "os", "pathlib", "pickle",
          "queue", "random", "re", "sched", "secrets", "selectors", "shutil", "signal", "smtplib", "socket",
          "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
          "time", "timeit", "tkinter", "turtle", "unittest", "urllib.parse", "uuid", "wave", "weakref",
          "zipfile", "zoneinfo"]


# --- R's serialization (XDR), just enough for the character vectors janeaustenr stores -----------

class _RReader:
    def __init__(self, data: bytes):
        self.b, self.i, self.refs = data, 0, []

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return v

    def raw(self, n: int) -> bytes:
        self.i += n
        return self.b[self.i - n:self.i]

    def header(self) -> None:
        if self.raw(2) != b"X\n":
            raise ValueError("not an XDR R serialization")
        version = self.int()
        self.int(), self.int()
        if version == 3:
            self.raw(self.int())

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 242):  # NULL, empty env
            return None
        if kind == 255:  # reference
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if kind == 1:  # symbol
            sym = self.item()
            self.refs.append(sym)
            return sym
        if kind == 9:  # CHARSXP
            n = self.int()
            return None if n == -1 else self.raw(n).decode("utf-8")
        if kind == 2:  # pairlist -> dict
            out = {}
            while True:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else None
                out[tag] = self.item()
                nxt = self.int()
                if nxt & 0xFF == 254:
                    return out
                has_attr, has_tag = nxt & (1 << 9), nxt & (1 << 10)
        n = self.int()
        if kind in (16, 19):  # character vector, list
            value = [self.item() for _ in range(n)]
        elif kind in (10, 13):
            value = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
        elif kind == 14:
            value = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        else:
            raise ValueError(f"R type {kind} not supported")
        attrs = self.item() if has_attr else None
        if kind == 19 and attrs and "names" in attrs:
            return dict(zip(attrs["names"], value))
        return value


def read_novels(data_dir: Path) -> dict[str, list[str]]:
    r = _RReader(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
    r.header()
    index = r.item()["variables"]
    blob = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name in NOVELS:
        off, n = (int(x) for x in index[name])
        rr = _RReader(zlib.decompress(blob[off + 4:off + n]))
        rr.header()
        out[name] = rr.item()
    return out


# --- sentence splitting and cleaning ------------------------------------------------------------

_SPLIT = re.compile(r'(?<=[.!?])["\u201d\']?\s+(?=["\u201c\']?[A-Z])')
_ABBREV = re.compile(r"\b(Mr|Mrs|Ms|Dr|St|Col|Capt|Sir|Rev|Gen|No|e\.g|i\.e|etc|vs)\.$")


def split_sentences(paragraph: str) -> list[str]:
    parts, out = _SPLIT.split(paragraph), []
    for part in parts:
        if out and _ABBREV.search(out[-1]):
            out[-1] += " " + part
        else:
            out.append(part)
    return [s.strip() for s in out]


def clean(s: str) -> str:
    s = s.replace("_", "").replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    s = re.sub(r"\s+", " ", s).strip()
    if s.count('"') % 2:  # a quotation split across sentences: drop the stray mark
        s = s.replace('"', "")
    return s.strip()


def good(s: str, lo: int = 4, hi: int = 60) -> bool:
    words = s.split()
    return (lo <= len(words) <= hi and (s[0].isupper() or s[:1] == '"') and s[-1] in '.!?"'
            and not re.search(r"[\[\]{}<>|#@*=\\]", s))


def paragraphs(lines: list[str]) -> list[str]:
    """The novel's paragraphs from its first chapter on (front matter and editors' notes dropped)."""
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"(CHAPTER|Chapter) (1|I)\.?", line.strip()))
    paras, cur = [], []
    for line in lines[start + 1:]:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return [p for p in paras if not re.fullmatch(r"(CHAPTER|Chapter|VOLUME)\b.*", p)]


def stratified(rng: random.Random, items: list, k: int, key) -> list:
    """k items spread over the length range: sample evenly from length quintiles."""
    items = sorted(items, key=key)
    buckets = [items[i * len(items) // 5:(i + 1) * len(items) // 5] for i in range(5)]
    picked = []
    for i, b in enumerate(buckets):
        picked += rng.sample(b, k // 5 + (1 if i < k % 5 else 0))
    return picked


def austen(data_dir: Path, rng: random.Random) -> list[tuple[str, str]]:
    out = []
    for name, lines in read_novels(data_dir).items():
        cands = []
        for para_no, para in enumerate(paragraphs(lines)):
            for s in split_sentences(para):
                s = clean(s)
                if good(s):
                    cands.append((s, f"Jane Austen, {NOVELS[name]} (paragraph {para_no})"))
        out += stratified(rng, sorted(set(cands)), PER_NOVEL, key=lambda c: len(c[0]))
    return out


def python_docs(rng: random.Random) -> list[tuple[str, str]]:
    cands = set()
    for modname in STDLIB:
        try:
            mod = importlib.import_module(modname)
        except ImportError:  # e.g. tkinter without Tk
            continue
        objs = [(modname, mod)] + [(f"{modname}.{n}", o) for n, o in sorted(vars(mod).items())
                                   if not n.startswith("_") and (inspect.isfunction(o) or inspect.isclass(o))
                                   and getattr(o, "__module__", "") == mod.__name__]
        for qual, obj in objs:
            doc = inspect.getdoc(obj) or ""
            for para in doc.split("\n\n"):
                if re.search(r">>>|::|^\s{2,}", para, re.MULTILINE):
                    continue
                for s in split_sentences(" ".join(para.split())):
                    s = clean(s)
                    if good(s, lo=6, hi=45) and not re.search(r"[()`'\"_/%$]|\w\.\w", s):
                        cands.add((s, f"Python {sys.version_info[0]}.{sys.version_info[1]} docstring of {qual}"))
    return stratified(rng, sorted(cands), PY_SENTENCES, key=lambda c: len(c[0]))


def main(data_dir: str) -> None:
    rng = random.Random(20261123)
    rows = austen(Path(data_dir), rng) + python_docs(rng)
    seen, unique = set(), []
    for s, src in rows:
        if s not in seen:
            seen.add(s)
            unique.append((s, src))
    rng.shuffle(unique)  # so that any prefix (--max-samples) mixes sources and lengths
    (HERE / "sentences.txt").write_text("".join(s + "\n" for s, _ in unique), encoding="utf-8")
    (HERE / "provenance.tsv").write_text(
        "line\tsource\n" + "".join(f"{i}\t{src}\n" for i, (_, src) in enumerate(unique, 1)), encoding="utf-8")
    print(f"{len(unique)} sentences")


if __name__ == "__main__":
    main(sys.argv[1])
