"""Imports: every module of the package imports on its own in a fresh interpreter (no import-order
luck), and the framework-free core imports with MMF blocked."""
import os
import subprocess
import sys

from helpers.mmf import ROOT

PACKAGE = os.path.join(ROOT, "mmf_multilevel")

#: the framework-free core: packages (every module in them) and single modules
FRAMEWORK_FREE_PACKAGES = ("modules", "evaluation", "features", "images", "extraction", "weak_corpus", "zoo")
FRAMEWORK_FREE_MODULES = (
    "mmf_multilevel.methods", "mmf_multilevel.methods.batch", "mmf_multilevel.methods.config",
    "mmf_multilevel.methods.progress", "mmf_multilevel.methods.testing", "mmf_multilevel.datasets.generate",
    "mmf_multilevel.trainers.optim", "mmf_multilevel.paths", "mmf_multilevel.registration", "mmf_multilevel.files",
)
#: in a method folder everything but the MMF adapter (model.py) and its MMF datasets (data.py)
METHOD_MMF_FILES = ("model", "data", "testing")


def modules():
    names = []
    for folder, _, files in os.walk(PACKAGE):
        if "__pycache__" in folder:
            continue
        package = os.path.relpath(folder, ROOT).replace(os.sep, ".")
        for name in sorted(files):
            if not name.endswith(".py") or name == "__main__.py":
                continue
            names.append(package if name == "__init__.py" else f"{package}.{name[:-3]}")
    return sorted(names)


def framework_free():
    out = list(FRAMEWORK_FREE_MODULES)
    for name in modules():
        parts = name.split(".")
        if len(parts) > 1 and parts[1] in FRAMEWORK_FREE_PACKAGES:
            out.append(name)
        elif len(parts) > 3 and parts[1] == "methods" and parts[3] not in METHOD_MMF_FILES:
            out.append(name)  # mmf_multilevel.methods.<method>.<network | pretraining | config | checkpoints ...>
        elif len(parts) == 3 and parts[1] == "methods" and os.path.isdir(os.path.join(PACKAGE, "methods", parts[2])):
            out.append(name)  # a method package's __init__
    return sorted(set(out))


# One interpreter preloads torch and transformers (not mmf, not this package's modules), then forks a
# fresh child per module; each child imports its module alone and reports.
RUNNER = r"""
import os, sys, json
blocked = sys.argv[1] == "blocked"
names = json.loads(sys.argv[2])
import torch, transformers, numpy  # noqa: F401  shared by every child, before any fork
failures = {}
for name in names:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            if blocked:
                sys.modules["mmf"] = None
            import importlib
            importlib.import_module(name)
            if blocked:
                assert sys.modules.get("mmf") is None, "imported mmf"
            message = ""
        except BaseException as error:
            message = f"{type(error).__name__}: {error}"
        os.write(write, message.encode()[:4000])
        os._exit(0)
    os.close(write)
    message = b""
    while True:
        chunk = os.read(read, 4096)
        if not chunk:
            break
        message += chunk
    os.close(read)
    os.waitpid(pid, 0)
    if message:
        failures[name] = message.decode(errors="replace")
print(json.dumps(failures))
"""


def run(names, blocked, workers=2):
    """The modules ``names`` checked by ``workers`` runners side by side (one per core); their failures."""
    import json

    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", RUNNER, "blocked" if blocked else "free", json.dumps(names[i::workers])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for i in range(workers)]
    failures = {}
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr[-3000:]
        failures.update(json.loads(stdout.strip().splitlines()[-1]))
    return failures


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    # the framework-free modules import without touching mmf (next test), so no import order can break
    # them; every other module imports alone, mmf included
    names = sorted(set(modules()) - set(framework_free()))
    assert len(names) > 20 and "mmf_multilevel.metrics" in names and "mmf_multilevel.processors.answers" in names
    failures = run(names, blocked=False)
    assert not failures, failures


def test_the_framework_free_core_imports_with_mmf_blocked():
    names = framework_free()
    for expected in ("mmf_multilevel.modules.attention", "mmf_multilevel.evaluation.vqa", "mmf_multilevel.evaluation.retrieval",
                     "mmf_multilevel.images.sources", "mmf_multilevel.features.reader", "mmf_multilevel.extraction.cli",
                     "mmf_multilevel.weak_corpus.pipeline", "mmf_multilevel.zoo.zoo", "mmf_multilevel.methods.semvlp.network",
                     "mmf_multilevel.methods.semvlp.pretraining", "mmf_multilevel.methods.muvla.pretraining"):
        assert expected in names, expected
    failures = run(names, blocked=True)
    assert not failures, failures


def test_datasets_never_import_a_model():
    for folder, _, files in os.walk(os.path.join(PACKAGE, "datasets")):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(folder, name)).read()
                assert "mmf_multilevel.methods" not in text and "mmf_multilevel.models" not in text, name
                assert "import mmf\n" not in text, name
