"""Running the stock MMF console scripts from tests: the repository paths, a clean environment, ``run_mmf``,
``kill_when`` (kill -9 a run once a file appears)."""
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


def kill_when(tmp_path, path, *opts, config=TINY_CONFIG, batch_sleep=0.2, timeout=240):
    """Start ``mmf_run`` (each batch slowed by ``batch_sleep`` s, the test plugin's hook), kill -9 it as
    soon as ``path`` exists, and return once it is dead; the run must not end on its own first."""
    args = [console_script("mmf_run"), f"config={config}", *opts]
    env = clean_env(tmp_path, MMF_TEST_BATCH_SLEEP=str(batch_sleep))
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
