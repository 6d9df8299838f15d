"""The ``mmf_run`` / ``mmf_predict`` launcher, installed over ``mmf_cli.run.run``.

Same command line and the same configuration as MMF's, with what rc10 lacks:

* ``distributed.world_size=N`` spawns N processes on CPU too (gloo), not only over
  CUDA devices;
* ``torchrun`` (``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_*``) gives each process
  its own device (rc10 put every torchrun rank on device 0), multi-node included;
* configuration mistakes (unknown key, missing file, unknown model or dataset) end
  with one ``mmf_run: error: ...`` line and exit status 2 instead of a traceback.
"""
import argparse
import difflib
import os
import socket
import sys

# Sections of the root config whose keys are fixed by defaults.yaml: a key there that
# the defaults do not know is a typo, not a setting.
STRICT_SECTIONS = ("training", "evaluation", "env", "distributed", "checkpoint")
# Top-level keys a user yaml may carry beyond those of defaults.yaml.
EXTRA_TOP_LEVEL = ("includes", "dataset", "multitasking")


class ConfigError(Exception):
    """A user-facing configuration mistake: reported as one line, exit status 2."""


def _suggest(key, candidates):
    close = difflib.get_close_matches(key, list(candidates), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_keys(node, reference, path, source):
    from omegaconf import DictConfig

    if not isinstance(node, (dict, DictConfig)) or not isinstance(reference, (dict, DictConfig)):
        return
    if len(reference) == 0:  # free-form section
        return
    for key in node.keys():
        where = f"{path}.{key}" if path else str(key)
        if key not in reference:
            raise ConfigError(f"unknown key '{where}' in {source}{_suggest(str(key), reference.keys())}")
        if where in ("evaluation.metrics", "checkpoint.pretrained_state_mapping"):
            continue
        _check_keys(node[key], reference[key], where, source)


def check_configuration(configuration):
    """Validate a built ``mmf.utils.configuration.Configuration``; raise ConfigError."""
    from mmf.common.registry import registry

    defaults = configuration._default_config
    user = getattr(configuration, "_user_config", {}) or {}
    source = f"config file '{configuration.config_path}'" if getattr(configuration, "config_path", None) else "the config"
    allowed_top = set(defaults.keys()) | set(EXTRA_TOP_LEVEL)
    for key in user.keys():
        if key not in allowed_top:
            raise ConfigError(f"unknown top-level key '{key}' in {source}{_suggest(str(key), allowed_top)}")
        if key in STRICT_SECTIONS:
            _check_keys(user[key], defaults[key], key, source)

    config = configuration.config
    if config.model is None:
        raise ConfigError("no model given: pass model=<name> or set `model:` in the config file")
    if registry.get_model_class(config.model) is None:
        names = sorted(registry.mapping["model_name_mapping"].keys())
        raise ConfigError(
            f"unknown model '{config.model}'{_suggest(config.model, names)}; registered models: {', '.join(names)}"
        )
    datasets = config.datasets
    if not datasets:
        raise ConfigError("no dataset given: pass datasets=<name>[,<name>...] or set `datasets:` in the config file")
    names = sorted(registry.mapping["builder_name_mapping"].keys())
    for dataset in str(datasets).split(","):
        dataset = dataset.strip()
        if registry.get_builder_class(dataset) is None:
            raise ConfigError(f"unknown dataset '{dataset}'{_suggest(dataset, names)}; registered datasets: {', '.join(names)}")
    trainer = config.training.trainer
    if registry.get_trainer_class(trainer) is None:
        trainers = sorted(registry.mapping["trainer_name_mapping"].keys())
        raise ConfigError(f"unknown trainer '{trainer}'; registered trainers: {', '.join(trainers)}")


def build_configuration(args):
    """MMF's Configuration for ``args``, with user mistakes turned into ConfigError."""
    from mmf.utils.configuration import Configuration

    try:
        configuration = Configuration(args)
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {e.filename or e}") from None
    except AttributeError as e:
        # rc10's _merge_with_dotlist: "While updating configuration option X is missing ..."
        message = " ".join(str(part) for part in e.args)
        if "While updating configuration" in message:
            raise ConfigError(f"unknown command-line override: {message.replace('While updating configuration', '').strip()}") from None
        raise
    except KeyError as e:
        message = e.args[0] if e.args else str(e)
        if "Required argument" in str(message):
            raise ConfigError(str(message)) from None
        raise
    configuration.args = args
    check_configuration(configuration)
    return configuration


def load_run_config(config_path, overrides=()):
    """The config ``mmf_run config=<config_path> <overrides>`` would run with (includes, the model's and the
    datasets' defaults), registered as MMF's global config: what a command reading a project (a ranking, a
    picture) starts from. A missing file is a ``FileNotFoundError``, a bad override a :class:`ConfigError`."""
    from mmf.common.registry import registry
    from mmf.utils.env import setup_imports

    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"--config {config_path}: no such file")
    setup_imports()
    config = build_configuration(parse_args([f"config={config_path}", *overrides])).get_config()
    registry.register("config", config)
    return config


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(opts=None):
    from mmf.utils.flags import flags

    if opts is None:
        return flags.get_parser().parse_args()
    return argparse.Namespace(config_override=None, local_rank=None, opts=list(opts))


def run(opts=None, predict=False):
    """Start an MMF job from the command line (or from ``opts``), as ``mmf_run`` does."""
    import torch
    from mmf.utils.distributed import infer_init_method
    from mmf.utils.env import setup_imports
    from mmf_cli import run as cli

    setup_imports()
    args = parse_args(opts)
    try:
        configuration = build_configuration(args)
    except ConfigError as e:
        prog = "mmf_predict" if predict else "mmf_run"
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)

    config = configuration.get_config()
    config.start_rank = 0
    if config.distributed.init_method is None:
        infer_init_method(config)

    if config.distributed.init_method is not None:
        local_rank = os.environ.get("LOCAL_RANK", getattr(args, "local_rank", None))
        if local_rank is not None:  # torchrun / torch.distributed.launch: one process per device
            cli.distributed_main(int(local_rank), configuration, predict)
        elif torch.cuda.device_count() > 1 and not config.distributed.no_spawn:
            config.start_rank = config.distributed.rank
            config.distributed.rank = None
            torch.multiprocessing.spawn(
                fn=cli.distributed_main, args=(configuration, predict), nprocs=torch.cuda.device_count()
            )
        else:
            cli.distributed_main(config.get("device_id") or 0, configuration, predict)
    elif config.distributed.world_size > 1:
        world_size = config.distributed.world_size
        if torch.cuda.is_available() and config.training.device != "cpu" and world_size > torch.cuda.device_count():
            print(
                f"mmf_run: error: distributed.world_size={world_size} but only "
                f"{torch.cuda.device_count()} CUDA devices are visible (use torchrun for several nodes)",
                file=sys.stderr,
            )
            sys.exit(2)
        config.distributed.init_method = f"tcp://127.0.0.1:{free_port()}"
        config.distributed.rank = None
        torch.multiprocessing.spawn(fn=cli.distributed_main, args=(configuration, predict), nprocs=world_size)
    else:
        config.device_id = 0
        cli.main(configuration, predict=predict)
