"""The model's ends: tokenizer, embeddings (+ Bloom's layer norm over them), final norm and the LM head.

The family (`slowllm.node.engine._families`) says which norms there are (LayerNorm, or RMSNorm for Llama-shaped
models) and whether the head is the embedding matrix or a matrix of its own. The LM head of Bloom is the embedding matrix (250880 x 14336 for Bloom-176B: 7.2 GB in bf16, 14.4 GB
as fp32). It is never converted whole: it is kept in the checkpoint's dtype (or left on disk when the
memory plan says so) and applied in vocabulary chunks: for a few positions (scoring a continuation, fp32
decoding) slowllm's kernel reads the stored rows directly, else each chunk is converted into one reused
buffer for a dense GEMM. Log-likelihoods use a running log-sum-exp over the chunks, so only the positions
that are scored are ever computed, and the gradient for tuning is a second chunked pass, not a
[tokens x vocab] autograd graph.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from slowllm.node import Checkpoint
from slowllm.node.engine._checkpoint import SCALE
from slowllm.node.engine._memory import huge_page_empty
from slowllm.node.kernels._kernels import kernel_rows, kernels, usable
from slowllm.node.kernels._linears import bf16_linear, int8_matmul

from ._sampling import argmax_rows

# Positions up to which the kernel (`_fp32_logit_chunks`) beats converting each chunk for a dense fp32
# GEMM (measured, Bloom's head at hidden 2048, 2 cores; ms bf16 / int8): 1 row 32 vs 211 / 20 vs 258,
# 8 rows 136 vs 363 / 101 vs 442, 32 rows 574 vs 732 / 402 vs 651.
# fp32 weights (no conversion to save): the kernel up to 16 (Bloom's head shape, 65536 x 2048: 34 vs 57 ms
# at 8 rows, 71 vs 53 at 16, 135 vs 60 at 32).
HEAD_KERNEL_MAX_ROWS = {torch.bfloat16: 32, torch.int8: 32, torch.float32: 16}


def tokenizer_adds_bos(tokenizer_json: Path, tokenizer: Tokenizer, bos: int | None) -> bool:
    """Whether the checkpoint's tokenizer, with its defaults, starts a text with BOS: asked of transformers'
    own tokenizer for the checkpoint (what `AutoTokenizer(text)` gives: some classes follow
    tokenizer_config's add_bos_token, others only tokenizer.json's post-processor), else what the
    post-processor does."""
    if bos is None:
        return False
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer_json.parent))("a")["input_ids"][:1] == [bos]
    except Exception:  # a tokenizer class transformers cannot load here (custom code...): the file decides
        return tokenizer.encode("a", add_special_tokens=True).ids[:1] == [bos]


class ModelEnds:
    def __init__(self, checkpoint: Checkpoint, *, dtype: torch.dtype = torch.float32,
                 resident_embedding: bool = True, head_chunk_bytes: int = 64 << 20):
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.dtype = dtype
        self.tokenizer = Tokenizer.from_file(str(checkpoint.tokenizer_path()))
        self.family = family = checkpoint.family
        self.eos_token_id = _first(self.config.eos_token_id)  # Llama 3 lists several: the first ends a turn
        self.bos_token_id = _first(self.config.bos_token_id)
        self.adds_bos = tokenizer_adds_bos(checkpoint.tokenizer_path(), self.tokenizer, self.bos_token_id)
        eos = self.config.eos_token_id
        self._more_stops = set(eos[1:]) if isinstance(eos, list) else set()  # Llama 3: <|eot_id|> and others
        self.eps = family.eps_of(self.config)
        norms = {k: t.float().clone() for k, t in checkpoint.read([*family.embedding_norm, *family.final_norm]).items()}
        self._emb_norm = [norms[k] for k in family.embedding_norm]  # Bloom: weight, bias; others: none
        self._final_norm = [norms[k] for k in family.final_norm]  # weight (, bias)
        self.embedding_key = checkpoint.embedding_key
        self.vocab_size, self.hidden_size = checkpoint.meta(self.embedding_key)[0]
        self._resident: dict[str, torch.Tensor] = {}
        if resident_embedding:  # kept in the checkpoint's dtype: for 176B, 7.2 GB instead of 14.4 (int8: 3.6)
            keys = {k for key in {self.embedding_key, checkpoint.head_key} for k in checkpoint.matrix_keys(key)}
            self._resident = {k: checkpoint.read([k])[k].clone() if k.endswith(SCALE) else self._copy_in(k)
                              for k in keys}
        row_bytes = self.hidden_size * max(dtype.itemsize, checkpoint.meta(checkpoint.head_key)[1].itemsize)
        self.head_chunk_rows = max(256, min(self.vocab_size, head_chunk_bytes // row_bytes))
        self._local = threading.local()  # one conversion buffer per thread: jobs may run concurrently

    def _copy_in(self, key: str, chunk_bytes: int = 128 << 20) -> torch.Tensor:
        """Copy a matrix into RAM a chunk at a time, each through a fresh memory map that is dropped after.

        Copying through one long-lived map would count every page twice in RSS (the map and the copy)
        until the end: for Bloom-176B, 14 GB at the peak instead of 7.
        """
        shape, dtype = self.checkpoint.meta(key)
        out = huge_page_empty(shape, dtype)  # read at every token (the head): 2 MB pages
        rows = max(1, chunk_bytes // (shape[1] * dtype.itemsize))
        for start in range(0, shape[0], rows):
            mapped = self.checkpoint.read([key])[key]
            out[start:start + rows].copy_(mapped[start:start + rows])
            del mapped
        return out

    @property
    def stop_token_ids(self) -> set[int]:
        """Tokens that end a generation: the EOS, and any others the config lists beside it."""
        return ({self.eos_token_id} | self._more_stops) - {None}

    # ---- text ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str, empty: int | None = None) -> list[int]:
        """Ids of a prompt (or a scored context): BOS first where the checkpoint's own tokenizer adds it by
        default (Llama, Mistral; not SmolLM-style models or Bloom), unless the text already starts with it;
        never empty (`empty`, by default BOS)."""
        ids = self.encode(text)
        if self.adds_bos and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id, *ids]
        if not ids:
            ids = [empty if empty is not None else self.bos_token_id if self.bos_token_id is not None
                   else self.eos_token_id]
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids; special tokens (<unk>, <pad>, ...) are not text and are left out."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ---- embeddings ----------------------------------------------------------------------------
    def _matrix(self, key: str) -> torch.Tensor:
        # Non-resident: a fresh memory map per use, dropped after, so its pages leave our RSS again.
        return self._resident[key] if key in self._resident else self.checkpoint.read([key])[key]

    def _scale(self, key: str) -> torch.Tensor | None:
        """Per-row scales of an int8 matrix (None when the checkpoint is not int8)."""
        return self._matrix(key + SCALE) if self.checkpoint.int8 else None

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Raw input embeddings [B, T, H] in fp32 (before the embedding layer norm, as `inputs_embeds`)."""
        flat = ids.reshape(-1)
        rows = self._matrix(self.embedding_key)[flat].float()
        scale = self._scale(self.embedding_key)
        if scale is not None:
            rows *= scale[flat].float()[:, None]
        return rows.reshape(*ids.shape, self.hidden_size)

    def embed_norm(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """What block 0 receives: Bloom normalises the embeddings first, the other families do not."""
        if not self._emb_norm:
            return inputs_embeds
        return F.layer_norm(inputs_embeds, (self.hidden_size,), *self._emb_norm, self.eps)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm in fp32: LayerNorm, or RMSNorm (Llama: x / rms(x) * weight)."""
        hidden = hidden.float()
        if self.family.rms_norm:
            (weight,) = self._final_norm
            return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps) * weight
        return F.layer_norm(hidden, (self.hidden_size,), *self._final_norm, self.eps)

    # ---- LM head -------------------------------------------------------------------------------
    def _stored_chunks(self, whole: bool = False) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """(start, the head's rows [start, start + head_chunk_rows) as stored, their int8 scales or None);
        `whole`: a resident head in one piece (chunks only bound what a memory map or a conversion holds)."""
        key = self.checkpoint.head_key
        scale = self._scale(key)
        if whole and key in self._resident:
            yield 0, self._resident[key], scale
            return
        for start in range(0, self.vocab_size, self.head_chunk_rows):
            stop = min(start + self.head_chunk_rows, self.vocab_size)
            source = self._matrix(key)[start:stop]
            yield start, source, None if scale is None else scale[start:stop]
            del source

    def _head_chunks(self, dtype: torch.dtype | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, weight rows in `dtype`, the compute dtype by default), converted into a reused buffer."""
        dtype = dtype or self.dtype
        buffer = getattr(self._local, f"buffer_{dtype}", None)
        if buffer is None:
            buffer = torch.empty(self.head_chunk_rows, self.hidden_size, dtype=dtype)
            setattr(self._local, f"buffer_{dtype}", buffer)
        resident = self.checkpoint.head_key in self._resident
        for start, source, scale in self._stored_chunks():
            if source.dtype == dtype and resident:
                yield start, source
            else:
                chunk = buffer[: source.shape[0]]
                chunk.copy_(source)
                if scale is not None:  # int8 rows: dequantized into the buffer
                    chunk.mul_(scale.to(dtype)[:, None])
                yield start, chunk

    def _chunk_logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x = hidden.to(weight.dtype)
        if weight.dtype == torch.bfloat16 and weight.is_contiguous() and usable(x, "bf16"):  # decoding: the GEMV kernel
            # (the bf16 logits written as fp32, the numbers `.float()` gives: for 8 rows of Bloom's vocabulary
            # no 4 MB bf16 tensor to write and widen, 4-5 ms a step of page faults and a pass on Zen 4)
            return kernels().bf16_gemv(x, weight, fp32_out=True)
        if weight.dtype == torch.bfloat16:
            return bf16_linear(x, weight).float()
        return (x @ weight.T).float()

    def _fp32_logit_chunks(self, hidden: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, fp32 logits [N, rows]) of fp32 hidden states [N, H], a vocabulary chunk at a time.

        Up to `invariant_rows` positions, the kernel reads the stored bf16, int8 or fp32 rows (converting
        the first two to fp32 in registers): the numbers of converting each chunk and a dense fp32 GEMM up to
        summation order, each row's the same whatever else is in the batch, without writing and reading
        back a fp32 copy of the head (Bloom's: 2 GB at hidden 2048, 14 GB at 14336)."""
        hidden = hidden.float()
        k = kernels() if hidden.device.type == "cpu" and 0 < hidden.shape[0] <= self.invariant_rows else None
        if k is None:
            for start, w in self._head_chunks(torch.float32):
                yield start, self._chunk_logits(hidden, w)
            return
        for start, source, scale in self._stored_chunks(whole=True):  # (the kernel's output: no copy to join)
            if scale is not None:
                yield start, k.int8_gemv(hidden, source, scale)
            else:
                yield start, (k.fp32_gemv if source.dtype == torch.float32 else k.bf16_fp32_gemv)(hidden, source)

    @functools.cached_property
    def invariant_rows(self) -> int:
        """Up to how many positions one `logits` call gives each position the numbers it gets alone (the
        kernels' fixed summation order), so that the heads of many generations' steps may share one read of
        the LM head without changing any of them; 0 where PyTorch's GEMM computes it (its rounding depends on
        the batch). Asked for every step's head: worked out once. In bf16 (a local runner's ends) the
        kernels take a resident bf16 or int8 head (`logits`): 8 users of `slowllm serve --local
        --keep-in-ram` on the bloom-1b7 shape read its 1 GB head once a step, not 8 times (~33 ms each)."""
        stored = self.checkpoint.meta(self.checkpoint.head_key)[1]
        if kernels() is None:
            return 0
        if self.dtype == torch.float32:
            return HEAD_KERNEL_MAX_ROWS.get(stored, 0)
        whole = self._resident.get(self.checkpoint.head_key)
        if (self.dtype != torch.bfloat16 or whole is None or whole.device.type != "cpu" or not whole.is_contiguous()
                or whole.dtype not in (torch.bfloat16, torch.int8)):
            return 0
        return kernel_rows("bf16" if whole.dtype == torch.bfloat16 else "int8") or 0

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits [N, V] in fp32 for normed hidden states [N, H] (generation: N is the batch)."""
        key = self.checkpoint.head_key
        if self.dtype == torch.float32:
            out = None
            for start, chunk in self._fp32_logit_chunks(hidden):
                if chunk.shape[1] == self.vocab_size:  # the whole head in one product (resident, kernel)
                    return chunk
                if out is None:
                    out = torch.empty(hidden.shape[0], self.vocab_size, dtype=torch.float32)
                out[:, start:start + chunk.shape[1]] = chunk
            return out
        whole = self._resident.get(key)
        if (whole is not None and whole.dtype == self.dtype == torch.bfloat16 and whole.is_contiguous()
                and usable(hidden, "bf16")):
            # decoding with a resident bf16 head: the kernel over all of it, one conversion (chunk by chunk,
            # each chunk's logits were converted, then copied into a fresh [N, V]: 8 rows of the bloom-1b7
            # shape 42 -> 39 ms; the same numbers, each row's product being its own)
            return self._chunk_logits(hidden, whole)
        if (whole is not None and whole.dtype == torch.int8 and whole.is_contiguous() and self.dtype == torch.bfloat16
                and usable(hidden, "int8")):
            # decoding with a resident int8 head: the kernel over all of it, the bf16 logits written as
            # fp32 (chunk by chunk, each chunk's bf16 logits were copied into a fresh fp32 [N, V]; the same
            # numbers: a row's sums are exact integers, its own whatever the chunk)
            return kernels().int8_bf16_gemv(hidden.to(self.dtype), whole, self._scale(key), fp32_out=True)
        out = torch.empty(hidden.shape[0], self.vocab_size, dtype=torch.float32)
        if self.checkpoint.int8 and key in self._resident:  # the int8 rows as they are: half the bytes
            x = hidden.to(self.dtype)
            for start, q, scale in self._stored_chunks():
                out[:, start:start + q.shape[0]] = int8_matmul(x, q, scale)
            return out
        for start, w in self._head_chunks():
            out[:, start:start + w.shape[0]] = self._chunk_logits(hidden, w)
        return out

    @torch.no_grad()
    def target_stats(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For normed hidden [N, H] and target ids [N]: (log p(target), target is the argmax, logsumexp)."""
        n = hidden.shape[0]
        run_max = torch.full((n,), float("-inf"))
        run_sum = torch.zeros(n)
        best = torch.full((n,), float("-inf"))
        best_id = torch.zeros(n, dtype=torch.long)
        target_logit = torch.zeros(n)
        # Log-likelihoods are the product here: logits in fp32 even when blocks compute in bf16 (a bf16
        # logit of ~30 is off by up to 0.125; converting each weight chunk costs little beside the pass).
        for start, logits in self._fp32_logit_chunks(hidden):
            chunk_arg = argmax_rows(logits)  # (max(dim=1)'s index search is slow: see argmax_rows)
            chunk_max = logits.gather(1, chunk_arg[:, None]).squeeze(1)
            better = chunk_max > best
            best = torch.where(better, chunk_max, best)
            best_id = torch.where(better, chunk_arg + start, best_id)
            new_max = torch.maximum(run_max, chunk_max)
            run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(logits - new_max[:, None]).sum(dim=1)
            run_max = new_max
            inside = (targets >= start) & (targets < start + logits.shape[1])
            if inside.any():
                rows = inside.nonzero().squeeze(1)
                target_logit[rows] = logits[rows, targets[rows] - start]
        lse = run_max + torch.log(run_sum)
        return target_logit - lse, best_id == targets, lse

    @torch.no_grad()
    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor,
                       top: int = 0) -> list[tuple[float, list[tuple[int, float]]]]:
        """Per position of normed hidden [N, H]: (log p(target), the `top` likeliest (id, logprob)).

        One pass over the head in fp32 like `target_stats` (the same numbers as scoring), vocabulary chunk
        by chunk with a running log-sum-exp and top-k: N positions never need an [N, vocab] matrix (a
        2,000-token echo at Bloom's vocabulary would be 2 GB)."""
        n = hidden.shape[0]
        run_max, run_sum = torch.full((n,), float("-inf")), torch.zeros(n)
        target_logit = torch.zeros(n)
        best_v, best_i = torch.full((n, top), float("-inf")), torch.zeros(n, top, dtype=torch.long)
        for start, logits in self._fp32_logit_chunks(hidden):
            new_max = torch.maximum(run_max, logits.max(dim=1).values)
            run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(logits - new_max[:, None]).sum(dim=1)
            run_max = new_max
            inside = ((targets >= start) & (targets < start + logits.shape[1])).nonzero().squeeze(1)
            target_logit[inside] = logits[inside, targets[inside] - start]
            if top:
                v, i = torch.topk(logits, min(top, logits.shape[1]), dim=1)
                best_v, order = torch.topk(torch.cat([best_v, v], 1), top, dim=1)
                best_i = torch.gather(torch.cat([best_i, i + start], 1), 1, order)
        lse = run_max + torch.log(run_sum)
        lp, tops = (target_logit - lse).tolist(), (best_v - lse[:, None]).tolist()
        return [(lp[r], list(zip(best_i[r].tolist(), tops[r]))) for r in range(n)]

    def nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """-log p(target) per position, differentiable w.r.t. `hidden` (chunked forward and backward)."""
        return _ChunkedNLL.apply(hidden, targets, self)


def _first(token_id):
    return token_id[0] if isinstance(token_id, list) else token_id


class _ChunkedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, targets, ends: ModelEnds):
        logprob, _, lse = ends.target_stats(hidden.detach(), targets)
        ctx.save_for_backward(hidden, targets, lse)
        ctx.ends = ends
        return -logprob

    @staticmethod
    def backward(ctx, grad_out):
        hidden, targets, lse = ctx.saved_tensors
        ends: ModelEnds = ctx.ends
        grad = torch.zeros(hidden.shape, dtype=torch.float32)
        with torch.no_grad():
            for start, w in ends._head_chunks(torch.float32):
                probs = torch.exp(ends._chunk_logits(hidden, w) - lse[:, None])
                inside = (targets >= start) & (targets < start + w.shape[0])
                rows = inside.nonzero().squeeze(1)
                probs[rows, targets[rows] - start] -= 1.0
                grad += (probs * grad_out[:, None]) @ w.float()
        return grad.to(hidden.dtype), None, None
