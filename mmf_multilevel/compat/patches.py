"""Every adaptation of MMF 1.0.0rc10 to today's stack, one function each.

Each patch

* names the MMF file and line it serves (``serves``),
* decides from the installed software whether it is needed (a newer MMF, a
  library that kept the old API, ... turn it off by themselves),
* is applied at the latest possible moment by the import hook in
  :mod:`._bootstrap`: ``stage="import"`` patches right before ``mmf/__init__.py``
  runs, module patches right after the module they target has executed.

``status()`` reports what happened; ``python -m mmf_multilevel.compat`` prints it.
"""
import collections
import collections.abc
import functools
import importlib
import importlib.util
import inspect
import os
import sys
import threading
import types
import warnings

from mmf_multilevel.paths import CONFIG_DIR

_STATUS = {}
_PATCHES = []  # (stage_or_module, name, serves, function)
_registered_plugin = False

LEGACY_FLAG = "mmf_legacy_semantics"
"""OmegaConf flag set on the configs MMF builds: only they get omegaconf-2.0 semantics."""

DEFAULTS_YAML = os.path.join(CONFIG_DIR, "defaults.yaml")


class _Patch:
    def __init__(self, target, name, serves, func):
        self.target, self.name, self.serves, self.func = target, name, serves, func


def patch(target, serves):
    """Register ``func(module) -> bool`` for ``target`` ("import" or a module name).

    The function checks whether the patch is needed, applies it and returns True,
    or returns False when the installed software does not need it.
    """

    def decorator(func):
        name = func.__name__.lstrip("_")
        _PATCHES.append(_Patch(target, name, serves, func))
        _STATUS.setdefault(name, "pending")
        return func

    return decorator


def _run(target, module):
    for p in _PATCHES:
        if p.target != target or _STATUS.get(p.name) in ("applied", "not needed"):
            continue
        _STATUS[p.name] = "applied" if p.func(module) else "not needed"


def status():
    """``{name: (state, serves)}`` for every patch."""
    return {p.name: (_STATUS[p.name], p.serves) for p in _PATCHES}


def before_module(fullname, module):
    if fullname == "mmf":
        _run("import", None)
    _run("before:" + fullname, module)


def after_module(fullname, module):
    _run(fullname, module)
    if fullname == "mmf":
        register_plugin()


def apply_to_loaded_modules():
    """Late activation: apply module patches to MMF modules that are already loaded."""
    _run("import", None)
    for p in list(_PATCHES):
        if p.target in sys.modules:
            _run(p.target, sys.modules[p.target])
    register_plugin()


def register_plugin(deferred=False):
    """Import the modules that register our models, datasets, trainer... with MMF (``deferred``: called
    by the import hook once the module of ours that imported ``mmf`` has finished executing)."""
    global _registered_plugin
    if _registered_plugin:
        return
    from mmf_multilevel.compat import _bootstrap

    if not deferred and _bootstrap.own_modules_initializing():
        # a module of ours imported mmf: register once it (and whatever imported it) is complete
        _bootstrap.defer_registration()
        return
    _registered_plugin = True
    importlib.import_module("mmf_multilevel.register")


def _source(obj):
    """Source text of ``obj``; for code without source (e.g. byte-code only installs), the
    source of rc10's version when the installed MMF is rc10, else an empty string."""
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        mmf = sys.modules.get("mmf")
        return _RC10_MARKER if getattr(mmf, "__version__", None) == "1.0.0rc10" else ""


# Present in every rc10 function a source check looks for: assume rc10 needs its patch.
_RC10_MARKER = "is_nccl_available .cuda() torch.cuda.device_count() model = config.model"


def _missing(module_name):
    try:
        return importlib.util.find_spec(module_name) is None
    except (ImportError, ValueError):
        return True


# --------------------------------------------------------------------------- import
@patch("import", "mmf/utils/configuration.py:8 `import demjson` (demjson 2.2.4 no longer builds)")
def _demjson_alias(_):
    if not _missing("demjson"):
        return False
    sys.modules["demjson"] = importlib.import_module("demjson3")
    return True


_TRANSFORMERS_MOVED = {
    # old path (transformers 2.x/3.x)    -> path in transformers 4.x
    "transformers.modeling_bert": "transformers.models.bert.modeling_bert",
    "transformers.configuration_bert": "transformers.models.bert.configuration_bert",
    "transformers.tokenization_auto": "transformers.models.auto.tokenization_auto",
    "transformers.modeling_auto": "transformers.models.auto.modeling_auto",
    "transformers.configuration_auto": "transformers.models.auto.configuration_auto",
}


