"""`mtp-spec train`: joint training of a main model and its MTP layer, as the DeepSeek-V3 report does.

    L = L_main + lambda * L_mtp     lambda = 0.3 for the first 2/3 of the steps, then 0.1
    L_mtp: for position i, the MTP layer sees (h_i, t_{i+1}) and predicts t_{i+2}
    auxiliary-loss-free balancing: after each step every expert's router bias moves by gamma
    against its load (up if under-loaded, down if over-loaded); the bias only steers selection
    AdamW, linear warm-up then cosine decay; bf16 autocast on CUDA (fp32 on CPUs without bf16 units)

`--mtp-only MAIN_DIR` freezes an existing main model (one without MTP, say) and trains a fresh MTP
layer on its hidden states. A killed run resumes from its last saved state (safetensors + JSON).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mtp_spec.config import ModelArgs
from mtp_spec.model import Transformer
from mtp_spec.model.moe import Gate


@dataclass
class TrainConfig:
    out: str
    preset: str = "mtp-spec-small"
    steps: int = 600
    batch: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    mtp_lambda_early: float = 0.3
    mtp_lambda_late: float = 0.1
    bias_gamma: float = 1e-3
    seed: int = 0
    save_every: int = 50
    vocab_size: int = 8192
    mtp_only: str | None = None
    corpus: str | None = None  # a train.txt; default: build the stdlib corpus into OUT/corpus
    tokenizer: str | None = None  # a dir with tokenizer.json; default: train one into OUT/tokenizer
    device: str = "cpu"
    max_docs: int = 0  # 0: all (tests use a few)


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def mtp_lambda(cfg: TrainConfig, step: int) -> float:
    return cfg.mtp_lambda_early if step < cfg.steps * 2 // 3 else cfg.mtp_lambda_late


def losses(model: Transformer, x: torch.Tensor, frozen_main: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Main next-token loss and the MTP loss (predicting t_{i+2} from h_i and t_{i+1})."""
    inp, tgt = x[:, :-1], x[:, 1:]
    with torch.set_grad_enabled(not frozen_main and torch.is_grad_enabled()):
        out = model(inp)
    main = F.cross_entropy(out.logits.flatten(0, 1).float(), tgt.flatten())
    h = out.hidden_states if model.mtp.hidden_input == "post" else out.prenorm_hidden
    mtp_logits = model.mtp(inp[:, 1:], h[:, :-1]).logits
    mtp = F.cross_entropy(mtp_logits.flatten(0, 1).float(), x[:, 2:].flatten())
    return main, mtp


def balance_experts(model: torch.nn.Module, gamma: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing: b_e += gamma * sign(mean load - load_e)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Gate) and m.bias is not None and getattr(m, "load", None) is not None:
                m.bias += gamma * torch.sign(m.load.float().mean() - m.load.float())


def batch_at(tokens: np.ndarray, cfg: TrainConfig, step: int) -> torch.Tensor:
    """Random windows, a pure function of (seed, step): a resumed run sees the same data."""
    g = np.random.default_rng([cfg.seed, step])
    starts = g.integers(0, len(tokens) - cfg.seq_len - 1, size=cfg.batch)
    return torch.from_numpy(np.stack([tokens[s:s + cfg.seq_len + 1] for s in starts]).astype(np.int64))


# --- state -------------------------------------------------------------------------------------------
def save_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, extra: dict) -> None:
    # clone: tied weights (the MTP layer's embedding and head) share storage, which safetensors refuses
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items() if v is not None}
    st = opt.state_dict()
    for idx, s in st["state"].items():
        for k, v in s.items():
            tensors[f"opt.{idx}.{k}"] = v.detach().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp.with_suffix(".safetensors.tmp")))
    os.replace(tmp.with_suffix(".safetensors.tmp"), path.with_suffix(".safetensors"))
    meta = {"step": step, "param_groups": st["param_groups"], **extra}
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, path.with_suffix(".json"))


def load_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    tensors = load_file(str(path.with_suffix(".safetensors")))
    meta = json.loads(path.with_suffix(".json").read_text())
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


# --- data and model --------------------------------------------------------------------------------
def prepare_data(cfg: TrainConfig, out: Path):
    from mtp_spec.tokenizer import TextTokenizer
    from mtp_spec.train import corpus
    from mtp_spec.train.tokenizer import train_tokenizer

    manifest = None
    if cfg.corpus:
        train_txt = Path(cfg.corpus)
    else:
        train_txt = out / "corpus" / "train.txt"
        if not train_txt.exists():
            manifest = corpus.build(out / "corpus")
    docs = corpus.train_documents(train_txt)
    if cfg.max_docs:
        docs = docs[: cfg.max_docs]
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer(docs, tok_dir, cfg.vocab_size)
    tok = TextTokenizer(tok_dir)
    cache = out / "tokens.npy"
    if cache.exists():
        tokens = np.load(cache, allow_pickle=False)
    else:
        eos = tok.eos_id
        ids: list[int] = []
        for enc in tok.tok.encode_batch(docs, add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eos)
        tokens = np.asarray(ids, dtype=np.int32)
        np.save(cache, tokens, allow_pickle=False)
    if len(tokens) < cfg.seq_len + 2:
        raise ValueError(f"{train_txt}: the corpus has {len(tokens)} tokens, fewer than seq_len + 2")
    if manifest is None and (out / "corpus" / "corpus.json").exists():
        manifest = json.loads((out / "corpus" / "corpus.json").read_text())
    return tokens, tok, tok_dir, manifest


