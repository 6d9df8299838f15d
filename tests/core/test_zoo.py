"""Model zoo: real downloads from a local HTTP server, checksums, resume, atomic extraction, safe loading."""
import hashlib
import io
import pickle

import pytest
import torch

from helpers.mmf import clean_env, run_mmf
from helpers.zoo import tar_bytes
from mmf_multilevel.zoo import download as D
from mmf_multilevel.zoo import zoo as Z


def state_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def user_zoo(tmp_path, server, name, archive, hashcode=None, version="1.0_2026_12_01"):
    server.files[f"{name}.tar.gz"] = archive
    sha = hashcode or hashlib.sha256(archive).hexdigest()
    path = tmp_path / "user_zoo.yaml"
    path.write_text(
        f"tiny:\n  {name}:\n    version: {version}\n    resources:\n    - url: {server.url}/{name}.tar.gz\n"
        f"      file_name: {name}.tar.gz\n      hashcode: {sha}\n  defaults: ${{tiny.{name}}}\n"
    )
    return str(path)


CONFIG = b"model_config:\n  tiny:\n    hidden: 4\n"


def test_download_verify_extract_and_reuse_offline(tmp_path, server, monkeypatch):
    weights = {"w": torch.arange(6.0).view(2, 3)}
    archive = tar_bytes({"tiny.pth": state_bytes({"model": weights}), "config.yaml": CONFIG})
    zoo = user_zoo(tmp_path, server, "a", archive)
    data = tmp_path / "data"
    out = Z.load_pretrained("tiny.a", data_dir=data, extra=zoo)
    torch.testing.assert_close(out["checkpoint"]["w"], weights["w"])
    assert out["config"].hidden == 4
    folder = data / "models" / "tiny.a"
    assert (folder / ".built.json").is_file() and not list((data / "models").glob("*.tmp-*"))
    # cached: no request, even offline
    server.requests.clear()
    monkeypatch.setenv("MMF_ZOO_OFFLINE", "1")
    assert Z.download_model("tiny.a", data_dir=data, extra=zoo) == str(folder)
    assert Z.download_model("tiny", data_dir=data, extra=zoo).endswith("tiny.defaults")  # defaults -> same archive, cached download
    assert server.requests == []


def test_offline_and_not_cached_is_a_clear_error(tmp_path, server, monkeypatch):
    zoo = user_zoo(tmp_path, server, "b", tar_bytes({"m.pth": state_bytes({})}))
    monkeypatch.setenv("MMF_ZOO_OFFLINE", "1")
    with pytest.raises(D.ZooOfflineError, match="not downloading"):
        Z.download_model("tiny.b", data_dir=tmp_path / "data", extra=zoo)
    monkeypatch.delenv("MMF_ZOO_OFFLINE")
    server.files.clear()  # the server no longer has it
    with pytest.raises(D.ZooError, match="HTTP 404"):
        Z.download_model("tiny.b", data_dir=tmp_path / "data", extra=zoo)
    assert not (tmp_path / "data" / "models" / "tiny.b").exists()
    with pytest.raises(Z.ZooEntryError, match="no model zoo entry 'tiny.nope'"):
        Z.resolve("tiny.nope", extra=zoo)


def test_interrupted_download_resumes(tmp_path, server):
    payload = state_bytes({"model": {"w": torch.randn(300, 300)}})
    archive = tar_bytes({"m.pth": payload, "config.yaml": CONFIG})
    zoo = user_zoo(tmp_path, server, "c", archive)
    server.cut["c.tar.gz"] = len(archive) // 3
    out = Z.load_pretrained("tiny.c", data_dir=tmp_path / "data", extra=zoo)
    assert out["checkpoint"]["w"].shape == (300, 300)
    ranges = [r for name, r in server.requests if name == "c.tar.gz"]
    assert ranges[0] is None and ranges[1].startswith("bytes=")  # the retry continues where the cut left it
    resumed_at = int(ranges[1][len("bytes="):-1])
    assert 0 < resumed_at <= len(archive) // 3


def test_checksum_mismatch_is_refused_and_nothing_is_left(tmp_path, server):
    good = tar_bytes({"m.pth": state_bytes({"model": {}}), "config.yaml": CONFIG})
    zoo = user_zoo(tmp_path, server, "d", good, hashcode="0" * 64)
    with pytest.raises(D.ZooChecksumError, match=r"SHA-256 of d\.tar\.gz is [0-9a-f]{64}, the zoo expects 0{64}"):
        Z.download_model("tiny.d", data_dir=tmp_path / "data", extra=zoo)
    models = tmp_path / "data" / "models"
    assert not (models / "tiny.d").exists() and not (models / "downloads" / "d.tar.gz").exists()