@patch(
    "import",
    "mmf/modules/embeddings.py:11, mmf/modules/encoders.py:9-10, "
    "mmf/datasets/processors/bert_processors.py:6, mmf/modules/layers.py:125-128, "
    "mmf/models/{visual_bert,vilbert,mmbt,mmf_bert,m4c}.py imports of transformers.modeling_bert",
)
def _transformers_module_paths(_):
    applied = False
    for old, new in _TRANSFORMERS_MOVED.items():
        if _missing(old):
            sys.modules[old] = importlib.import_module(new)
            applied = True
    return applied


def _restore_attribute(module_name, attribute, value):
    """Set ``module.attribute = value()`` where a library dropped a name MMF imports."""
    module = importlib.import_module(module_name)
    if hasattr(module, attribute):
        return False
    setattr(module, attribute, value())
    return True


@patch("import", "mmf/models/m4c.py:8, mmf/models/mmf_bert.py:5, mmf/models/vilbert.py:13 (BertLayerNorm)")
def _bert_layer_norm(_):
    import torch

    return _restore_attribute("transformers.models.bert.modeling_bert", "BertLayerNorm", lambda: torch.nn.LayerNorm)


@patch("import", "mmf/modules/optimizers.py:3 `from transformers.optimization import AdamW`")
def _transformers_adamw(_):
    import torch

    return _restore_attribute("transformers.optimization", "AdamW", lambda: torch.optim.AdamW)


_COLLECTION_ABCS = ("Mapping", "MutableMapping", "Sequence", "MutableSequence", "Iterable", "Callable", "Set")


@patch("import", "mmf/utils/logger.py:127 `collections.Mapping` (moved to collections.abc in Python 3.10)")
def _collections_abc(_):
    missing = [name for name in _COLLECTION_ABCS if not hasattr(collections, name)]
    for name in missing:
        setattr(collections, name, getattr(collections.abc, name))
    return bool(missing)


# ------------------------------------------------------------------ torchtext
def _torchtext_stub():
    def unavailable(*args, **kwargs):
        raise ImportError(
            "torchtext is not installed (no release installs beside torch 2.x); MMF's "
            "GloVe/fastText vocabulary processors are unavailable. mmf-multilevel does not use them."
        )

    root = types.ModuleType("torchtext")
    vocab = types.ModuleType("torchtext.vocab")
    vocab.pretrained_aliases = {}
    vocab.Vocab = vocab.Vectors = vocab.GloVe = vocab.FastText = unavailable
    root.vocab = vocab
    root.__mmf_multilevel_stub__ = True
    return {"torchtext": root, "torchtext.vocab": vocab}


_torchtext_saved = {}


@patch("before:mmf.utils.vocab", "mmf/utils/vocab.py:7 `from torchtext import vocab` (no torchtext for torch 2.x)")
def _torchtext_standin(_):
    try:
        importlib.import_module("torchtext.vocab")
        return False
    except Exception:  # missing, or a binary built for another torch
        pass
    for name, module in _torchtext_stub().items():
        _torchtext_saved[name] = sys.modules.get(name)
        sys.modules[name] = module
    return True


@patch("mmf.utils.vocab", "the torchtext stand-in is visible only while mmf/utils/vocab.py imports")
def _torchtext_standin_scope(_):
    if not _torchtext_saved:
        return False
    for name, previous in _torchtext_saved.items():
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous
    _torchtext_saved.clear()
    return True


# ------------------------------------------------------------------- omegaconf
def _omegaconf_needs_legacy():
    import omegaconf

    major, minor = (int(x) for x in omegaconf.__version__.split(".")[:2])
    return (major, minor) >= (2, 1)


def mark_legacy(cfg):
    """Give ``cfg`` (and every node below it) omegaconf-2.0 semantics; returns ``cfg``."""
    from omegaconf import Container

    if isinstance(cfg, Container):
        cfg._set_flag(LEGACY_FLAG, True)
    return cfg


def is_legacy(cfg):
    return cfg._get_flag(LEGACY_FLAG) is True


def _pretty(cfg, resolve=False, sort_keys=False):
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(cfg, resolve=resolve, sort_keys=sort_keys)


