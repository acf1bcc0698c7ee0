"""lm-eval's HFLM with each batch's continuation scores read off the device once, not per request.

Why: HFLM's `_loglikelihood_tokens` picks each request's scores apart one at a time: a tensor built on
the device for its input, an argmax and a gather over its continuation, then `float(...)` and
`bool(...)` — two or three host/device synchronisations per request. On a GPU shared by several
sweep processes (the GPUs time-slice between processes) every synchronisation waits for the other
processes' slices: on an H100, 4 processes scoring SmolLM2 made ~220 requests/s each and 14 made ~50
each, the same ~800/s in all whatever the number of processes — the synchronisations, not the
model, set the pace. Here the batch is built on the host and moved once, every request's
log-probabilities and greedy check come from one indexing of the batch's logits, and the results come
back in one transfer. The log-softmax (row-wise, as HFLM's) runs on the continuation positions only:
HFLM's runs over every position of the padded batch in float32, for Gemma-3's 262k-token vocabulary
several GB a batch. And the model's output layer runs on those positions only (transformers'
`logits_to_keep`, given the sorted positions the batch reads; the logits it gives are the full pass's
rows): Gemma-3-270M's 262k x 640 output layer costs ~335 MFLOP a token, more than its transformer
blocks (~100M weights, ~200 MFLOP), SmolLM2's 49k x 576 one about a fifth of its pass.

Everything that decides *what* is scored is lm-eval's own, unchanged: the request order and batching
(its `Collator`, its batch-size schedule), the left truncation to the model's length, the one-token
continuation cache (`group_by="contexts"`: one forward pass for requests that share context and all
but the last continuation token, each hit scored exactly as HFLM scores it, including its trailing
slice for the greedy check), the cache hook and the log-softmax dtype. Only the summation of one
request's token log-probabilities may differ in the last float bit (host instead of device sum).
`tests/test_hflm.py` checks request by request that the scores equal HFLM's.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM, find_executable_batch_size
from lm_eval.models.utils import Collator
from lm_eval.models.utils_hf import clear_torch_cache, pad_and_concat
from tqdm import tqdm


class BatchedHFLM(HFLM):
    """HFLM whose causal loglikelihood scoring synchronises with the device once per batch."""

    @functools.cached_property
    def _keeps_logits(self) -> bool:
        """Whether the model's forward takes transformers' `logits_to_keep` (every *ForCausalLM does)."""
        return "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def _detect_batch_size(self, requests=None, pos: int = 0):
        """The largest batch (up to `max_batch_size`) whose scoring pass fits, probed as it runs here.

        HFLM probes with the whole window's logits in float32: for Gemma-3's 262k vocabulary that is
        ~2 GB per 2048-token row, so on an H100 shared by 14 sweep processes it settled on 6-8 rows and
        scored at a fifth of the rate batch 32 gives. The scoring pass here keeps the output layer on
        the continuation positions only, so the probe does the same: the request's full window through
        the blocks, logits for its last (up to twice) continuation length of positions, their
        log-softmax: for a one-token continuation two positions' logits a row instead of 2048. Like
        HFLM's it shrinks on out-of-memory (accelerate's search), five passes per size.
        """
        if self.backend != "causal" or not self._keeps_logits or self.world_size > 1:
            return super()._detect_batch_size(requests, pos)
        if requests:
            _, context_enc, continuation_enc = requests[pos]
            length = len((context_enc + continuation_enc)[-(self.max_length + 1):][:-1])
            n_read = min(2 * len(continuation_enc), length)
        else:
            length = n_read = self.max_length

        @find_executable_batch_size(starting_batch_size=self.max_batch_size)
        def forward_batch(batch_size: int) -> int:
            test = torch.ones((batch_size, length), dtype=torch.long, device=self.device)
            keep = torch.arange(length - n_read, length, device=self.device)
            for _ in range(5):
                with torch.no_grad():
                    logits = self.model(test, logits_to_keep=keep).logits
                    F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
            return batch_size

        try:
            batch_size = forward_batch()
        except RuntimeError as e:
            if "No executable batch size found" not in str(e):
                raise
            batch_size = 1
        clear_torch_cache()  # as HFLM's probe ends
        return batch_size

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self.backend != "causal":  # encoder-decoder models: lm-eval's own path
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

        def _collate(req):  # HFLM's order: longest first, then by tokens
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        re_ord = Collator(requests, sort_fn=_collate, group_by="contexts" if self.logits_cache else None,
                          group_fn=lambda req: req[-2] + req[-1][:-1])
        n = len(re_ord)
        batch_size = self.batch_size if self.batch_size != "auto" else (override_bs if override_bs is not None else 0)
        batch_fn = self._batch_scheduler if self.batch_size == "auto" and n > 0 and not override_bs else None
        if batch_fn is not None:
            self.batch_sizes = {}  # as HFLM: sizes found for short requests must not carry over to long ones
        res = []
        pbar = tqdm(total=len(requests), disable=(disable_tqdm or self.rank != 0),
                    desc="Running loglikelihood requests")
        for chunk in re_ord.get_batched(n=batch_size, batch_fn=batch_fn):
            inps, inplens, conts = [], [], []
            for _, context_enc, continuation_enc in chunk:
                assert len(context_enc) > 0 and 0 < len(continuation_enc) <= self.max_length
                inp = torch.tensor((context_enc + continuation_enc)[-(self.max_length + 1):][:-1], dtype=torch.long)
                inps.append(inp)
                inplens.append(len(inp))
                conts.append(continuation_enc)
            # every (request, continuation) this batch answers, expanded through the one-token cache
            # exactly as HFLM's loop does (the placeholder carries the row each answer reads), and where
            # each one's scores sit: all known before the forward pass, so the indices go to the device
            # with the inputs, before it is busy
            answers = []
            for i, (request_str, ctx_tokens, _) in enumerate(chunk):
                row = torch.full((1, 1, 1), i)
                for req_str, cont_toks, placeholder in re_ord.get_cache(req_str=request_str, cxt_toks=ctx_tokens,
                                                                        cont_toks=conts[i], logits=row):
                    answers.append((req_str, list(cont_toks), int(placeholder.flatten()[0])))
            rows, lp_pos, greedy_pos, toks = [], [], [], []
            for _, cont_toks, i in answers:
                c, start = len(cont_toks), inplens[i] - len(conts[i])  # HFLM's window: [inplen - contlen, inplen)
                rows += [i] * c
                lp_pos += range(start, start + c)  # its gather reads the window's first c positions
                greedy_pos += range(inplens[i] - c, inplens[i])  # its greedy check, the window's last c
                toks += cont_toks
            batched = pad_and_concat(max(inplens), inps, padding_side="right").to(self.device, non_blocking=True)
            keep = sorted(set(lp_pos) | set(greedy_pos))  # the positions whose logits are read
            where = {p: k for k, p in enumerate(keep)} if self._keeps_logits else {p: p for p in keep}
            n_read = len(rows)  # one copy to the device for every index: rows, positions, tokens, kept positions
            r, lpp, gp, t, kept = torch.tensor(rows + [where[p] for p in lp_pos] + [where[p] for p in greedy_pos]
                                               + toks + keep).to(self.device, non_blocking=True).split(
                [n_read] * 4 + [len(keep)])
            if self._keeps_logits:  # [batch, len(keep), vocab]: the output layer on the read positions only
                with torch.no_grad():
                    logits = self.model(batched, logits_to_keep=kept).logits
            else:
                logits = self._model_call(batched)  # [batch, length, vocab]

            def log_probs(positions):  # HFLM's log-softmax, row by row, on the rows scored only
                return F.log_softmax(logits[r, positions], dim=-1, dtype=self.softmax_dtype)

            scored = log_probs(lpp)
            lp = scored.gather(-1, t[:, None]).squeeze(-1)
            hit = (scored if greedy_pos == lp_pos else log_probs(gp)).argmax(dim=-1) == t
            lp, hit = lp.cpu(), hit.cpu()  # the batch's one synchronisation
            bounds = torch.tensor([0] + [len(a[1]) for a in answers]).cumsum(0).tolist()
            for k, (req_str, _, _) in enumerate(answers):
                a, b = bounds[k], bounds[k + 1]
                answer = (float(lp[a:b].sum()), bool(hit[a:b].all()))
                res.append(answer)
                if req_str is not None:
                    self.cache_hook.add_partial("loglikelihood", req_str, answer)
                pbar.update(1)
        pbar.close()
        return re_ord.get_original(res)
