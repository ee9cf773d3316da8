"""A post-hoc MTP layer for a frozen main model of either family (`mtp-spec train --mtp-only MODEL`).

The layer has DeepSeek's structure (enorm, hnorm, eh_proj, one decoder block of the model's family,
the shared embedding and head) and learns what acceptance rewards: for position i it sees the main
model's hidden state h_i and the next token t_{i+1}, and is trained to output the main model's own
choice at position i+1 (its argmax for t_{i+2}), not the corpus token.

    1. data      corpus documents (stdlib and installed packages' sources and docs, held-out modules
                 excluded) plus chat-formatted turns built from them, tokenized: tokens.npy; and,
                 with generated_tokens, the main model's own greedy answers to requests and code
                 beginnings built from the training documents (generated.npy): at inference the
                 drafter reads the model's own text, so that is the distribution to learn
    2. cache     the frozen main model runs once over the tokens in chunks; its hidden states (bf16)
                 and argmax are memory-mapped on disk, so training passes cost only the MTP layer
    3. vocab     the draft vocabulary: the N tokens the main model predicts most often (FR-Spec)
    4. train     AdamW on random windows of the cache; the held-out chunk's acceptance (MTP argmax ==
                 main argmax) is logged as the curve
    5. export    OUT/mtp.safetensors: the layer at index num_hidden_layers plus its draft vocabulary;
                 copy it into the model directory to give the model an MTP layer

Every stage writes its output atomically and resumes where it stopped.
"""

from __future__ import annotations

import csv
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mtp_spec.io import atomic_write_text


@dataclass
class PosthocConfig:
    out: str
    model: str  # the main model: a directory or a model name
    tokens: int = 1_200_000  # training tokens whose hidden states are cached
    heldout_tokens: int = 32_768
    chunk: int = 512  # tokens per main-model forward when caching
    draft_vocab: int = 8192
    steps: int = 2000
    batch: int = 8  # windows per step
    window: int = 128
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    chat_share: float = 0.35  # fraction of documents turned into chat turns
    eval_every: int = 100
    seed: int = 0
    threads: int = 0
    chained: float = 1.0  # weight of the second (chained) draft's loss; 0: the first draft only
    cache_from: str = ""  # another run dir whose tokens and cached hidden states to reuse
    init_from: str = ""  # an mtp.safetensors to start from (e.g. a layer trained without chaining)
    generated_tokens: int = 0  # the main model's own greedy answers added to the training part
    gen_share: float = 0.5  # fraction of training windows drawn from those answers
    gen_batch: int = 16
    gen_max_new: int = 128


# --- 1. data ---------------------------------------------------------------------------------------
def _package_docs(limit_bytes: int = 40_000_000) -> list[tuple[str, str]]:
    """Sources and docs of installed third-party packages (site-packages), capped, deterministic."""
    import site

    out, total = [], 0
    roots = [Path(p) for p in site.getsitepackages() + [site.getusersitepackages()] if Path(p).is_dir()]
    venv = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    if venv.is_dir():
        roots.insert(0, venv)
    seen = set()
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.suffix not in (".py", ".md", ".rst") or "test" in path.parts or not path.is_file():
                continue
            if path.name.startswith("__editable__") or "mtp_spec" in path.parts:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if not 200 <= len(text) <= 200_000 or hash(text) in seen:
                continue
            seen.add(hash(text))
            out.append((str(path.relative_to(root)), text))
            total += len(text)
            if total >= limit_bytes:
                return out
    return out


