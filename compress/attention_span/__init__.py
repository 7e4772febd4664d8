"""Attention span: decode attention that reads only the KV blocks a span policy selects.

``policies`` (pure tensor functions: window, quest, snapkv), ``decode`` (the gather + SDPA path),
``triton_decode`` (the GPU kernel), ``install`` (a transformers model: prefill dense, decode under
the policy), ``config`` (the validated settings), ``checkpoint`` (settings beside the weights),
``passkey`` and ``scoring`` (quality at long context). User guide: docs/attention-span.md.
"""
