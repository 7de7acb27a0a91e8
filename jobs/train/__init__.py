"""Example: train a small denoiser on precomputed records: eps-, v- or velocity-prediction.

::

    python jobs/train_example.py --data OUT_DIR --steps 300 --out train-out
    python jobs/train_example.py --data /tmp/synth --make-synthetic 4096 --out train-out
    python jobs/train_example.py --data demo/records --cond cls --out train-cond
    python jobs/train_example.py --data text-records --cond text --out train-text
    python jobs/train_example.py --data flow-records --objective flow --out train-flow
    python -m jobs.train --data OUT_DIR --steps 300 --out train-out   # the same, from the root

``--objective`` (:mod:`pipeline.noising.targets`): ``eps`` regresses ``epsilon`` (the default,
described below), ``v`` the v-prediction target ``v`` (records made with ``output.targets=[v]``),
``flow`` the rectified-flow ``velocity`` = eps - x_0 (records made with ``schedule=flow``; the
model's timestep is the stored t = sigma * T, samples by Euler steps down the flow grid). The loss
is MSE(prediction, target) against the zero predictor E[target^2]; the held-out loss is reported
per objective, and the variational-bound term below uses the general posterior with the x_0 the
prediction implies.

Reads ``x_t``, ``t``, ``epsilon`` and the posterior columns with
:class:`pipeline.consume.dataset.PrecomputedDataset` and a DataLoader, trains a few conv layers with
a timestep embedding on ``MSE(eps_hat, eps)`` and shows that the loss falls below that of predicting
zeros (``E[eps^2]``, about 1). It also evaluates the variational-bound term

    L_{t-1} = KL( q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t) )

with q's mean and variance read from the records (``posterior_mean``, ``posterior_variance``) and
p_theta's mean from the predicted noise, with the schedule rebuilt from the files' metadata
(``t`` is 0-based: ``beta_t = betas[t]``, ``ab_t = alphas_cumprod[t]``)::

    mu_theta = (x_t - beta_t / sqrt(1 - ab_t) * eps_hat) / sqrt(1 - beta_t)

and p_theta's variance fixed to the posterior variance (Ho et al.'s sigma_t^2 = beta~_t), so the
KL is ``||mu_q - mu_theta||^2 / (2 beta~_t)`` per dimension. Records with ``t = 0`` (posterior
variance 0: that step is the decoder term L_0) or ``beta_t = 1`` (zero-terminal-SNR's last step)
are left out. The KL of the true noise is reported as a check of the stored posterior: it is 0
up to the storage dtype's rounding.

Writes ``loss.png`` (loss curve against the zero predictor), ``metrics.json``, the weights
(``model.safetensors``) and ``samples.png`` (a grid of samples drawn from the trained model by
ancestral sampling through the posterior the records carry, :func:`sampling.ancestral_sample`) to
``--out``.
Evaluation uses the training records (unless ``--holdout``): this shows the data path, it does not
measure generalisation.

Class-conditional (``--cond cls``): the int64 conditioning column ``cls`` (``source.keep``, see
:mod:`pipeline.read.conditioning`) selects a row of a class embedding (``num_classes + 1`` rows, the
last being the null label) added to the timestep embedding. During training each label is
replaced by the null label with probability ``--p-uncond`` (classifier-free guidance's joint
training); records whose label is null (read as -1) train as the null label. ``--num-classes``
defaults to the largest label + 1, read from the ``cls`` column with pyarrow before training.
A fraction ``--holdout`` of the samples (default 0.1 with ``--cond``; chosen by a hash of the key,
so both draws of a sample fall on the same side) is kept out of training, and at the end the same
model is evaluated on those records twice, with the same x_t, t and eps: given the true label and
given the null label. The gap between the two MSEs is what the label tells the denoiser; it is
small on images: a K-class label carries at most ln K nats about x_0, so (I-MMSE) it lowers the
eps MSE per dimension, averaged over uniform t, by at most about
``2 ln K / (D min |d ln SNR / d(t/T)|)`` for D = C*H*W dimensions.

Text-conditional (``--cond text``, records made with ``text=clip|sdxl|sd3|flux``): the pooled
caption embedding (:func:`text_column`, read with its records through the loader's join of the
text tables) minus the dataset's unconditional embedding (the empty prompt's, stored once in
``_text/_uncond.parquet``, ``PrecomputedDataset.unconditional()``) goes through a linear layer
added to the timestep embedding; caption dropout (``--p-uncond``) swaps a record's embedding for
the unconditional one, as classifier-free-guidance trainers do, instead of a rate baked into the
cache. The held-out evaluation compares the caption's embedding with the empty prompt's.

The package, a module per concept: :mod:`.model` (:class:`TinyDenoiser`), :mod:`.data` (the
loader, the held-out split by key, the label scan), :mod:`.evaluation` (held-out MSE,
:class:`PosteriorKL`), :mod:`.loop` (:func:`train`), :mod:`.checkpoint` (safetensors),
:mod:`.sampling` (ancestral and Euler samples, ``samples.png``), :mod:`.report` (``loss.png``,
``metrics.json``, the text report), :mod:`.synthetic` (records for trying it and for its tests)
and :mod:`.cli` (:func:`main`, run by ``python -m jobs.train`` and ``jobs/train_example.py``).
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .cli import main
from .data import KeySplit, is_held_out, scan_records
from .evaluation import PosteriorKL, evaluate
from .loop import train
from .model import TinyDenoiser
from .report import report
from .sampling import ancestral_sample, sample_grid, save_samples
from .synthetic import make_synthetic_records, palette

__all__ = [
    "KeySplit",
    "PosteriorKL",
    "TinyDenoiser",
    "ancestral_sample",
    "evaluate",
    "is_held_out",
    "load_checkpoint",
    "main",
    "make_synthetic_records",
    "palette",
    "report",
    "sample_grid",
    "save_checkpoint",
    "save_samples",
    "scan_records",
    "train",
]
