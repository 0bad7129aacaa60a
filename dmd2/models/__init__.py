"""Networks the library owns (EDM's ADM UNet, with EDM's parameter names) and safe checkpoint loaders."""
from .adm import (
    EDM_IMAGENET64_SIGMA_DATA,
    ADMConfig,
    ADMNet,
    bottleneck_name,
    build_edm_adm,
    edm_imagenet64_config,
    mnist_adm_config,
)

__all__ = [
    "ADMConfig",
    "ADMNet",
    "bottleneck_name",
    "build_edm_adm",
    "edm_imagenet64_config",
    "mnist_adm_config",
    "EDM_IMAGENET64_SIGMA_DATA",
]
