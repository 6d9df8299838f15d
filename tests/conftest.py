import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "projects", "visual_bert", "synthetic.yaml")
TEST_PLUGIN = os.path.join(ROOT, "tests", "plugins", "mmf_test_plugin")
BIN = os.path.dirname(sys.executable)


def console_script(name):
    path = os.path.join(BIN, name)
    return path if os.path.exists(path) else shutil.which(name)


def clean_env(tmp_path, **extra):
    env = dict(os.environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    env["MMF_CACHE_DIR"] = str(tmp_path / "mmf_cache")
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_mmf(tmp_path, *opts, config=TINY_CONFIG, script="mmf_run", timeout=300, env=None, check=True):
    """Run the installed console script (the stock ``mmf_run`` by default)."""
    args = [console_script(script)]
    if config is not None:
        args.append(f"config={config}")
    args.extend(opts)
    result = subprocess.run(
        args, cwd=tmp_path, env=env or clean_env(tmp_path), capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


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