@patch(
    "import",
    "omegaconf>=2.1 raises on a missing key where MMF expects None "
    "(mmf/utils/configuration.py:520 `if config.learning_rate:` and throughout); "
    "`DictConfig.pretty()` (mmf/utils/checkpoint.py:139) was removed in 2.1. "
    "Scoped: only configs carrying the mmf_legacy_semantics flag are affected.",
)
def _omegaconf_missing_is_none(_):
    if not _omegaconf_needs_legacy():
        return False
    from omegaconf import DictConfig
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    if getattr(DictConfig.__getattr__, "_mmf_multilevel", False):
        return True
    getattr_ = DictConfig.__getattr__
    getitem_ = DictConfig.__getitem__

    def __getattr__(self, key):
        try:
            return getattr_(self, key)
        except ConfigAttributeError:
            if key.startswith("__") or not is_legacy(self):
                raise
            if key == "pretty":
                return functools.partial(_pretty, self)
            if self._get_flag("struct") is True:
                raise
            return None

    def __getitem__(self, key):
        try:
            return getitem_(self, key)
        except ConfigKeyError:
            if not isinstance(key, str) or not is_legacy(self) or self._get_flag("struct") is True:
                raise
            return None

    __getattr__._mmf_multilevel = True
    DictConfig.__getattr__ = __getattr__
    DictConfig.__getitem__ = __getitem__
    return True


def _legacy_env_resolver(key, default=None):
    value = os.environ.get(key, default)
    if value is None:
        raise KeyError(f"environment variable '{key}' is not set and the config gives no default")
    return value


@patch(
    "mmf.utils.configuration",
    "mmf/utils/configuration.py: Configuration marks the configs it builds (load_yaml, "
    "_build_opt_list, the merged config) for legacy omegaconf semantics, and "
    "_register_resolvers re-adds the `env:` resolver that OmegaConf.clear_resolvers() drops in 2.1+",
)
def _configuration_legacy_scope(module):
    if not _omegaconf_needs_legacy():
        return False
    from omegaconf import OmegaConf

    load_yaml = module.load_yaml

    @functools.wraps(load_yaml)
    def legacy_load_yaml(f):
        return mark_legacy(load_yaml(f))

    module.load_yaml = legacy_load_yaml

    cls = module.Configuration
    build_opt_list = cls._build_opt_list
    register_resolvers = cls._register_resolvers
    init = cls.__init__

    def _build_opt_list(self, opts):
        return mark_legacy(build_opt_list(self, opts))

    def _register_resolvers(self):
        with warnings.catch_warnings():
            # rc10 uses OmegaConf.register_resolver, deprecated (but working) since 2.1
            warnings.filterwarnings("ignore", message=r"register_resolver\(\) is deprecated")
            register_resolvers(self)
        if not OmegaConf.has_resolver("env"):
            OmegaConf.register_new_resolver("env", _legacy_env_resolver)

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        mark_legacy(self.config)

    cls._build_opt_list = _build_opt_list
    cls._register_resolvers = _register_resolvers
    cls.__init__ = __init__
    return True


@patch(
    "mmf.utils.configuration",
    "mmf/utils/configuration.py:244,252 _build_model_config/_build_dataset_config read `model` and "
    "`datasets` from the command line only; a config file that names them is enough here",
)
def _model_and_datasets_from_config_file(module):
    cls = module.Configuration
    source = _source(cls._build_model_config)
    if "model = config.model" not in source:
        return False
    build_user_config = cls._build_user_config

    def _build_user_config(self, opts):
        user_config = build_user_config(self, opts)
        if user_config:
            for key in ("model", "datasets", "dataset"):
                if opts.get(key) is None and user_config.get(key) is not None:
                    opts[key] = user_config[key]
        return user_config

    cls._build_user_config = _build_user_config
    return True


@patch("mmf.utils.configuration", "mmf/utils/configuration.py:67 get_default_config_path(): rc10 ships no configs/defaults.yaml")
def _default_config(module):
    if os.path.exists(module.get_default_config_path()):
        return False

    def get_default_config_path():
        return DEFAULTS_YAML

    module.get_default_config_path = get_default_config_path
    return True


# ----------------------------------------------------------------- distributed
@patch(
    "mmf.utils.distributed",
    "mmf/utils/distributed.py:17,31,43 get_rank/get_world_size/synchronize report a single "
    "process whenever NCCL is unavailable (CPU builds of torch), even under gloo",
)
def _distributed_any_backend(module):
    if "is_nccl_available" not in _source(module.get_world_size):
        return False
    import torch.distributed as dist

    def _initialized():
        return dist.is_available() and dist.is_initialized()

    def synchronize():
        if _initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def get_rank():
        return dist.get_rank() if _initialized() else 0

    def get_world_size():
        return dist.get_world_size() if _initialized() else 1

    def is_master():
        return get_rank() == 0

    for func in (synchronize, get_rank, get_world_size, is_master):
        func.__module__ = module.__name__
        setattr(module, func.__name__, func)
    return True


