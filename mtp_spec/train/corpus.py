"""The training corpus every machine has: the running interpreter's standard library source and its
documentation topics (`pydoc_data`). Deterministic order, deduplicated, split by module.

Held-out modules (and topics) are never trained on: they are the prompts of the `code` and `prose`
suites. The held-out list is chosen by a hash of the module name, so it does not depend on the
interpreter's file list, and is committed as `heldout.txt` beside this file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

HELDOUT_FILE = Path(__file__).with_name("heldout.txt")
SKIP_DIRS = {"site-packages", "__pycache__", "test", "tests", "idle_test", "lib2to3"}


@dataclass
class Doc:
    name: str  # module name ("json.decoder") or "topic:<name>"
    text: str

    @property
    def is_topic(self) -> bool:
        return self.name.startswith("topic:")


def _held_out(name: str, percent: int) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < percent


def stdlib_docs(root: str | os.PathLike | None = None) -> list[Doc]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    docs, seen = [], set()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(p in SKIP_DIRS for p in rel.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        digest = hashlib.sha256(text.encode()).hexdigest()
        if not text.strip() or digest in seen:
            continue
        seen.add(digest)
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        docs.append(Doc(name, text))
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    for key in sorted(topics):
        text = topics[key]
        digest = hashlib.sha256(text.encode()).hexdigest()
        if text.strip() and digest not in seen:
            seen.add(digest)
            docs.append(Doc(f"topic:{key}", text))
    return docs


def split(docs: list[Doc], module_pct: int = 8, topic_pct: int = 25) -> tuple[list[Doc], list[Doc]]:
    """(train, held_out), by a hash of each module's (or topic's) name."""
    held = [d for d in docs if _held_out(d.name, topic_pct if d.is_topic else module_pct)]
    names = {d.name for d in held}
    return [d for d in docs if d.name not in names], held


def code_prompts(held: list[Doc], n_lines: int = 3, limit: int = 400) -> list[dict]:
    """Beginnings of functions and classes: the def/class line and the lines after it."""
    out = []
    for d in held:
        if d.is_topic:
            continue
        lines = d.text.splitlines()
        for i, line in enumerate(lines):
            if re.match(r"\s*(def|class|async def) \w+", line):
                prompt = "\n".join(lines[i:i + n_lines]) + "\n"
                if 20 <= len(prompt) <= limit:
                    out.append({"id": f"code/{d.name}:{i + 1}", "category": "code", "prompt": prompt})
    return out


def prose_prompts(held: list[Doc], limit: int = 300) -> list[dict]:
    """Paragraph openings of held-out documentation topics."""
    out = []
    for d in held:
        if not d.is_topic:
            continue
        for j, para in enumerate(p.strip() for p in d.text.split("\n\n")):
            if len(para) >= 80 and not para.startswith((" ", ">>>")):
                cut = para[:limit]
                cut = cut[: cut.rfind(" ")] if " " in cut[60:] else cut
                out.append({"id": f"prose/{d.name[6:]}:{j}", "category": "prose", "prompt": cut + " "})
    return out


def chat_prompts(held: list[Doc]) -> list[dict]:
    """Requests a user of an instruct model makes, built from held-out modules and topics: write a
    function described by its docstring, or explain a language topic. No answers: the model writes them."""
    out = []
    for d in held:
        if d.is_topic:
            topic = d.name[6:].replace("-", " ")
            out.append({"id": f"chat/{d.name[6:]}", "category": "chat",
                        "messages": [{"role": "user", "content": f"Explain {topic} in Python, with a short example."}]})
            continue
        for m in re.finditer(r'^\s*def ([a-z]\w*)\(([^)]*)\)[^:]*:\n\s+[rR]?"""([^\n]+)', d.text, re.M):
            summary = m[3].replace('"""', "").strip().rstrip(".")
            args = re.sub(r"^self,?\s*", "", " ".join(m[2].split()))
            if 15 <= len(summary) <= 160 and not summary.lower().startswith(("internal", "helper", "private")):
                ask = f"Write a Python function `{m[1]}({args})` that does this: {summary}."
                out.append({"id": f"chat/{d.name}:{m[1]}", "category": "chat",
                            "messages": [{"role": "user", "content": ask}]})
    return out


def _thin(prompts: list[dict], n: int) -> list[dict]:
    """n prompts spread evenly over the list (deterministic)."""
    if len(prompts) <= n:
        return prompts
    step = len(prompts) / n
    return [prompts[int(i * step)] for i in range(n)]


def build(out_dir: str | os.PathLike, n_prompts: int = 120, write_heldout: bool = False) -> dict:
    """Write train.txt, the prompt suites and a manifest; return the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = stdlib_docs()
    if not docs:
        raise ValueError("the corpus is empty: no standard-library sources found")
    train, held = split(docs)
    held_names = sorted(d.name for d in held)
    if write_heldout:
        HELDOUT_FILE.write_text("\n".join(held_names) + "\n")
    text = "".join(d.text + "\n<|eos|>\n" for d in train)
    (out / "train.txt").write_text(text)
    suites = {"code": _thin(code_prompts(held), n_prompts), "prose": _thin(prose_prompts(held), n_prompts)}
    for name, rows in suites.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = {
        "python": sys.version.split()[0], "n_docs": len(docs), "n_train": len(train), "n_held_out": len(held),
        "train_bytes": len(text.encode()), "corpus_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "held_out": held_names, "prompts": {k: len(v) for k, v in suites.items()},
    }
    (out / "corpus.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def train_documents(path: str | os.PathLike) -> list[str]:
    text = Path(path).read_text()
    docs = [d for d in text.split("\n<|eos|>\n") if d.strip()]
    if not docs:
        raise ValueError(f"{path}: the training corpus is empty")
    return docs


def training_texts() -> list[str]:
    """The shipped model's training documents, as `build` writes them to train.txt (held-out modules left out)."""
    docs = stdlib_docs()
    if not docs:
        raise ValueError("the corpus is empty: no standard-library sources found")
    return [d.text for d in split(docs)[0]]


def corpus_texts(paths: list[str | os.PathLike]) -> list[str]:
    """Documents from text files (a train.txt's `<|eos|>`-separated documents are split apart) and from
    directories (their *.txt, *.md and *.py files, in sorted order)."""
    docs: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".md", ".py") and f.is_file())
            if not files:
                raise ValueError(f"{p}: no .txt, .md or .py files in this directory")
        elif p.is_file():
            files = [p]
        else:
            raise ValueError(f"--corpus {p}: no such file or directory")
        for f in files:
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"--corpus {f}: not UTF-8 text") from None
            docs += [d for d in text.split("\n<|eos|>\n") if d.strip()]
    if not docs:
        raise ValueError(f"--corpus {', '.join(map(str, paths))}: no text")
    return docs