def build_model(cfg: TrainConfig, tok_vocab: int) -> tuple[Transformer, ModelArgs]:
    from mtp_spec.random_model import init_random

    if cfg.mtp_only:
        import mtp_spec

        base = mtp_spec.load(cfg.mtp_only, dtype=torch.float32, part="main", max_len=cfg.seq_len + 8)
        args = base.args.with_(n_mtp_layers=max(1, base.args.n_mtp_layers))
        model = Transformer(args, max_len=cfg.seq_len + 8)
        init_random(model, cfg.seed)
        model.load_state_dict(base.state_dict(), strict=False)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("mtp."))
    else:
        args = ModelArgs.from_name(cfg.preset)
        model = init_random(Transformer(args, max_len=cfg.seq_len + 8), cfg.seed)
    if args.vocab_size < tok_vocab:
        raise ValueError(f"config field 'vocab_size' ({args.vocab_size}) is smaller than the tokenizer's "
                         f"vocabulary ({tok_vocab}): the model cannot embed every token")
    for layer in model.mtp.layers:  # the MTP layer shares the embedding and the output head (as in V3)
        layer.embed, layer.head = model.embed, model.head
    return model.to(cfg.device), args


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train, resuming from OUT/train_state.* when present; export the model to OUT/model."""
    from tqdm import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    saved_cfg = out / "train_config.json"
    if saved_cfg.exists() and json.loads(saved_cfg.read_text()) != asdict(cfg):
        raise ValueError(f"{saved_cfg}: differs from this run's settings; use another --out to start afresh")
    saved_cfg.write_text(json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    tokens, tok, tok_dir, manifest = prepare_data(cfg, out)
    model, args = build_model(cfg, tok.tok.get_vocab_size())
    model.train()
    params = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("gate.bias")]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    for n, p in model.named_parameters():
        if n.endswith("gate.bias"):
            p.requires_grad_(False)
    state = out / "train_state"
    step = 0
    if state.with_suffix(".json").exists():
        step = load_state(state, model, opt)["step"]
        print(f"[train] resuming {out} at step {step}", file=sys.stderr)
    log_path = out / "loss.csv"
    if step == 0 or not log_path.exists():
        log_path.write_text("step,loss,main_loss,mtp_loss,lr,mtp_lambda,tokens_per_s\n")
    _truncate_log(log_path, step)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.device.startswith("cuda") else _null()
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="train", dynamic_ncols=True)
    while step < cfg.steps:
        t0 = time.perf_counter()
        lr = lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        x = batch_at(tokens, cfg, step).to(cfg.device)
        with autocast:
            main, mtp = losses(model, x, frozen_main=bool(cfg.mtp_only))
        lam = mtp_lambda(cfg, step)
        loss = mtp if cfg.mtp_only else main + lam * mtp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        balance_experts(model, cfg.bias_gamma)
        step += 1
        tps = x.numel() / (time.perf_counter() - t0)
        with open(log_path, "a", newline="") as fh:
            csv.writer(fh).writerow([step, f"{loss.item():.5f}", f"{main.item():.5f}", f"{mtp.item():.5f}",
                                     f"{lr:.3e}", lam, f"{tps:.0f}"])
        bar.set_postfix(main=f"{main.item():.3f}", mtp=f"{mtp.item():.3f}", tok_s=f"{tps:.0f}")
        bar.update(1)
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_state(state, model, opt, step, {})
    bar.close()
    plot_losses(log_path, out / "loss.png")
    return export(model, args, out, tok_dir, cfg, manifest)


def export(model: Transformer, args: ModelArgs, out: Path, tok_dir: Path, cfg: TrainConfig, manifest) -> Path:
    """The trained model in DeepSeek's layout: FP8 projections with block scales, BF16 elsewhere, the
    MTP layer's embedding and head stored again under its own names."""
    from mtp_spec.checkpoint import hf_state_dict, write_checkpoint

    model.eval()
    ship = args.with_(fp8=True, torch_dtype="bfloat16")
    files = {f: (tok_dir / f).read_text() for f in ("tokenizer.json", "tokenizer_config.json")}
    rows = list(csv.DictReader(open(out / "loss.csv")))
    files["training.json"] = json.dumps({
        "command": "mtp-spec train " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items()
                                                if v is not None and k != "out") + f" --out {cfg.out}",
        "config": asdict(cfg), "seed": cfg.seed, "python": sys.version.split()[0], "torch": torch.__version__,
        "final": rows[-1] if rows else None, "mtp_hidden_input": model.mtp.hidden_input,
        "corpus": {k: v for k, v in (manifest or {}).items() if k != "held_out"},
    }, indent=2)
    return write_checkpoint(hf_state_dict(model, args), ship, out / "model", dtype=torch.bfloat16,
                            extra_files=files)


def plot_losses(log_path: Path, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = list(csv.DictReader(open(log_path)))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [float(r["main_loss"]) for r in rows], label="main")
    ax.plot(steps, [float(r["mtp_loss"]) for r in rows], label="MTP (t+2)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _truncate_log(path: Path, step: int) -> None:
    """Drop rows logged after the last saved state (a kill between saves), so none repeat on resume."""
    lines = path.read_text().splitlines(keepends=True)
    keep = [ln for i, ln in enumerate(lines) if i == 0 or int(ln.split(",")[0]) <= step]
    path.write_text("".join(keep))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