def resolve_backend(backend):
    """``nccl`` needs CUDA: fall back to ``gloo`` on CPU; ``auto``/None picks for the device."""
    import torch

    if backend in (None, "", "auto"):
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        return "gloo"
    return backend


@patch(
    "mmf.utils.distributed",
    "mmf/utils/distributed.py:235 `dist.all_reduce(torch.zeros(1).cuda())` in distributed_init "
    "(CUDA-only), and the nccl default backend on machines without CUDA",
)
def _distributed_init_any_device(module):
    source = _source(module.distributed_init)
    if ".cuda()" not in source:
        return False
    import socket

    import torch
    import torch.distributed as dist

    def distributed_init(config):
        if config.distributed.world_size == 1:
            raise ValueError("Cannot initialize distributed with distributed_world_size=1")
        if dist.is_initialized():
            warnings.warn("Distributed is already initialized, cannot initialize twice!")
        else:
            backend = resolve_backend(config.distributed.backend)
            print(f"Distributed Init (Rank {config.distributed.rank}): {config.distributed.init_method} [{backend}]", flush=True)
            dist.init_process_group(
                backend=backend,
                init_method=config.distributed.init_method,
                world_size=config.distributed.world_size,
                rank=config.distributed.rank,
            )
            print(f"Initialized Host {socket.gethostname()} as Rank {config.distributed.rank}", flush=True)
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            dist.all_reduce(torch.zeros(1, device=device))
            module.suppress_output(module.is_master())
        config.distributed.rank = dist.get_rank()
        return config.distributed.rank

    distributed_init.__module__ = module.__name__
    module.distributed_init = distributed_init
    return True


# ------------------------------------------------------ hard-coded .cuda() calls
_device_override = threading.local()


def _redirecting_cuda(original):
    @functools.wraps(original)
    def cuda(self, *args, **kwargs):
        device = getattr(_device_override, "device", None)
        if device is not None and not args and not kwargs:
            return self.to(device)
        return original(self, *args, **kwargs)

    cuda._mmf_multilevel_original = original
    return cuda


def _run_on_module_device(method):
    """Inside ``method``, a bare ``tensor.cuda()`` moves to the device of ``self``'s parameters."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            device = next(self.parameters()).device
        except (StopIteration, AttributeError):
            return method(self, *args, **kwargs)
        previous = getattr(_device_override, "device", None)
        _device_override.device = device
        try:
            return method(self, *args, **kwargs)
        finally:
            _device_override.device = previous

    wrapper._mmf_multilevel_device_scoped = True
    return wrapper


def _scope_cuda_calls(module):
    """Wrap every method of ``module``'s classes whose source calls a bare ``.cuda()``."""
    import torch

    wrapped = 0
    for cls in vars(module).values():
        if not isinstance(cls, type) or cls.__module__ != module.__name__:
            continue
        for attr, func in list(vars(cls).items()):
            if not inspect.isfunction(func) or getattr(func, "_mmf_multilevel_device_scoped", False):
                continue
            if ".cuda()" in _source(func):
                setattr(cls, attr, _run_on_module_device(func))
                wrapped += 1
    if wrapped and not hasattr(torch.Tensor.cuda, "_mmf_multilevel_original"):
        torch.Tensor.cuda = _redirecting_cuda(torch.Tensor.cuda)
    return wrapped > 0


@patch("mmf.models.visual_bert", "mmf/models/visual_bert.py:500 `.cuda()` in VisualBERT.add_custom_params")
def _visual_bert_device(module):
    return _scope_cuda_calls(module)


@patch("mmf.modules.embeddings", "mmf/modules/embeddings.py:389,408 `.cuda()` in BertVisioLinguisticEmbeddings")
def _embeddings_device(module):
    return _scope_cuda_calls(module)


@patch("mmf.models.vilbert", "mmf/models/vilbert.py:1262-1366 `.cuda()` in ViLBERT's pre-training heads")
def _vilbert_device(module):
    return _scope_cuda_calls(module)


@patch("mmf.models.visual_bert", "mmf/models/visual_bert.py:376 config_path() names configs/models/visual_bert/pretrain.yaml, absent from rc10")
def _visual_bert_config(module):
    from mmf.utils.general import get_mmf_root

    own = module.VisualBERT.config_path()
    if os.path.exists(os.path.join(get_mmf_root(), own)):
        return False
    path = os.path.join(os.path.dirname(DEFAULTS_YAML), "models", "visual_bert", "defaults.yaml")
    module.VisualBERT.config_path = classmethod(lambda cls: path)
    return True


