"""Packaging for mmf-multilevel.

MMF itself (``mmf==1.0.0rc10``, the only release on the package registry) pins
torch 1.5 and cannot be resolved beside a modern stack, so it is *not* listed in
``install_requires``: ``scripts/install.sh`` installs it with ``--no-deps``.
Everything MMF needs at import time is listed here instead, at versions that work
with the compatibility layer in ``mmf_multilevel/compat``.

Installing the package also drops ``mmf_multilevel_hook.pth`` into site-packages.
It registers a tiny import hook (no heavy imports at interpreter start) that
applies the compatibility patches and registers our components the first time
``mmf`` is imported, so the stock ``mmf_run`` works with no extra flag.
"""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PTH_NAME = "mmf_multilevel_hook.pth"


#: folders of the repository shipped inside the package: (source, destination under build_lib)
SHIPPED_FOLDERS = (
    ("configs", os.path.join("mmf_multilevel", "configs")),  # default configs (mmf_multilevel.paths.CONFIG_DIR)
    (os.path.join("feature_extraction", "configs"), os.path.join("mmf_multilevel", "extraction", "configs")),
)


def _shipped_files():
    for source, destination in SHIPPED_FOLDERS:
        for folder, _, files in os.walk(os.path.join(HERE, source)):
            for name in sorted(files):
                if name.endswith(".yaml"):
                    path = os.path.join(folder, name)
                    yield path, os.path.join(destination, os.path.relpath(path, os.path.join(HERE, source)))


class build_py_with_pth(build_py):
    """Ship the import-hook ``.pth`` file at the root of the wheel (site-packages), and the top-level
    ``configs/`` and ``feature_extraction/configs/`` inside the package (``mmf_multilevel/paths.py``
    finds them there in an installed wheel, and in the checkout otherwise)."""

    def run(self):
        super().run()
        self.copy_file(os.path.join(HERE, PTH_NAME), os.path.join(self.build_lib, PTH_NAME))
        for source, destination in _shipped_files():
            target = os.path.join(self.build_lib, destination)
            self.mkpath(os.path.dirname(target))
            self.copy_file(source, target)

    def get_outputs(self, include_bytecode=True):
        shipped = [os.path.join(self.build_lib, destination) for _, destination in _shipped_files()]
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_NAME)] + shipped


try:  # setuptools >= 64 builds PEP 660 editable wheels through this command
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # pragma: no cover - very old setuptools
    editable_wheel = None


class _StrategyWithPth:
    """Wraps setuptools' editable strategy so the editable wheel carries the hook too."""

    def __init__(self, strategy):
        self._strategy = strategy

    def __call__(self, wheel, files, mapping):
        result = self._strategy(wheel, files, mapping)
        with open(os.path.join(HERE, PTH_NAME), "rb") as f:
            wheel.writestr(PTH_NAME, f.read())
        return result

    def __enter__(self):
        self._strategy.__enter__()
        return self

    def __exit__(self, *exc):
        return self._strategy.__exit__(*exc)


CMDCLASS = {"build_py": build_py_with_pth}
if editable_wheel is not None and hasattr(editable_wheel, "_select_strategy"):

    class editable_wheel_with_pth(editable_wheel):
        """``pip install -e .`` gets the import-hook ``.pth`` as ``pip install .`` does."""

        def _select_strategy(self, *args, **kwargs):
            return _StrategyWithPth(super()._select_strategy(*args, **kwargs))

    CMDCLASS["editable_wheel"] = editable_wheel_with_pth


def read_version():
    scope = {}
    with open(os.path.join(HERE, "mmf_multilevel", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                exec(line, scope)
    return scope["__version__"]


# torch/torchvision: exact pins. An unpinned torch would make pip resolve a multi-GB
# build from the registry; these two releases import together on Python 3.11.
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]

# What MMF rc10 imports at ``import mmf`` (it imports every module), at versions the
# compatibility layer is tested with, plus our own runtime dependencies.
INSTALL_REQUIRES = TORCH + [
    "transformers>=4.40,<5",
    "tokenizers>=0.19,<0.23",
    "omegaconf>=2.3,<2.5",
    "demjson3==3.0.6",
    "scikit-learn>=1.3",
    "numpy>=1.26,<3",
    "lmdb>=1.4",
    "safetensors>=0.4",
    "tqdm>=4.60",
    "requests>=2.28",
    "GitPython>=3.1.30",
    "termcolor>=2.0",
    "editdistance>=0.6",
    "nltk>=3.8",
    "pillow>=10",
    "tensorboard>=2.14",
    "matplotlib>=3.7",
    "pycocotools>=2.0.7",
    "timm>=1.0,<2",  # CNN backbones of the pixel-based methods (SOHO's ResNet)
]

def read_requirements(name):
    """Pinned requirements of one extra, from ``requirements/<name>.txt`` (comments and blanks skipped)."""
    path = os.path.join(HERE, "requirements", f"{name}.txt")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.split("#", 1)[0].strip() for line in f if line.split("#", 1)[0].strip()]


EXTRAS = {
    "test": ["pytest>=8", "pytest-timeout>=2.3", "ruff==0.8.6",
             "attrs>=22"],  # dall_e.encoder (installed --no-deps by install.sh): the dVAE equivalence test
    # mu-VLA weak-corpus builder (mmf_multilevel.weak_corpus): SBERT, spaCy, faiss
    "weak_corpus": read_requirements("weak_corpus"),
    # region feature extractor (detectron2 runtime dependencies)
    "extract": read_requirements("extract"),
    # the local web page (mmf_ml_serve) and its browser test
    "serve": read_requirements("serve"),
}
EXTRAS["all"] = sorted({dep for deps in EXTRAS.values() for dep in deps})

setup(
    name="mmf-multilevel",
    version=read_version(),
    description="SemVLP, SOHO, MVPTR, SIMLA and mu-VLA vision-language pre-training as an MMF plugin",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=find_packages(include=["mmf_multilevel", "mmf_multilevel.*"]),
    include_package_data=True,
    # yaml and READMEs inside the package; configs/ and feature_extraction/configs/ are copied in by build_py
    package_data={"mmf_multilevel": ["zoo/*.yaml", "methods/*/defaults.yaml", "methods/*/configs/*.yaml",
                                     "methods/*/README.md", "weak_corpus/README.md",
                                     "predict/page.html"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    cmdclass=CMDCLASS,
    entry_points={
        "console_scripts": [
            "mmf_ml_run = mmf_multilevel.cli:run",
            "mmf_ml_doctor = mmf_multilevel.compat.doctor:main",
            "mmf_ml_extract = mmf_multilevel.extraction.cli:run",
            "mmf_ml_predict = mmf_multilevel.predict.cli:main",
            "mmf_ml_serve = mmf_multilevel.predict.serve:main",
        ]
    },
)
