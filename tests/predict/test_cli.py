"""mmf_ml_predict: one query as JSON on stdout; a jsonl batch, resumable, bad lines reported by number."""
import json
import os
import subprocess
import sys

import pytest

from helpers.mmf import ROOT, clean_env
from mmf_multilevel.datasets import generate as gen


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_cli_data")
    gen.generate(root / "demo", num_images=24, progress=False)
    return root


def predict_command(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "mmf_multilevel.predict", *args], cwd=tmp_path,
                          env=clean_env(tmp_path, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)


def val_records(data):
    with open(data / "demo" / "annotations" / "vqa_val.jsonl") as handle:
        return [json.loads(line) for line in handle]


def test_one_question_prints_the_answer_as_json_and_errors_exit_2(data, tmp_path):
    record = val_records(data)[0]
    image = data / "demo" / "images" / f"{record['image_id']}.jpg"
    assert image.is_file()
    config = f"{ROOT}/projects/soho/demo/vqa.yaml"
    result = predict_command(tmp_path, "--config", config, "--image", str(image), "--question", record["question"],
                             "--top-k", "3", f"env.data_dir={data}")
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout[result.stdout.index("{"):])
    assert output["method"] == "soho" and output["task"] == "vqa" and output["question"] == record["question"]
    assert output["answer"] == output["top_k"][0]["answer"] and len(output["top_k"]) == 3
    result = predict_command(tmp_path, "--config", config, "--image", str(tmp_path / "absent.jpg"), "--question", "what?",
                             f"env.data_dir={data}")
    assert result.returncode == 2 and "mmf_ml_predict: error: image '" in result.stderr and "absent.jpg': no such file" \
        in result.stderr


def test_batch_is_resumable_and_reports_bad_lines_by_number(data, tmp_path, capsys):
    from mmf_multilevel.predict import load_predictor
    from mmf_multilevel.predict.cli import run_batch

    predictor = load_predictor(f"{ROOT}/projects/semvlp/demo/vqa.yaml", overrides=[f"env.data_dir={data}"],
                               device="cpu")
    records = val_records(data)[:4]
    lines = [json.dumps({"id": f"q{i}", "image_id": r["image_id"], "question": r["question"]}) for i, r in
             enumerate(records)]
    lines.insert(2, "{not json")
    lines.append(json.dumps({"id": "missing", "question": "what?"}))
    lines.append(json.dumps({"id": "both", "image_id": records[0]["image_id"], "question": "a", "text": "b"}))
    lines.append(json.dumps({"id": "q0", "image_id": records[0]["image_id"], "question": "again"}))
    lines.append(json.dumps({"id": "gone", "image_id": "no_such_image", "question": "what?"}))
    batch = tmp_path / "queries.jsonl"
    batch.write_text("\n".join(lines) + "\n")
    out = tmp_path / "results.jsonl"
    counts = run_batch(predictor, str(batch), str(out))
    assert counts == {"predicted": 4, "skipped": 0, "bad": 5}
    errors = capsys.readouterr().err
    assert "queries.jsonl line 3: not JSON" in errors
    assert "line 6: give 'image' (a path) or 'image_id'" in errors
    assert "line 7: give exactly one of 'question' (VQA) and 'text'" in errors
    assert "line 8: id 'q0' repeats an earlier line's" in errors
    assert "line 9: the region cache" in errors and "no regions for image_id 'no_such_image'" in errors
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in results] == ["q0", "q1", "q2", "q3"]
    for result, record in zip(results, records):
        expected = predictor.vqa(None, record["question"], image_id=record["image_id"])
        assert result["answer"] == expected["answer"] and result["score"] == pytest.approx(expected["score"])
    # a run killed while writing its last result: the cut line is dropped and that query predicted again
    text = out.read_text()
    out.write_text(text[: text.rindex('{"id": "q3"') + 20])
    counts = run_batch(predictor, str(batch), str(out))
    assert counts == {"predicted": 1, "skipped": 3, "bad": 5}
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["q0", "q1", "q2", "q3"]
    assert run_batch(predictor, str(batch), str(out))["predicted"] == 0
    # an output that is not this command's results is refused, not overwritten
    other = tmp_path / "other.jsonl"
    other.write_text("[1, 2]\n")
    from mmf_multilevel.predict.cli import BatchLineError

    with pytest.raises(BatchLineError, match=r"--out .*other\.jsonl line 1: not a result line of mmf_ml_predict"):
        run_batch(predictor, str(batch), str(other))
    assert os.path.getsize(other) == len("[1, 2]\n")