@patch("mmf.models.unimodal", "mmf/models/unimodal.py:81 config_path() names configs/models/unimodal/image.yaml, absent from rc10")
def _unimodal_image_config(module):
    from mmf.utils.general import get_mmf_root

    own = module.UnimodalModal.config_path()
    if os.path.exists(os.path.join(get_mmf_root(), own)):
        return False
    path = os.path.join(os.path.dirname(DEFAULTS_YAML), "models", "unimodal_image", "defaults.yaml")
    module.UnimodalModal.config_path = classmethod(lambda cls: path)
    return True


@patch("mmf.models.unimodal", "mmf/models/unimodal.py:33 UnimodalBase.forward: `if len(x) == 2: x = x[1]` meant a BERT "
       "(sequence, pooled) tuple, but also takes the second image of every batch of two")
def _unimodal_batch_of_two(module):
    source = _source(module.UnimodalBase.forward)
    if "len(x) == 2" not in source:
        return False

    def forward(self, x, *args, **kwargs):
        x = self.encoder(x, *args, **kwargs)
        if isinstance(x, (tuple, list)) and len(x) == 2:  # a BERT encoder: the pooled output
            x = x[1]
        return torch.flatten(x, start_dim=1)

    import torch

    module.UnimodalBase.forward = forward
    return True


# ------------------------------------------------------------------------- model zoo
def _rc10_has_no_zoo():
    from mmf.utils.general import get_mmf_root

    return not os.path.exists(os.path.join(get_mmf_root(), "configs", "zoo", "models.yaml"))


def _user_zoo_from_config():
    try:
        from mmf.common.registry import registry

        config = registry.get("config", no_warning=True)
        value = config.env.get("user_zoo") if config is not None else None
    except Exception:
        return None
    return value or None


def zoo_download_pretrained_model(model_name, *args, **kwargs):
    """rc10's ``download_pretrained_model`` contract on our zoo (verified, atomic, offline-aware)."""
    from mmf_multilevel.zoo.zoo import download_model

    return download_model(model_name, extra=_user_zoo_from_config())


def zoo_load_pretrained_model(model_name_or_path, *args, **kwargs):
    """rc10's ``load_pretrained_model`` contract; checkpoints load with ``weights_only=True``."""
    from mmf_multilevel.zoo.zoo import load_pretrained

    return load_pretrained(model_name_or_path, extra=_user_zoo_from_config())


def _zoo_names(module, names):
    if not _rc10_has_no_zoo():
        return False
    functions = {"download_pretrained_model": zoo_download_pretrained_model, "load_pretrained_model": zoo_load_pretrained_model}
    for name in names:
        if hasattr(module, name):
            setattr(module, name, functions[name])
    return True


@patch("mmf.utils.download", "mmf/utils/download.py:334 download_pretrained_model(): rc10 ships no configs/zoo/models.yaml, "
       "checks the SHA-256 only after extracting and leaves failed downloads in place")
def _zoo_download(module):
    return _zoo_names(module, ["download_pretrained_model"])


@patch("mmf.utils.checkpoint", "mmf/utils/checkpoint.py:34,315 load_pretrained_model() (from_pretrained, "
       "checkpoint.resume_zoo): our zoo, one checkpoint per folder, torch.load(weights_only=True)")
def _zoo_checkpoint(module):
    return _zoo_names(module, ["download_pretrained_model", "load_pretrained_model"])


@patch("mmf.models.base_model", "mmf/models/base_model.py:51-52,180,196 BaseModel.from_pretrained / load_requirements")
def _zoo_base_model(module):
    return _zoo_names(module, ["download_pretrained_model", "load_pretrained_model"])


@patch("mmf.models.mmbt", "mmf/models/mmbt.py:20,515 MMBT.from_pretrained")
def _zoo_mmbt(module):
    return _zoo_names(module, ["load_pretrained_model"])


@patch("mmf.modules.encoders", "mmf/modules/encoders.py:16,56 the detectron weights of ImageFeatureEncoder")
def _zoo_encoders(module):
    return _zoo_names(module, ["download_pretrained_model"])


# ------------------------------------------------------------------------- CLI
@patch(
    "mmf_cli.run",
    "mmf_cli/run.py:96-121 run(): spawns only over CUDA devices (`assert world_size <= "
    "torch.cuda.device_count()`), gives every torchrun rank device 0, and prints tracebacks "
    "for configuration mistakes",
)
def _cli_launcher(module):
    source = _source(module.run)
    if "torch.cuda.device_count()" not in source:
        return False
    from mmf_multilevel.compat import launcher

    module.run = launcher.run
    return True
