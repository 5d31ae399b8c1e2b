"""What an evaluation leaves for its user: per-query predictions files, and a trained checkpoint evaluated on a
new query file without its collection (`--validation_file` alone)."""

import json
import shutil

import numpy as np
import pytest

import run_dsi_image
from conftest import run_script, tiny_args
from vit_t5_dsi.training.predictions import prediction_records


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def hits_at(records, k, prefix=""):
    return sum(r[f"{prefix}gold_rank"] is not None and r[f"{prefix}gold_rank"] <= k for r in records) / len(records)


def train(tmp_path, name, *extra):
    args = tiny_args(tmp_path, "--output_dir", str(tmp_path / name), *extra)
    return run_dsi_image.main(args), tmp_path / name


class FakeIndex:
    keys = ["a.png", "b.png", "c.png", "d.png"]


def test_prediction_records_on_a_hand_made_case():
    dataset = {"query_id": [0, 1, 2], "caption": ["red", "blue", "green"]}
    positions = np.array([[[2, 0, -1], [0, 2, -1]], [[1, 3, 0], [3, 1, 0]], [[3, 2, 1], [3, 2, 1]],
                          [[2, 0, -1], [0, 2, -1]]])  # query 0 repeated: distributed padding
    scores = np.array([[[-0.1, -2.0, -np.inf], [-0.3, -0.5, -np.inf]]] * 4)
    labels = np.array([[0, 0], [1, 1], [0, 2], [0, 0]])
    records = prediction_records(dataset, (positions, scores), labels, FakeIndex())
    assert [r["query_id"] for r in records] == [0, 1, 2]
    assert [(r["gold_rank"], r["reranked_gold_rank"]) for r in records] == [(2, 1), (1, 2), (None, None)]
    assert records[0]["query"] == "red" and records[0]["gold"] == "a.png"
    assert records[0]["top_k"] == [{"image_key": "c.png", "score": pytest.approx(-0.1)},
                                   {"image_key": "a.png", "score": pytest.approx(-2.0)}]  # the empty slot left out
    assert [h["image_key"] for h in records[0]["reranked_top_k"]] == ["a.png", "c.png"]


def test_every_query_set_writes_its_predictions_and_they_agree_with_the_metrics(tmp_path):
    metrics, out = train(tmp_path, "out", "--max_steps", "4")
    for prefix in ("eval", "seen", "index"):
        records = read_jsonl(out / f"{prefix}_predictions.jsonl")
        assert len(records) == metrics[f"{prefix}_num_queries"]
        assert len({r["query_id"] for r in records}) == len(records)
        for k in (1, 5, 10):
            assert hits_at(records, k) == pytest.approx(metrics[f"{prefix}_hits@{k}"])
        for record in records:
            keys = [hit["image_key"] for hit in record["top_k"]]
            assert 1 <= len(keys) <= 10 and len(set(keys)) == len(keys)
            assert all(isinstance(hit["score"], float) for hit in record["top_k"])
            assert (record["query"] is None) == (prefix == "index")
    captions = {r["query"] for r in read_jsonl(out / "eval_predictions.jsonl")}
    assert all(isinstance(c, str) and c for c in captions)


def test_no_predictions_file_when_turned_off(tmp_path):
    _, out = train(tmp_path, "out", "--max_steps", "2", "--save_predictions", "False")
    assert not list(out.glob("*_predictions.jsonl"))


def queries_of(run_dir, path, prefix="eval"):
    """The held-out queries of a finished run as a query file, in the prototype's JSONL layout."""
    rows = [{"image_id": r["gold"], "caption": r["query"]} for r in read_jsonl(run_dir / f"{prefix}_predictions.jsonl")]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("variant, scheme", [("cross_attention", "semantic"), ("dual_encoder", "naive")])