def _chat_turns(name: str, text: str, rng: random.Random) -> list[dict] | None:
    """A user request and an assistant answer built from a document: a function from its docstring,
    or an explanation of a documentation topic."""
    import re

    if name.startswith("topic:"):
        paras = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 60][:6]
        if not paras:
            return None
        q = rng.choice(["Explain {}.", "What does {} mean in Python?", "How does {} work in Python?",
                        "Can you describe {} briefly?"]).format(name[6:].replace("-", " "))
        return [{"role": "user", "content": q}, {"role": "assistant", "content": "\n\n".join(paras)}]
    funcs = list(re.finditer(r'^def (\w+)\(([^)]*)\)[^:]*:\n\s+"""(.+?)"""', text, re.M | re.S))
    if not funcs:
        return None
    m = rng.choice(funcs)
    start = m.start()
    end = text.find("\ndef ", m.end())
    body = text[start:end if end > 0 else len(text)].rstrip()[:3000]
    summary = m[3].strip().split("\n")[0].rstrip(".")
    q = rng.choice(["Write a Python function `{}({})` that {}.", "Implement `{}({})` in Python: {}.",
                    "Can you write {}({}) for me? It should {}."]).format(m[1], m[2], summary[:1].lower() + summary[1:])
    return [{"role": "user", "content": q}, {"role": "assistant", "content": f"```python\n{body}\n```"}]


def prepare_tokens(cfg: PosthocConfig, out: Path, tok) -> np.ndarray:
    """tokens.npy: documents tokenized and joined with eos, shuffled deterministically; the first
    heldout_tokens are the held-out part (their documents are never in the training part)."""
    path = out / "tokens.npy"
    if path.exists():
        return np.load(path, mmap_mode="r")
    from mtp_spec.train import corpus

    train, _ = corpus.split(corpus.stdlib_docs())
    docs = [(d.name, d.text) for d in train] + _package_docs()
    rng = random.Random(cfg.seed)
    rng.shuffle(docs)
    eos = tok.eos_id
    ids: list[int] = []
    need = cfg.tokens + cfg.heldout_tokens
    for name, text in docs:
        turns = _chat_turns(name, text, rng) if rng.random() < cfg.chat_share else None
        if turns is not None:
            piece = tok.chat(turns[:1]) + tok.encode(turns[1]["content"], add_bos=False) + [eos]
        else:
            piece = tok.encode(text[:20_000], add_bos=False) + [eos]
        ids.extend(piece)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than tokens + heldout_tokens = {need}")
    arr = np.asarray(ids[:need], dtype=np.int32)
    tmp = out / "tokens.tmp.npy"
    np.save(tmp, arr, allow_pickle=False)
    tmp.replace(path)
    return arr


@torch.no_grad()
def generate_own(cfg: PosthocConfig, out: Path, tok, model_dir: Path, progress: bool = True) -> np.ndarray:
    """generated.npy: prompt + greedy answer + eos for chat requests and code beginnings built from
    the training documents (never the held-out ones), generated in batches by our own engine.
    generated.jsonl keeps finished batches, so a kill resumes at the next batch."""
    path = out / "generated.npy"
    if path.exists():
        return np.load(path, mmap_mode="r")
    from mtp_spec.decoding.engine import Engine
    from mtp_spec.loader import load
    from mtp_spec.train import corpus

    train_docs, _ = corpus.split(corpus.stdlib_docs())
    prompts = [tok.chat(p["messages"]) for p in corpus.chat_prompts(train_docs)]
    prompts += [tok.encode(p["prompt"], add_bos=False) for p in corpus.code_prompts(train_docs)]
    from mtp_spec.loader import model_args

    room = min(1024, model_args(model_dir).max_seq_len) - cfg.gen_max_new - 8
    prompts = [p for p in prompts if len(p) <= room]  # a prompt and its answer fit the context
    random.Random(cfg.seed + 1).shuffle(prompts)
    log = out / "generated.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    total, used = sum(len(r["ids"]) for r in rows), len(rows)
    if not prompts:
        raise ValueError(f"{model_dir}: no request fits its context of {room + cfg.gen_max_new + 8} tokens")
    model = load(model_dir, max_len=max(len(p) for p in prompts) + cfg.gen_max_new + 8, compile="auto")
    engine, t0 = Engine(model), time.perf_counter()
    while total < cfg.generated_tokens:
        if used >= len(prompts):
            raise ValueError(f"{len(prompts)} prompts gave only {total} of generated_tokens {cfg.generated_tokens}")
        batch = prompts[used:used + cfg.gen_batch]
        res = engine.generate(batch, cfg.gen_max_new, eos_id=tok.eos_id)
        ends = [[] if r.token_ids[-1:] == [tok.eos_id] else [tok.eos_id] for r in res]
        new = [{"prompt_len": len(p), "ids": p + r.token_ids + e} for p, r, e in zip(batch, res, ends)]
        with open(log, "a") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in new))
        used += len(batch)
        total += sum(len(r["ids"]) for r in new)
        if progress:
            print(f"[generate] {total}/{cfg.generated_tokens} tokens, {used} prompts "
                  f"({total / (time.perf_counter() - t0):.0f} tok/s this run)", file=sys.stderr, flush=True)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    arr = np.asarray([t for r in rows for t in r["ids"]], dtype=np.int32)
    tmp = out / "generated.tmp.npy"
    np.save(tmp, arr, allow_pickle=False)
    tmp.replace(path)
    return arr


