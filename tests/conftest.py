"""pytest fixtures shared by the whole suite; plain helpers live in ``tests/helpers``."""
import pytest

from helpers.mmf import run_mmf
from helpers.zoo import start_server, stop_server


@pytest.fixture
def mmf_run(tmp_path):
    def runner(*opts, **kwargs):
        return run_mmf(tmp_path, *opts, **kwargs)

    return runner


@pytest.fixture
def mmf_global_config():
    """The global config MMF's Losses and our models read (``evaluation.predict``,
    ``training.update_frequency``), registered as mmf_run does; the previous one is put back after."""
    from mmf.common.registry import registry
    from omegaconf import OmegaConf

    previous = registry.get("config", no_warning=True)
    registry.register("config", OmegaConf.create({"evaluation": {"predict": False}, "training": {"update_frequency": 1}}))
    yield
    registry.register("config", previous)


@pytest.fixture
def server():
    """A local HTTP server (``server.files``: name -> bytes, ``server.url``) for zoo downloads."""
    httpd = start_server()
    yield httpd
    stop_server(httpd)
