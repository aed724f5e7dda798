"""lm: a small byte-level decoder-only transformer trained on real text available offline.

The default corpus is the source of a fixed list of Python standard-library modules (so it
depends on the Python version: the cache key includes the corpus hash); ``corpus=PATH``
trains on any text file instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hwport.errors import HwportError
from hwport.pipeline import Pipeline

STDLIB_MODULES = ("json.decoder", "textwrap", "string", "heapq", "fractions", "shlex", "csv",
                  "functools", "contextlib", "statistics", "dataclasses", "argparse")


def stdlib_corpus() -> bytes:
    """The default corpus: the source of STDLIB_MODULES, concatenated."""
    parts = []
    for name in STDLIB_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise HwportError(f"lm corpus: standard-library module {name!r} not found")
        parts.append(Path(spec.origin).read_bytes())
    return b"\n".join(parts)


def load_corpus(path: str | None) -> bytes:
    """The bytes of ``path`` (or the default corpus); errors name the file."""
    if path is None:
        return stdlib_corpus()
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise HwportError(f"lm corpus {path!r}: cannot read it ({e.strerror or e})") from None
    if len(data) < 4096:
        raise HwportError(f"lm corpus {path!r}: {len(data)} bytes; need at least 4096")
    return data


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a GELU MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // self.heads))
        mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        out: torch.Tensor = x + self.out(F.gelu(self.fc(self.ln2(x))))
        return out


class ByteLM(nn.Module):
    """Embeddings, ``layers`` blocks, a final norm and a byte classifier."""

    def __init__(self, d: int, heads: int, layers: int, context: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 256)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.head(self.ln(x))
        return logits


def pipeline(steps: int = 200, corpus: str | None = None, d_model: int = 64, heads: int = 4,
             layers: int = 2, context: int = 64, batch_size: int = 16, lr: float = 3e-3,
             eval_windows: int = 16) -> Pipeline:
    """Byte-level LM; headline metric: validation perplexity."""
    data = torch.frombuffer(bytearray(load_corpus(corpus)), dtype=torch.uint8).long()
    split = int(len(data) * 0.9)
    train, val = data[:split], data[split:]
    if len(val) <= context * eval_windows:
        raise HwportError(f"lm corpus {corpus or 'stdlib'!r}: too small for {eval_windows} "
                          f"validation windows of {context + 1} bytes")
    starts = torch.linspace(0, len(val) - context - 2, eval_windows).long()
    vx = torch.stack([val[s:s + context] for s in starts])
    vy = torch.stack([val[s + 1:s + context + 1] for s in starts])

    def batches(seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        while True:
            idx = torch.randint(0, len(train) - context - 1, (batch_size,), generator=g)
            x = torch.stack([train[i:i + context] for i in idx])
            y = torch.stack([train[i + 1:i + context + 1] for i in idx])
            yield x, y

    def loss(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        logits = m(batch[0])
        return F.cross_entropy(logits.reshape(-1, 256), batch[1].reshape(-1))

    def evaluate(m: nn.Module) -> dict[str, float]:
        val_loss = float(F.cross_entropy(m(vx).reshape(-1, 256), vy.reshape(-1)))
        return {"val_loss": val_loss,
                "perplexity": math.exp(val_loss) if val_loss < 700 else math.inf}

    digest = hashlib.sha256(data.numpy().tobytes()).hexdigest()[:12]
    return Pipeline(
        name="lm", model=lambda: ByteLM(d_model, heads, layers, context),
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr, foreach=False),
        batches=batches, loss=loss, evaluate=evaluate, predict=lambda m: m(vx),
        metric="perplexity", steps=steps,
        eval_every=max(steps // 5, 1),
        config={"corpus": digest, "d_model": d_model, "heads": heads, "layers": layers,
                "context": context, "batch_size": batch_size, "lr": lr},
    )