def extend_tokens(out: Path, base: np.ndarray, gen: np.ndarray, base_dir: Path, chunk: int) -> np.ndarray:
    """tokens_all.npy = base + generated. Where base_dir holds the base tokens' cached hidden states,
    the whole chunks among them are copied into this run's cache, so only the rest is computed."""
    path = out / "tokens_all.npy"
    if path.exists():
        return np.load(path, mmap_mode="r")
    n = len(base) + len(gen)
    done = base_dir / "cache_done.json"
    if base_dir != out and done.exists():
        chunks = min(json.loads(done.read_text())["chunks"], len(base) // chunk)
        old_h = np.load(base_dir / "hidden.npy", mmap_mode="r")
        old_t = np.load(base_dir / "argmax.npy", mmap_mode="r")
        hid = np.lib.format.open_memmap(out / "hidden.npy", mode="w+", dtype=np.uint16, shape=(n, old_h.shape[1]))
        top = np.lib.format.open_memmap(out / "argmax.npy", mode="w+", dtype=np.int32, shape=(n,))
        for lo in range(0, chunks * chunk, 65536):
            hi = min(chunks * chunk, lo + 65536)
            hid[lo:hi] = old_h[lo:hi]
            top[lo:hi] = old_t[lo:hi]
        hid.flush()
        top.flush()
        atomic_write_text(out / "cache_done.json", json.dumps({"chunks": chunks}))
    arr = np.concatenate([np.asarray(base), np.asarray(gen)]).astype(np.int32)
    tmp = out / "tokens_all.tmp.npy"
    np.save(tmp, arr, allow_pickle=False)
    tmp.replace(path)
    return arr


# --- 2. cache ----------------------------------------------------------------------------------------
@torch.no_grad()
def cache_hidden(cfg: PosthocConfig, out: Path, model, tokens: np.ndarray, progress: bool = True) -> None:
    """hidden.u16 (n, dim) bf16 bits of the post-norm hidden states, argmax.i32 (n,) the main model's
    choice at every position; done.json counts finished chunks (a kill resumes at the next one)."""
    n, dim = len(tokens), model.args.dim
    hid = np.lib.format.open_memmap(out / "hidden.npy", mode="r+" if (out / "hidden.npy").exists() else "w+",
                                    dtype=np.uint16, shape=(n, dim))
    top = np.lib.format.open_memmap(out / "argmax.npy", mode="r+" if (out / "argmax.npy").exists() else "w+",
                                    dtype=np.int32, shape=(n,))
    done_file = out / "cache_done.json"
    done = json.loads(done_file.read_text())["chunks"] if done_file.exists() else 0
    chunks = math.ceil(n / cfg.chunk)
    t0 = time.perf_counter()
    for c in range(done, chunks):
        lo, hi = c * cfg.chunk, min(n, (c + 1) * cfg.chunk)
        x = torch.from_numpy(np.asarray(tokens[lo:hi], dtype=np.int64))[None]
        o = model(x)
        h = o.hidden_states[0] if model.mtp is None or model.mtp.hidden_input == "post" else o.prenorm_hidden[0]
        hid[lo:hi] = h.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        top[lo:hi] = o.logits[0].argmax(-1).numpy().astype(np.int32)
        if (c + 1) % 8 == 0 or c + 1 == chunks:
            hid.flush()
            top.flush()
            atomic_write_text(done_file, json.dumps({"chunks": c + 1}))
            if progress:
                rate = (hi - done * cfg.chunk) / (time.perf_counter() - t0)
                print(f"[cache] {hi}/{n} tokens, {rate:.0f} tok/s", file=sys.stderr, flush=True)


# --- 3-5. vocabulary, layer, training ------------------------------------------------------------------
def draft_vocab(top: np.ndarray, n: int) -> torch.Tensor:
    """The n tokens the main model chooses most often, in id order."""
    counts = np.bincount(np.asarray(top), minlength=n)
    ids = np.argsort(-counts, kind="stable")[:n]
    return torch.from_numpy(np.sort(ids).astype(np.int64))


def init_layer(model) -> None:
    """Start the MTP layer from the main model's last block and final norm, with eh_proj passing the
    hidden-state half through (so the block first sees something like its usual input)."""
    layer = model.mtp.layers[0]
    last = model.layers[-1]
    layer.block.load_state_dict(last.state_dict())
    with torch.no_grad():
        dim = model.args.dim
        w = torch.zeros(dim, 2 * dim)
        w[:, dim:] = torch.eye(dim)
        w[:, :dim] = 0.02 * torch.randn(dim, dim)
        layer.eh_proj.weight.copy_(w)
        layer.head_norm.weight.copy_(model.norm.weight.float())
        layer.enorm.weight.fill_(1.0)
        layer.hnorm.weight.fill_(1.0)


def _batch(hid, top, tokens, starts: list[int], window: int):
    """Windows of: hidden states h_j, next tokens t_{j+1}, and the main model's choices at j+1 and j+2
    (the targets of the first and of the chained second draft)."""
    h = torch.stack([torch.from_numpy(np.array(hid[s:s + window]).view(np.int16)).view(torch.bfloat16)
                     for s in starts]).float()
    nxt = torch.stack([torch.from_numpy(np.asarray(tokens[s + 1:s + 1 + window], dtype=np.int64)) for s in starts])
    tgt = torch.stack([torch.from_numpy(np.asarray(top[s + 1:s + 2 + window], dtype=np.int64)) for s in starts])
    return h, nxt, tgt[:, :-1], tgt[:, 1:]


def _chain_mask(w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask and positions for [first drafts (w); chained second drafts (w)] in one forward: a second
    draft from base position j sits at position j+1 and sees the first-draft entries up to j and
    itself, as the draft step does at inference over the MTP cache."""
    ar = torch.arange(w)
    first = ar[None, :] <= ar[:, None]
    mask = torch.zeros(2 * w, 2 * w, dtype=torch.bool)
    mask[:w, :w] = first
    mask[w:, :w] = first
    mask[w:, w:] = torch.eye(w, dtype=torch.bool)
    return mask, torch.cat([ar, ar + 1])


def _loss(model, h, nxt, tgt, tgt2, vocab_index, chained: float):
    """Cross-entropy of the first draft against the main model's choice (over the draft vocabulary),
    plus `chained` times that of the second draft, made by the layer from its own output state and
    the first draft's target token, as the proposer chains it."""
    mtp = model.mtp
    vocab = mtp.layers[0].draft_vocab  # the head returns logits over these tokens (see _FrozenHead)
    if chained:
        first = mtp(nxt, h)
        w = nxt.shape[1]
        mask, pos = _chain_mask(w)
        out = mtp(torch.cat([nxt, tgt], 1), torch.cat([h, first.hidden_states], 1), tree_mask=mask,
                  positions=pos.expand(nxt.shape[0], -1))
        logits, logits2 = out.logits[:, :w], out.logits[:, w:]
    else:
        logits = mtp(nxt, h).logits
    target = vocab_index[tgt]  # -1 where the main model's choice is outside the draft vocabulary
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-1)
    if chained:
        loss = loss + chained * F.cross_entropy(logits2.flatten(0, 1), vocab_index[tgt2].flatten(), ignore_index=-1)
    acc = (vocab[logits.argmax(-1)] == tgt).float().mean()
    return loss, acc


def train(cfg: PosthocConfig, progress: bool = True) -> Path:
    from mtp_spec.checkpoint import hf_state_dict, write_mtp_file
    from mtp_spec.loader import load, resolve_model
    from mtp_spec.tokenizer import load_tokenizer

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "posthoc_config.json"
    free = {"steps", "eval_every", "threads"}  # a resumed run may be lengthened or shortened
    if saved.exists():
        old = {k: v for k, v in json.loads(saved.read_text()).items() if k not in free}
        if old != {k: v for k, v in asdict(cfg).items() if k not in free}:
            raise ValueError(f"{saved}: differs from this run's settings; use another --out to start afresh")
    atomic_write_text(saved, json.dumps(asdict(cfg), indent=2))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model_dir = resolve_model(cfg.model)
    tok = load_tokenizer(model_dir)
    if tok is None:
        raise ValueError(f"{model_dir}: post-hoc MTP training needs the model's tokenizer.json")
    data = Path(cfg.cache_from) if cfg.cache_from else out
    tokens = prepare_tokens(cfg, data, tok)
    n_docs = len(tokens)
    if cfg.generated_tokens:
        gen = generate_own(cfg, out, tok, model_dir, progress)
        tokens = extend_tokens(out, tokens, gen, data, cfg.chunk)
        data = out
    # fp32 weights (bf16 values widened exactly): chunks of many tokens are compute-bound, where
    # MKL's fp32 GEMM is fastest; the hidden states are those the bf16-weight model computes
    main = load(model_dir, dtype=torch.float32, part="main", max_len=cfg.chunk)
    cache_hidden(cfg, data, main, tokens, progress)
    hid = np.load(data / "hidden.npy", mmap_mode="r")
    top = np.load(data / "argmax.npy", mmap_mode="r")

    args = main.args.with_(n_mtp_layers=1)
    from mtp_spec.model import Transformer

    model = Transformer(args, max_len=cfg.window + 16)  # fp32; its embedding and head stay tied to the main's
    model.load_state_dict(main.state_dict(), strict=False)
    del main
    init_layer(model)
    vocab = draft_vocab(top[cfg.heldout_tokens:], cfg.draft_vocab)
    layer = model.mtp.layers[0]
    if cfg.init_from:
        from safetensors.torch import load_file

        from mtp_spec.checkpoint import from_hf_name

        sd = load_file(cfg.init_from)
        vocab = sd.pop(f"model.layers.{args.n_layers}.draft_vocab").long()
        sd = {from_hf_name(k, args).removeprefix("mtp.layers.0."): v.float() for k, v in sd.items()}
        missing, unexpected = layer.load_state_dict(sd, strict=False)
        if unexpected or any(not k.startswith(("embed", "head", "draft_vocab")) for k in missing):
            raise ValueError(f"{cfg.init_from}: not an MTP layer of this model ({unexpected or missing})")
    layer.draft_vocab = vocab
    layer.sub_head = []
    vocab_index = torch.full((args.vocab_size,), -1, dtype=torch.long)
    vocab_index[vocab] = torch.arange(len(vocab))
    head_w = model.head.weight.detach()[vocab]
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for n, p in layer.named_parameters() if not n.startswith(("embed", "head"))]
    for p in params:
        p.requires_grad_(True)
    model.mtp.layers[0].head = _FrozenHead(head_w, vocab, args.vocab_size)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)

    step, state = 0, out / "train_state.pt.safetensors"
    if state.exists():
        from safetensors.torch import load_file

        st = load_file(str(state))
        layer.load_state_dict({k[6:]: v for k, v in st.items() if k.startswith("layer.")}, strict=False)
        step = int(json.loads((out / "train_state.json").read_text())["step"])
        print(f"[train] resuming at step {step}", file=sys.stderr)
    curve = out / "curve.csv"
    if step == 0 or not curve.exists():
        curve.write_text("step,loss,train_acc,heldout_acc,heldout_both_acc,lr,tokens_per_s\n")
    lo, hi = cfg.heldout_tokens, len(tokens) - cfg.window - 3
    held = [s for s in range(0, cfg.heldout_tokens - cfg.window - 3, cfg.window)]
    while step < cfg.steps:
        t0 = time.perf_counter()
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        t = max(0.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        lr *= cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        for g in opt.param_groups:
            g["lr"] = lr
        rng = np.random.default_rng([cfg.seed, step])
        starts = rng.integers(lo, hi, size=cfg.batch).tolist()
        if n_docs < len(tokens):  # a gen_share of the windows from the model's own answers
            own = rng.random(cfg.batch) < cfg.gen_share
            starts = [int(rng.integers(n_docs, hi)) if o else int(rng.integers(lo, n_docs - cfg.window - 3))
                      for o in own]
        h, nxt, tgt, tgt2 = _batch(hid, top, tokens, starts, cfg.window)
        model.train()
        loss, acc = _loss(model, h, nxt, tgt, tgt2, vocab_index, cfg.chained)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        tps = cfg.batch * cfg.window / (time.perf_counter() - t0)
        held_acc = held_acc2 = ""
        if step % cfg.eval_every == 0 or step == cfg.steps:
            a1, a2 = heldout_acceptance(model, hid, top, tokens, held, cfg.window, vocab_index)
            held_acc, held_acc2 = f"{a1:.4f}", f"{a2:.4f}"
            _save(out, layer, step)
            if progress:
                print(f"[train] step {step}: loss {loss.item():.3f} train acc {acc.item():.3f} "
                      f"held-out acc {held_acc}, both drafts {held_acc2} ({tps:.0f} tok/s)", file=sys.stderr,
                      flush=True)
        with open(curve, "a", newline="") as fh:
            csv.writer(fh).writerow([step, f"{loss.item():.4f}", f"{acc.item():.4f}", held_acc, held_acc2,
                                     f"{lr:.2e}", f"{tps:.0f}"])
    layer.head = model.head
    sd = {k: v for k, v in hf_state_dict(model, args).items() if k.startswith(f"model.layers.{args.n_layers}.")}
    meta = {"trained_on": str(model_dir), "steps": str(cfg.steps), "tokens": str(cfg.tokens),
            "mtp_hidden_input": "post", "config": json.dumps(asdict(cfg))}
    return write_mtp_file(sd, args, out / "mtp.safetensors", torch.bfloat16, meta)


class _FrozenHead(torch.nn.Module):
    """The shared head restricted to the draft vocabulary, for training: logits over the draft
    vocabulary only (index i is token vocab[i]); the full-vocabulary scatter of inference is skipped."""

    def __init__(self, weight: torch.Tensor, vocab: torch.Tensor, size: int):
        super().__init__()
        self.register_buffer("w", weight.float())
        self.vocab, self.out_features = vocab, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w)


