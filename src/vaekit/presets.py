"""Named starting configurations for ``vaekit train --preset NAME``.

Each preset sets some fields of the config groups (``model``, ``data``, ``train``,
``objective``); a ``--config`` file and flags override any of them. What each reached,
with its machine and command, is in docs/benchmarks.md.
"""

from __future__ import annotations

__all__ = ["PRESETS", "DEFAULT_PRESET"]

PRESETS: dict[str, dict] = {
    # The default: scikit-learn's bundled 8x8 digits, no download; a good model in well
    # under a minute on two CPU cores.
    "digits": {
        "data": {"dataset": "digits", "binarize": "dynamic"},
        "model": {"arch": "mlp", "hidden": [256, 128], "latent_dim": 8, "activation": "elu"},
        "train": {"epochs": 150, "batch_size": 64, "lr": 2e-3, "lr_schedule": "cosine"},
    },
    # Burda et al. (2015): one stochastic layer, 784-200-200-50 tanh, dynamically binarized MNIST.
    "mnist-burda": {
        "data": {"dataset": "mnist", "binarize": "dynamic", "val_size": 10000, "split": "tail"},
        "model": {"arch": "mlp", "hidden": [200, 200], "latent_dim": 50, "activation": "tanh"},
        "train": {"epochs": 200, "batch_size": 100, "lr": 1e-3, "lr_schedule": "cosine"},
    },
    # A wider ELU MLP with the IWAE bound (k = 5).
    "mnist-large": {
        "data": {"dataset": "mnist", "binarize": "dynamic", "val_size": 10000, "split": "tail"},
        "model": {"arch": "mlp", "hidden": [512, 512], "latent_dim": 50, "activation": "elu"},
        "train": {"epochs": 200, "batch_size": 100, "lr": 1e-3, "lr_schedule": "cosine"},
        "objective": {"name": "iwae", "iw_samples": 5},
    },
    # The wider MLP with an autoregressive PixelCNN head on the decoder (vaekit.pixelcnn):
    # the latent code carries the global shape, the head the pixel-level detail. The KL
    # weight rises from 0 to 1 over the first 10 epochs so the head does not learn to
    # ignore the latent code. 32 feature maps keep a k = 5000 evaluation of the test set
    # near 2.4 PFLOP (about 48 MFLOP per decoded image). On one H100: 79.61 nats (k = 5000)
    # after 119 epochs in 163 s of training (`--time-budget 170`; docs/benchmarks.md).
    "mnist-pixelcnn": {
        "data": {"dataset": "mnist", "binarize": "dynamic", "val_size": 10000, "split": "tail"},
        "model": {"arch": "mlp", "hidden": [512, 512], "latent_dim": 50, "activation": "elu",
                  "pixelcnn_layers": 4, "pixelcnn_width": 32},
        "train": {"epochs": 100, "batch_size": 100, "lr": 1e-3, "lr_schedule": "cosine"},
        "objective": {"beta_schedule": "linear", "warmup_steps": 5000},
    },
    # The same with the head's late fusion: z enters after the masked layers, through a
    # context-weighted 3 x 3 mix of the decoder's logits. About 1.3 nats of validation
    # ELBO worse than mnist-pixelcnn after 30 epochs, but each importance sample costs the
    # plain decoder plus a few operations per pixel: k = 5000 on the test set was estimated
    # at about 22 minutes on 2 CPU cores instead of about 8 hours, and took 32 minutes on a
    # partly shared machine (docs/benchmarks.md).
    "mnist-pixelcnn-late": {
        "data": {"dataset": "mnist", "binarize": "dynamic", "val_size": 10000, "split": "tail"},
        "model": {"arch": "mlp", "hidden": [512, 512], "latent_dim": 50, "activation": "elu",
                  "pixelcnn_layers": 4, "pixelcnn_width": 32, "pixelcnn_fusion": "late"},
        "train": {"epochs": 100, "batch_size": 100, "lr": 1e-3, "lr_schedule": "cosine"},
        "objective": {"beta_schedule": "linear", "warmup_steps": 5000},
    },
}
DEFAULT_PRESET = "digits"
