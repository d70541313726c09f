"""Which of transformers' attention functions a rotary family's block calls, and which path multiplies.

Bloom's blocks always run their own attention (`baddbmm`, `bmm`). The rotary families' blocks call the
function that `config._attn_implementation` names in transformers' `AttentionInterface`; slowllm names
"slowllm", registered here: a choice, per call, between transformers' own sdpa (`sdpa_attention_forward`)
and the family's own eager attention (`eager_attention_forward` in its modeling module). No attention code
of slowllm's own runs, and nothing of transformers' is replaced.

Why choose: on a CPU where oneDNN computes bf16 (AVX512), PyTorch's sdpa reads one query's keys and values
several times slower than two matmuls do, when every query head has its own key head (Llama-2, Pythia).
Measured on Zen 4, bf16, 32 heads of 128, keys and values filling their buffers (decode steps' whole
views), us per block: one query at 128 / 512 / 2,048 positions, sdpa 430 / 1,740 / 7,251 against eager
136 / 301 / 1,571; 8 sessions' queries at 2,048: 59.2 ms against 16.6; 4 or 8 queries (a speculative
check) 1.0-1.6x. With grouped keys (Llama-3, Mistral, Qwen2: 32 query heads on 8) transformers' sdpa
packs the query heads per key head and is 3-20x faster than eager, which copies every key head 4 times;
in fp32 (MKL) the two take the same time; on PyTorch's own bf16 loops (an AVX2 PC) eager gains nothing.
"""

from __future__ import annotations

import sys
from functools import lru_cache

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ._families import ATTENTION

# Steps of at most this many new positions (decode, speculative checks) may run eager attention: their
# attention weights are small. Prompts keep sdpa, which never holds [heads x q x kv] weights in memory.
EAGER_MAX_QUERIES = 8
_HALF = (torch.bfloat16, torch.float16)


@lru_cache(maxsize=None)
def _onednn_supports(dtype: torch.dtype) -> bool:
    """Whether this PyTorch's oneDNN computes `dtype` on this CPU (fixed for the process: asked once)."""
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    try:  # what PyTorch's matmuls ask (AVX512 and later on x86; ONEDNN_MAX_CPU_ISA caps it)
        return bool(ops._is_mkldnn_bf16_supported() if dtype == torch.bfloat16 else ops._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # a PyTorch without these checks: the CPU's own bf16 says
        from slowllm.node.kernels._kernels import native_bf16
        return dtype == torch.bfloat16 and native_bf16()


def onednn_attention(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether PyTorch multiplies attention's matrices of this dtype through oneDNN here: bf16 or fp16 on a
    CPU whose oneDNN computes that type. Elsewhere on CPU they run PyTorch's own loops (bf16 on an AVX2
    PC), and fp32 runs MKL. Asked per block and step: only the user's switch (`torch.backends.mkldnn`) is
    read each time."""
    return device.type == "cpu" and dtype in _HALF and torch._C._get_mkldnn_enabled() and _onednn_supports(dtype)


def eager_pays(module: torch.nn.Module, query: torch.Tensor) -> bool:
    """Whether this call runs the family's eager attention rather than sdpa (the module docstring's rule)."""
    return (query.shape[-2] <= EAGER_MAX_QUERIES and getattr(module, "num_key_value_groups", 1) == 1
            and onednn_attention(query.dtype, query.device))


def _eager_of(module: torch.nn.Module):
    """The eager attention of the module's own modeling file (None if it has none)."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)


def attention(module, query, key, value, attention_mask, *args, **kwargs):
    """`AttentionInterface` function "slowllm": the family's eager attention where it pays, else sdpa."""
    eager = _eager_of(module) if eager_pays(module, query) else None
    return (eager or sdpa_attention_forward)(module, query, key, value, attention_mask, *args, **kwargs)


AttentionInterface.register(ATTENTION, attention)