def test_truncated_archive_is_refused_atomically(tmp_path, server):
    good = tar_bytes({"m.pth": state_bytes({"model": {"w": torch.randn(200, 200)}}), "config.yaml": CONFIG})
    broken = good[: len(good) // 2]
    zoo = user_zoo(tmp_path, server, "e", broken)  # the checksum is the broken file's: it passes
    with pytest.raises(D.ZooArchiveError, match=r"e\.tar\.gz: truncated or corrupt archive"):
        Z.download_model("tiny.e", data_dir=tmp_path / "data", extra=zoo)
    models = tmp_path / "data" / "models"
    assert not (models / "tiny.e").exists() and not list(models.glob("*.tmp-*"))


def test_archive_paths_outside_the_folder_are_refused(tmp_path, server):
    zoo = user_zoo(tmp_path, server, "f", tar_bytes({"../../evil.txt": b"x"}))
    with pytest.raises(D.ZooArchiveError, match="outside the model folder"):
        Z.download_model("tiny.f", data_dir=tmp_path / "data", extra=zoo)
    assert not (tmp_path / "evil.txt").exists()


class Arbitrary:
    pass


def test_legacy_pickles_need_an_explicit_opt_in(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.yaml").write_bytes(CONFIG)
    torch.save({"model": {"w": torch.ones(1)}, "extra": Arbitrary()}, folder / "m.pth", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(Z.UnsafeCheckpointError, match="MMF_ZOO_ALLOW_PICKLE=1"):
        Z.load_pretrained(str(folder))
    assert Z.load_pretrained(str(folder), allow_pickle=True)["checkpoint"]["w"].item() == 1.0


def test_package_zoo_has_mmf_visual_bert_names():
    entry, folder = Z.resolve("visual_bert.pretrained.coco")
    assert folder == "visual_bert.pretrained.coco.defaults"
    assert entry["resources"][0]["url"].startswith("mmf://models/visual_bert/")
    assert len(entry["resources"][0]["hashcode"]) == 64
    assert D.expand_url("mmf://models/x.tar.gz") == "https://dl.fbaipublicfiles.com/mmf/data/models/x.tar.gz"


@pytest.mark.slow
def test_from_pretrained_and_resume_zoo_through_mmf(tmp_path, server):
    """A model trained by mmf_run, published in a user zoo over HTTP, then loaded by MMF's own paths."""
    train = tmp_path / "train"
    run_mmf(tmp_path, f"env.save_dir={train}", "training.max_updates=4", "training.evaluation_interval=4",
            "training.checkpoint_interval=4")
    state = torch.load(train / "visual_bert_final.pth", weights_only=True)
    archive = tar_bytes({"visual_bert_final.pth": (train / "visual_bert_final.pth").read_bytes(),
                         "config.yaml": (train / "config.yaml").read_bytes()})
    server.files["vb.tar.gz"] = archive
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(
        "visual_bert:\n  user:\n    synthetic:\n      version: 1.0_2026_12_01\n      resources:\n"
        f"      - url: {server.url}/vb.tar.gz\n        file_name: vb.tar.gz\n"
        f"        hashcode: {hashlib.sha256(archive).hexdigest()}\n"
    )
    data = tmp_path / "data"
    env = clean_env(tmp_path, MMF_USER_ZOO=zoo, MMF_DATA_DIR=data)
    # from_pretrained in a fresh interpreter: MMF's BaseModel.from_pretrained through our zoo
    script = (
        "import torch, mmf\n"
        "from mmf.models.visual_bert import VisualBERT\n"
        "m = VisualBERT.from_pretrained('visual_bert.user.synthetic')\n"
        f"ref = torch.load({str(train / 'visual_bert_final.pth')!r}, weights_only=True)\n"
        "own = m.state_dict()\n"
        "assert all(torch.equal(own[k], v) for k, v in ref.items()), 'weights differ'\n"
        "assert not m.training\n"
        "print('loaded', len(ref))\n"
    )
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"loaded {len(state)}" in result.stdout
    # checkpoint.resume_zoo through the stock mmf_run, from the cache (the server is gone)
    server.files.clear()
    save = tmp_path / "finetune"
    run_mmf(tmp_path, f"env.save_dir={save}", "training.max_updates=2", "checkpoint.resume_zoo=visual_bert.user.synthetic",
            env=env)
    log = (save / "train.log").read_text()
    assert "Loading checkpoint" in log and "Checkpoint loaded" in log