def test_a_query_file_evaluates_a_checkpoint_without_its_collection(tmp_path, variant, scheme):
    metrics, out = train(tmp_path, "out", "--max_steps", "4", "--variant", variant, "--docid_scheme", scheme)
    queries = queries_of(out, tmp_path / "queries.jsonl")
    shutil.rmtree(tmp_path / "data")  # the images are gone: the checkpoint alone answers caption queries
    again = run_dsi_image.main(["--model_name_or_path", str(out), "--do_train", "False", "--validation_file",
                                str(queries), "--output_dir", str(tmp_path / "eval"), "--disable_tqdm", "True",
                                "--per_device_eval_batch_size", "7"])
    for k in (1, 5, 10):
        assert again[f"eval_hits@{k}"] == pytest.approx(metrics[f"eval_hits@{k}"])
    assert again["eval_num_queries"] == metrics["eval_num_queries"]
    assert not any(key.startswith(("seen_", "index_")) for key in again)
    before, after = read_jsonl(out / "eval_predictions.jsonl"), read_jsonl(tmp_path / "eval" / "eval_predictions.jsonl")
    for old, new in zip(before, after):  # another batching (7 vs 16 queries) moves scores by float rounding only
        assert [h["image_key"] for h in new["top_k"]] == [h["image_key"] for h in old["top_k"]], old["query"]
        assert [h["score"] for h in new["top_k"]] == pytest.approx([h["score"] for h in old["top_k"]], abs=1e-4)
    assert json.loads((tmp_path / "eval" / "all_results.json").read_text())["eval_hits@1"] == again["eval_hits@1"]


def test_a_query_file_is_re_ranked_by_the_checkpoints_own_dual_encoder_unless_told_not_to(tmp_path):
    _, dense = train(tmp_path, "dense", "--max_steps", "4", "--variant", "dual_encoder", "--docid_scheme", "naive")
    _, out = train(tmp_path, "out", "--max_steps", "4")
    shutil.copytree(dense, out / "dual_encoder")
    queries = queries_of(out, tmp_path / "queries.jsonl")
    common = ["--model_name_or_path", str(out), "--do_train", "False", "--validation_file", str(queries),
              "--disable_tqdm", "True"]
    reranked = run_dsi_image.main(common + ["--output_dir", str(tmp_path / "eval")])
    assert "eval_rerank_hits@1" in reranked
    records = read_jsonl(tmp_path / "eval" / "eval_predictions.jsonl")
    assert hits_at(records, 1, "reranked_") == pytest.approx(reranked["eval_rerank_hits@1"])
    plain = run_dsi_image.main(common + ["--output_dir", str(tmp_path / "plain"), "--rerank_with", "none"])
    assert "eval_rerank_hits@1" not in plain and plain["eval_hits@1"] == reranked["eval_hits@1"]
    assert "reranked_top_k" not in read_jsonl(tmp_path / "plain" / "eval_predictions.jsonl")[0]


@pytest.mark.parametrize("rows, message", [
    ('{"image_id": "nope.png", "caption": "a red circle"}\n', "queries.jsonl:1: image 'nope.png' is not in the "
                                                               "checkpoint's index"),
    ('{"image_id": "scene_000000.png"}\n', "queries.jsonl:1: row for image 'scene_000000.png' has no 'caption'"),
    ('{"caption": "a red circle"}\n', "queries.jsonl:1: row has no 'image_id'"),
    ('{"image_id": "scene_000000.png", "caption": "  "}\n', "queries.jsonl:1: image 'scene_000000.png' caption"),
    ('not json\n', "queries.jsonl:1: not valid JSON"),
    ('\n', "queries.jsonl: no queries in the file"),
])
def test_bad_query_files_are_named_with_their_line(tmp_path, rows, message):
    _, out = train(tmp_path, "out", "--max_steps", "1", "--do_eval", "False")
    (tmp_path / "queries.jsonl").write_text(rows)
    result = run_script(["--model_name_or_path", str(out), "--do_train", "False", "--validation_file",
                         str(tmp_path / "queries.jsonl"), "--output_dir", str(tmp_path / "eval")])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert message in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "eval" / "all_results.json").exists()


@pytest.mark.parametrize("extra, message", [
    ([], "pass --model_name_or_path CKPT --do_train False"),
    (["--model_name_or_path", "ckpt"], "pass --model_name_or_path CKPT --do_train False"),
    (["--karpathy_json", "k.json", "--image_dir", "."], "--validation_file is the JSONL layout's"),
])
def test_a_query_file_needs_a_checkpoint_to_evaluate(tmp_path, extra, message):
    (tmp_path / "queries.jsonl").write_text('{"image_id": "a.png", "caption": "a red circle"}\n')
    with pytest.raises(run_dsi_image.UsageError, match=message.replace("(", r"\(")):
        run_dsi_image.main(["--validation_file", str(tmp_path / "queries.jsonl"), "--output_dir",
                            str(tmp_path / "eval"), *extra])
