"""Configuration mistakes end with one clear line and exit status 2, not a traceback."""
import pytest

from helpers.mmf import TINY_CONFIG


def error_lines(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return [line for line in lines if "error" in line.lower() or "Traceback" in line]


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_unknown_key_in_yaml(tmp_path, mmf_run):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"includes:\n- {TINY_CONFIG}\ntraining:\n  max_update: 3\n")
    result = mmf_run(config=str(bad), check=False)
    assert_one_line_error(result, "training.max_update", "bad.yaml", "did you mean 'max_updates'")


def test_unknown_top_level_key_in_yaml(tmp_path, mmf_run):
    bad = tmp_path / "bad_top.yaml"
    bad.write_text(f"includes:\n- {TINY_CONFIG}\ntrainig:\n  seed: 3\n")
    result = mmf_run(config=str(bad), check=False)
    assert_one_line_error(result, "'trainig'", "did you mean 'training'")


def test_unknown_command_line_override(tmp_path, mmf_run):
    result = mmf_run("training.batchsize=3", check=False)
    assert_one_line_error(result, "training.batchsize")


def test_missing_config_file(tmp_path, mmf_run):
    result = mmf_run(config=str(tmp_path / "nope.yaml"), check=False)
    assert_one_line_error(result, "config file not found", "nope.yaml")


def test_unknown_model(tmp_path, mmf_run):
    result = mmf_run("model=visual_bart", check=False)
    assert_one_line_error(result, "unknown model 'visual_bart'", "did you mean 'visual_bert'", "registered models")


def test_unknown_dataset(tmp_path, mmf_run):
    result = mmf_run("datasets=synthetic_vk", check=False)
    assert_one_line_error(result, "unknown dataset 'synthetic_vk'", "synthetic_vl")


@pytest.mark.parametrize("script", ["mmf_run", "mmf_ml_run"])
def test_no_model_given(tmp_path, mmf_run, script):
    result = mmf_run("datasets=synthetic_vl", config=None, script=script, check=False)
    assert_one_line_error(result, "model")
