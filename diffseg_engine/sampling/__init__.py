"""The diffusion schedules, the batched ensemble sampler, the rounds of ``--n auto`` and the noise drawn on a
device. Imports: numpy (torch and cuda-bindings lazily in `noise_device` only); `core`, `artifacts`, `inputs`.
"""
