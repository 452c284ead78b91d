"""vaekit: variational autoencoders in PyTorch.

The objective lives in :mod:`vaekit.losses`; models in :mod:`vaekit.models`; training in
:mod:`vaekit.train`; evaluation in :mod:`vaekit.evaluate`. Submodules load on first use,
so ``import vaekit`` stays cheap.
"""

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "VAE",
    "ModelConfig",
    "VAELoss",
    "gaussian_kl",
    "bernoulli_nll",
    "gaussian_nll",
    "continuous_bernoulli_nll",
    "mse",
    "fit",
    "RunConfig",
    "TrainConfig",
    "DataConfig",
    "ObjectiveConfig",
    "load_dataset",
    "iw_nll",
    "evaluate_model",
]

_WHERE = {
    "VAE": "models", "ModelConfig": "models",
    "VAELoss": "losses", "gaussian_kl": "losses", "bernoulli_nll": "losses", "gaussian_nll": "losses",
    "continuous_bernoulli_nll": "losses", "mse": "losses",
    "fit": "train", "RunConfig": "config", "TrainConfig": "config",
    "DataConfig": "data", "load_dataset": "data",
    "ObjectiveConfig": "objectives",
    "iw_nll": "evaluate", "evaluate_model": "evaluate",
}

TYPE_CHECKING = False  # (typing's own would cost ``import vaekit`` the import of typing)
if TYPE_CHECKING:  # the names as type checkers see them: the real ones, not __getattr__'s Any
    from .config import RunConfig, TrainConfig
    from .data import DataConfig, load_dataset
    from .evaluate import evaluate_model, iw_nll
    from .losses import VAELoss, bernoulli_nll, continuous_bernoulli_nll, gaussian_kl, gaussian_nll, mse
    from .models import VAE, ModelConfig
    from .objectives import ObjectiveConfig
    from .train import fit
else:  # hidden from type checkers, which would take any name as one of its results

    def __getattr__(name: str) -> object:
        if name in _WHERE:
            import importlib

            return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        raise AttributeError(f"module 'vaekit' has no attribute {name!r}")
