"""Networks the library owns (EDM's ADM UNet, with EDM's parameter names), safe checkpoint loaders, and SDXL through
diffusers (:mod:`dmd2.models.sdxl`: loading, prompt encoding, LoRA, memory modes)."""
from .adm import (
    EDM_IMAGENET64_SIGMA_DATA,
    ADMConfig,
    ADMNet,
    bottleneck_name,
    build_edm_adm,
    edm_imagenet64_config,
    small_adm_config,
)
from .edm_pickle import EDMPickleRefused, convert_edm_pickle, load_edm_adm, load_edm_pickle

__all__ = [
    "EDMPickleRefused",
    "convert_edm_pickle",
    "load_edm_adm",
    "load_edm_pickle",
    "ADMConfig",
    "ADMNet",
    "bottleneck_name",
    "build_edm_adm",
    "edm_imagenet64_config",
    "small_adm_config",
    "EDM_IMAGENET64_SIGMA_DATA",
]
