"""Triton kernels for real low-bit storage; each file holds kernel, launcher and torch reference.

Weight-only: :mod:`pack` (codes into int32 words), :mod:`wq_gemm` (dequantization fused into the
matmul). Weight-and-activation: :mod:`act_quant` (per-token dynamic int8 codes), :mod:`w8a8_gemm`
(per-channel int8 x int8), :mod:`w4a8_gemm` (packed low-bit weights in groups x int8 activations).
"""

from qeval.kernels._env import INTERPRETING  # noqa: F401  (must run before any @triton.jit)
