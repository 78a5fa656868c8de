"""Integrations, imported on demand (neither is loaded by ``import fgattn_cute``):

- ``fgattn_cute.integrations.torch_op``: ``torch.ops.fgattn.sparse_attention``, a
  ``torch.library`` custom op (fake implementation included, no host sync) for
  ``torch.compile`` and CUDA graphs, and its wrapper ``sparse_attention_op(q, k, v, index)``.
- ``fgattn_cute.integrations.diffusers``: ``enable(pipe, predictor=..., cache=...)`` /
  ``disable(pipe)``, attention processors for diffusers' Wan, HunyuanVideo and CogVideoX
  transformers (needs ``diffusers``: ``pip install -e ".[diffusers]"``).
"""
