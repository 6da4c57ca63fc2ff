"""loom's own compute kernels, where torch has no fast one for what an inference step does.

- `cpu` (cpu.py + gemv.c, attention.c, elementwise.c): AVX2 kernels for CPU inference steps: bf16, int8
  and int4 linears at every batch size (bf16 and int8 weights in panels of 16 output channels), paged
  decode attention, RMSNorm(+residual), SiLU-and-mul and rotary. Every one has a
  plain-PyTorch twin in loom/layers that tests compare it with, and the layers fall back to the twin
  where the kernels do not build.
- `build`: the C files compiled on first use with the machine's C compiler, cached, loaded with ctypes.
- `decoder` (decoder.py + decoder.c): those kernels chained through a whole Llama-family decoder stack in
  one call, for small bf16 batches (loom/models/cpu_decode.py decides which), one query row per token;
  its twin is the model's modules, and for decode tokens its output is bit-identical to theirs.
"""
