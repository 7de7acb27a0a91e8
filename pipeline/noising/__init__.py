"""Noising: the Gaussian forward process as pure float64 maths, keyed by each sample's identity.

:mod:`.schedule` (DDPM beta schedules) and :mod:`.process` (DDPM and rectified flow as alpha_t,
sigma_t tables) -> :mod:`.noise` (the keyed timestep and eps of every record) ->
:mod:`.diffusion` (x_t and the posterior, batch-first torch) -> :mod:`.targets` (the training
objectives a trainer regresses, and sampling).
"""
