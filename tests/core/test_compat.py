"""The compatibility layer: each patch is needed, works, is scoped, and stays off when not needed."""
import inspect
import os
import subprocess
import sys
import types

import mmf  # noqa: F401  (through the installed import hook)
import mmf_cli.run  # noqa: F401
import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from mmf_multilevel.compat import launcher, patches


def make_module(tmp_path, name, code):
    """A real module file (so its source can be read), standing for a newer MMF's module."""
    import importlib.util

    path = tmp_path / f"{name}.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def python(code, **env):
    environment = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300)


# ------------------------------------------------------------------ the hook
def test_interpreter_start_is_cheap_and_hook_is_installed():
    result = python(
        "import sys; from mmf_multilevel.compat._bootstrap import MMFImportHook;"
        "print('torch' in sys.modules, 'mmf' in sys.modules, any(isinstance(f, MMFImportHook) for f in sys.meta_path))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "True"]


def test_plain_import_mmf_registers_our_components():
    result = python(
        "import mmf; from mmf.common.registry import registry;"
        "print(registry.get_trainer_class('mmf_multilevel').__name__, registry.get_builder_class('synthetic_vl').__name__)"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["MultilevelTrainer", "SyntheticVLBuilder"]


def test_rc10_does_not_import_without_the_layer():
    # the layer is needed: a pristine rc10 fails on today's stack
    result = python("import mmf", MMF_MULTILEVEL_DISABLE_HOOK="1")
    assert result.returncode != 0
    assert "ModuleNotFoundError" in result.stderr or "ImportError" in result.stderr


def test_every_patch_reports_its_state_and_what_it_serves():
    states = patches.status()
    assert len(states) >= 15
    for name, (state, serves) in states.items():
        assert state in ("applied", "not needed"), (name, state)
        assert ".py" in serves or "omegaconf" in serves, (name, serves)


def test_doctor_prints_the_patch_table():
    result = python("from mmf_multilevel.compat.doctor import main; main()")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "demjson_alias" in result.stdout and "applied" in result.stdout


# ------------------------------------------------------------ import patches
def test_demjson_alias():
    import demjson

    assert demjson.decode("{a: 1, 'b': [2]}") == {"a": 1, "b": [2]}
    assert patches._demjson_alias(None) is False  # present now: the patch stays off


def test_transformers_module_paths():
    from transformers.modeling_bert import BertEmbeddings  # noqa: F401
    from transformers.models.bert import modeling_bert
    from transformers.tokenization_auto import AutoTokenizer  # noqa: F401

    assert sys.modules["transformers.modeling_bert"] is modeling_bert
    assert patches._transformers_module_paths(None) is False


def test_bert_layer_norm_and_adamw():
    import transformers.optimization as optimization
    from transformers.models.bert import modeling_bert

    assert modeling_bert.BertLayerNorm is torch.nn.LayerNorm
    assert optimization.AdamW is torch.optim.AdamW
    assert patches._bert_layer_norm(None) is False
    assert patches._transformers_adamw(None) is False


def test_collections_abc_aliases():
    import collections
    import collections.abc

    assert collections.Mapping is collections.abc.Mapping
    assert patches._collections_abc(None) is False


def test_torchtext_standin_is_scoped_to_mmf_vocab():
    import mmf.utils.vocab as vocab

    assert vocab.vocab.pretrained_aliases == {}
    if patches.status()["torchtext_standin"][0] == "applied":
        with pytest.raises(ImportError):
            import torchtext  # noqa: F401
        with pytest.raises(ImportError, match="torchtext is not installed"):
            vocab.vocab.GloVe("6B")


# ----------------------------------------------------------------- omegaconf
def test_omegaconf_semantics_are_scoped_to_mmf_configs():
    from mmf.utils.configuration import Configuration

    plain = OmegaConf.create({"a": 1, "pretty": "kept"})
    with pytest.raises(ConfigAttributeError):
        plain.missing
    with pytest.raises(ConfigKeyError):
        plain["missing"]
    assert plain.pretty == "kept"

    config = Configuration().get_config()
    assert config.not_a_key is None
    assert config["not_a_key"] is None
    assert config.training.not_a_key is None
    assert "max_updates:" in config.training.pretty()
    OmegaConf.set_struct(config, True)
    with pytest.raises(ConfigAttributeError):
        config.training.not_a_key


def test_env_resolver_survives_mmf_clear_resolvers(tmp_path, monkeypatch):
    from mmf.utils.configuration import Configuration, load_yaml

    Configuration()  # clears and re-registers resolvers
    path = tmp_path / "env.yaml"
    path.write_text("a: ${env:MMF_TEST_ENV_VALUE,fallback}\nb: ${env:MMF_TEST_ENV_UNSET,fallback}\n")
    monkeypatch.setenv("MMF_TEST_ENV_VALUE", "from-env")
    loaded = load_yaml(str(path))
    assert (loaded.a, loaded.b) == ("from-env", "fallback")


def test_omegaconf_patch_stays_off_for_omegaconf_2_0(monkeypatch):
    import omegaconf

    monkeypatch.setattr(omegaconf, "__version__", "2.0.6")
    assert patches._omegaconf_missing_is_none(None) is False
    assert patches._configuration_legacy_scope(types.SimpleNamespace()) is False


# ------------------------------------------------------- configuration files
def test_default_config_is_ours_and_complete():
    from mmf.utils import configuration

    assert configuration.get_default_config_path() == patches.DEFAULTS_YAML
    defaults = OmegaConf.load(patches.DEFAULTS_YAML)
    for section in ("training", "evaluation", "env", "distributed", "checkpoint", "optimizer", "scheduler"):
        assert section in defaults
    for key in ("fp16", "bf16", "update_frequency", "batch_size_per_device", "early_stop"):
        assert key in defaults.training
    fake = types.SimpleNamespace(get_default_config_path=lambda: patches.DEFAULTS_YAML)
    assert patches._default_config(fake) is False  # an MMF that ships its file keeps it


def test_model_and_datasets_may_come_from_the_config_file(tmp_path):
    code = "class Configuration:\n    def _build_model_config(self, config):\n        return config.get('m')\n"
    assert patches._model_and_datasets_from_config_file(make_module(tmp_path, "newer_configuration", code)) is False


def test_visual_bert_config_path_points_at_our_yaml():
    from mmf.models.visual_bert import VisualBERT

    path = VisualBERT.config_path()
    assert os.path.exists(path)
    assert OmegaConf.load(path).model_config.visual_bert.finetune_lr_multiplier == 1


# --------------------------------------------------------------- distributed
def test_rank_helpers_do_not_depend_on_nccl(tmp_path):
    from mmf.utils import distributed

    assert "is_nccl_available" not in inspect.getsource(distributed.get_world_size)
    assert distributed.get_world_size() == 1 and distributed.get_rank() == 0 and distributed.is_master()
    # a newer MMF whose helpers are fine keeps them
    fake = make_module(tmp_path, "newer_distributed", "def get_world_size():\n    return 1\n")
    assert patches._distributed_any_backend(fake) is False
    fake = make_module(tmp_path, "newer_distributed_init", "def distributed_init(config):\n    return 0\n")
    assert patches._distributed_init_any_device(fake) is False


def test_distributed_init_has_no_cuda_call():
    from mmf.utils import distributed

    assert ".cuda()" not in inspect.getsource(distributed.distributed_init)
    with pytest.raises(ValueError):
        distributed.distributed_init(OmegaConf.create({"distributed": {"world_size": 1}}))


def test_backend_resolution():
    expected = "nccl" if torch.cuda.is_available() else "gloo"
    assert patches.resolve_backend("auto") == expected
    assert patches.resolve_backend(None) == expected
    assert patches.resolve_backend("nccl") == expected
    assert patches.resolve_backend("gloo") == "gloo"


# --------------------------------------------------------- hard-coded .cuda()
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_visual_bert_runs_on_cpu_and_cuda_stays_untouched_elsewhere():
    from mmf.common.registry import registry
    from mmf.common.sample import Sample, SampleList

    config = OmegaConf.load(os.path.join(os.path.dirname(patches.DEFAULTS_YAML), "models", "visual_bert", "defaults.yaml"))
    model_config = config.model_config.visual_bert
    model_config.update(
        bert_model_name=None, training_head_type="classification", num_labels=3, visual_embedding_dim=6,
        vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, model="visual_bert", losses=[],
    )
    patches.mark_legacy(model_config)
    model = registry.get_model_class("visual_bert")(model_config)
    model.build()
    model.init_losses()
    model.eval()
    samples = []
    for i in range(2):
        sample = Sample()
        sample.input_ids = torch.randint(1, 20, (5,))
        sample.input_mask = torch.ones(5, dtype=torch.long)
        sample.segment_ids = torch.zeros(5, dtype=torch.long)
        sample.image_feature_0 = torch.randn(4, 6)
        sample.image_info_0 = Sample({"max_features": torch.tensor(3)})
        samples.append(sample)
    batch = SampleList(samples)
    batch.dataset_name, batch.dataset_type = "synthetic_vl", "val"
    output = model(batch)
    assert output["scores"].shape == (2, 3)
    # outside MMF's methods a bare .cuda() still means CUDA
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1).cuda()


def test_cuda_scoping_stays_off_for_code_without_cuda_calls(tmp_path):
    fake = make_module(tmp_path, "newer_model", "class M:\n    def forward(self, x):\n        return x.to('cpu')\n")
    assert patches._scope_cuda_calls(fake) is False


# ----------------------------------------------------------------- launcher
def test_stock_cli_runs_through_our_launcher(tmp_path):
    assert mmf_cli.run.run is launcher.run
    newer = make_module(tmp_path, "newer_cli", "def run(opts=None, predict=False):\n    return None\n")
    assert patches._cli_launcher(newer) is False


@pytest.mark.slow
def test_wheel_ships_the_hook_the_configs_and_finds_them_installed(tmp_path):
    """``pip wheel .`` (what a non-editable ``pip install .`` installs) carries the import hook, the
    top-level configs/ and feature_extraction/configs/ inside the package, and every method's defaults;
    unpacked and imported from there, the config lookups find the installed copies."""
    import shutil

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # build from a copy of the files git tracks or would track: an in-tree build/ left by an earlier build would leak
    # stale modules into the wheel
    source = tmp_path / "src"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout:
        for name in listed.stdout.split("\0"):
            if name and os.path.isfile(os.path.join(root, name)):
                os.makedirs(source / os.path.dirname(name), exist_ok=True)
                shutil.copy2(os.path.join(root, name), source / name)
    else:  # not a git checkout
        shutil.copytree(root, source, ignore=shutil.ignore_patterns(".venv", "build", "dist", "*.egg-info", ".git"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import glob
    import zipfile

    wheel = glob.glob(str(tmp_path / "mmf_multilevel-*.whl"))[0]
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("mmf_multilevel_hook.pth", "mmf_multilevel/configs/defaults.yaml",
                 "mmf_multilevel/configs/models/visual_bert/defaults.yaml",
                 "mmf_multilevel/configs/datasets/vqa2/defaults.yaml",
                 "mmf_multilevel/extraction/configs/butd_r101.yaml", "mmf_multilevel/extraction/configs/vinvl_x152c4.yaml",
                 "mmf_multilevel/methods/semvlp/defaults.yaml", "mmf_multilevel/methods/muvla/defaults.yaml",
                 "mmf_multilevel/methods/muvla/configs/muvla_region_tag.yaml", "mmf_multilevel/zoo/models.yaml"):
        assert name in names, name
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    script = (
        "import os\n"
        "from mmf_multilevel import paths\n"
        "from mmf_multilevel.extraction.detectors import config_path\n"
        "from mmf.common.registry import registry\n"
        "here = os.path.dirname(paths.__file__)\n"
        "found = [paths.CONFIG_DIR, config_path('butd_r101'), config_path('vinvl_x152c4'),\n"
        "         registry.get_model_class('semvlp').config_path(), registry.get_builder_class('vqa2').config_path(),\n"
        "         registry.get_builder_class('muvla_region_tag').config_path()]\n"
        "for path in found:\n"
        "    assert path.startswith(here) and os.path.exists(path), path\n"
        "print('installed copies found', len(found))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(unpacked), PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                         cwd=str(tmp_path))
    assert run.returncode == 0 and "installed copies found 6" in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]
