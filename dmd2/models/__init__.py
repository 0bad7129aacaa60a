"""Networks the library owns or adapts (SDXL through diffusers: :mod:`dmd2.models.sdxl`)."""
