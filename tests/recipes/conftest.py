"""Shared fixtures of the SDXL recipe tests: tiny SDXL-shaped components written once per session (no download)."""
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sdxl_tiny_base(tmp_path_factory) -> Path:
    from dmd2.models.sdxl_tiny import write_tiny_sdxl

    return write_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-base", seed=0)


@pytest.fixture(scope="session")
def sdxl_tiny_runs(tmp_path_factory):
    """``mode -> run folder`` of the tiny preset, trained lazily once per mode per session."""
    from dmd2.recipes.sdxl import RECIPE
    from dmd2.train import main

    root = tmp_path_factory.mktemp("sdxl-runs")
    done = {}

    def get(mode: str) -> Path:
        if mode not in done:
            out = root / mode
            rc = main(RECIPE, ["--preset", "tiny", "--out", str(out), f"model.memory_mode={mode}"])
            assert rc == 0
            done[mode] = out
        return done[mode]

    return get
