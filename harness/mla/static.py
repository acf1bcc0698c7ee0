"""Greedy decoding on a preallocated cache, one CUDA graph per step (original or converted models).

Why: at batch 1 a decode step is ~1,000 small kernel launches through the HF modules, and the GPU
idles between them (launch-bound: 13-27 tok/s where the memory-bound floor is ~200, results/bench).
A CUDA graph replays the whole step with one launch. A graph needs every tensor at a fixed address
and no host synchronisation inside the step, so:
  * the cache is a transformers `StaticCache`, written in place: a converted layer stores its latent
    and rotated RoPE keys there (exactly the accounted elements per slot), the original its K/V;
  * the attention mask is a preallocated (B, 1, 1, max_len) buffer passed as a 4D mask
    (transformers uses a 4D mask as it is), and the step switches on the slot it writes;
  * position ids, the slot index and the next input token are device buffers advanced inside the
    step (the greedy argmax too).
The same step serves the original model (its SDPA attention over the static K/V) and a converted
one (the fused latent-decode kernel on the absorbed path), so their speeds are comparable.
Full-attention models only: sliding-window layers keep a rolling window that one mask cannot cover.
"""
from __future__ import annotations

import contextlib

import torch

from harness.errors import HarnessError
from harness.kernels import decode_tuning
from harness.mla.cache import CACHE_ARG


def _has_sliding_layers(config) -> bool:
    types = getattr(config, "layer_types", None) or []
    return bool(getattr(config, "sliding_window", None) and (not types or "sliding_attention" in types))


class StaticDecoder:
    """Greedy decode steps over a transformers `StaticCache`, optionally replayed from a CUDA graph.

    Usage:
        cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens + 2)
        dec = StaticDecoder(model, cache, batch)
        dec.prefill(input_ids)               # or fill the cache yourself, then dec.start(next_ids, filled)
        dec.capture()                        # CUDA only: warm-up steps (real tokens), then record one step
        tokens = [dec.step().clone() for _ in range(n)]
    """

    def __init__(self, model, cache, batch: int):
        if _has_sliding_layers(model.config):
            raise HarnessError("StaticDecoder supports full-attention models only (sliding-window layers keep a "
                               "rolling window); decode this model with a DynamicCache")
        self.model, self.cache, self.batch = model, cache, batch
        self.max_len = cache.layers[0].max_cache_len
        dev = next(model.parameters()).device
        long = dict(dtype=torch.long, device=dev)
        self.ids = torch.zeros(batch, 1, **long)  # next input token
        self.pos = torch.zeros(batch, 1, **long)  # its position id
        self.slot = torch.zeros(1, **long)  # the cache slot it is written to
        # bool (True = attend) for SDPA and the MLA paths; the eager kernels add a float mask.
        self._additive = model.config._attn_implementation == "eager"
        dt = next(model.parameters()).dtype
        self._on = 0.0 if self._additive else True
        self.mask = (torch.full((batch, 1, 1, self.max_len), torch.finfo(dt).min, dtype=dt, device=dev)
                     if self._additive else torch.zeros(batch, 1, 1, self.max_len, dtype=torch.bool, device=dev))
        self.filled = 0  # host-side count of written slots (no sync needed)
        self.graph = None

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt (B, T) into the empty cache; returns the first greedy token (B, 1).

        attention_mask (B, T) marks real tokens (left padding); positions count real tokens only.
        """
        B, T = input_ids.shape
        pos = None if attention_mask is None else (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                         **{CACHE_ARG: self.cache}, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        nxt_pos = None if attention_mask is None else attention_mask.long().sum(-1, keepdim=True)
        self.start(nxt, T, None if attention_mask is None else attention_mask.bool(), nxt_pos)
        return nxt

    def start(self, next_ids: torch.Tensor, filled: int, keep: torch.Tensor | None = None,
              positions: torch.Tensor | None = None) -> None:
        """Continue after `filled` cached slots: next_ids (B, 1) is the next input; keep (B, filled)
        bool marks slots to attend (default all); positions (B, 1) the next position ids (default filled)."""
        if filled >= self.max_len:
            raise HarnessError(f"the static cache holds {self.max_len} slots and {filled} are filled; "
                               "allocate it with a larger max_cache_len")
        self.ids.copy_(next_ids)
        if positions is None:
            self.pos.fill_(filled)
        else:
            self.pos.copy_(positions)
        self.slot.fill_(filled)
        off = torch.finfo(self.mask.dtype).min if self._additive else False
        self.mask.fill_(off)
        if keep is None:
            self.mask[..., :filled] = self._on
        else:
            self.mask[..., :filled].masked_fill_(keep[:, None, None, :].to(self.mask.device), self._on)
        self.filled = filled

    @torch.no_grad()
    def _step(self) -> None:
        self.mask.index_fill_(3, self.slot, self._on)
        logits = self.model(input_ids=self.ids, position_ids=self.pos, attention_mask=self.mask,
                            **{CACHE_ARG: self.cache}, use_cache=True, logits_to_keep=1).logits
        self.ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.pos.add_(1)
        self.slot.add_(1)

    def _advance(self) -> None:
        if self.filled >= self.max_len:
            raise HarnessError(f"the static cache is full ({self.max_len} slots); allocate a larger max_cache_len")
        self.filled += 1

    def capture(self, warmup: int = 2, tune: bool | None = None) -> list[torch.Tensor]:
        """Record one decode step as a CUDA graph.

        The `warmup` eager steps first (on a side stream, as CUDA graphs require) compile kernels and
        decode real tokens; they are returned, so no token is lost. tune=True: the fused decode
        kernel times its launch configurations for this shape in the first warm-up step (where none
        was tuned yet; harness.kernels.decode_config), so the graph records the fastest; None follows
        MLA_DECODE_TUNE. Tuning never runs inside the capture itself.
        """
        if not self.ids.is_cuda:
            raise HarnessError("CUDA graphs need a CUDA device; call step() without capture() on CPU")
        tokens = []
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        tuning = decode_tuning(tune) if tune is not None else contextlib.nullcontext()
        with torch.cuda.stream(side), tuning:
            for _ in range(warmup):
                self._advance()
                self._step()
                tokens.append(self.ids.clone())
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()  # recorded, not run
        return tokens

    def step(self) -> torch.Tensor:
        """Decode one token for every row; returns the (B, 1) token buffer (clone it to keep it)."""
        self._advance()
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        return self.ids