@torch.no_grad()
def heldout_acceptance(model, hid, top, tokens, starts: list[int], window: int, vocab_index) -> float:
    """Teacher-forced acceptance on held-out windows: how often the MTP layer's argmax equals the main
    model's choice (its first-draft acceptance rate at T=0, given the main model's hidden states), and
    how often the chained second draft is right too."""
    model.eval()
    hits = hits2 = total = 0
    mask, pos = _chain_mask(window)
    vocab = model.mtp.layers[0].draft_vocab
    for i in range(0, len(starts), 16):
        h, nxt, tgt, tgt2 = _batch(hid, top, tokens, starts[i:i + 16], window)
        first = model.mtp(nxt, h)
        right = vocab[first.logits.argmax(-1)] == tgt
        hits += int(right.sum())
        out = model.mtp(torch.cat([nxt, tgt], 1), torch.cat([h, first.hidden_states], 1), tree_mask=mask,
                        positions=pos.expand(nxt.shape[0], -1))
        hits2 += int((right & (vocab[out.logits[:, window:].argmax(-1)] == tgt2)).sum())
        total += tgt.numel()
    return hits / max(total, 1), hits2 / max(total, 1)


def _save(out: Path, layer, step: int) -> None:
    from safetensors.torch import save_file

    sd = {f"layer.{k}": v.detach().contiguous() for k, v in layer.state_dict().items()
          if not k.startswith(("embed", "head")) and v is not None}
    tmp = out / "train_state.tmp.safetensors"
    save_file(sd, str(tmp))
    tmp.replace(out / "train_state.pt.safetensors")
    atomic_write_text(out / "train_state.json", json.dumps({"step": step}))
