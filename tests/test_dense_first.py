"""The dense-then-generative recipe end to end: rq ids from the dual encoder it trains first, dense re-ranking,
reuse and resumption of the dense stage, and the flags that cannot go together."""

import json
import shutil

import pytest

import run_dsi_image
from conftest import accelerate_launcher, run_script, tiny_args

RECIPE = ("--docid_scheme", "rq", "--dense_first", "--rerank_with", "dense_first", "--rq_codes_per_level", "4")


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("recipe")
    metrics = run_dsi_image.main(tiny_args(tmp_path, *RECIPE, "--dense_first_epochs", "2", "--save_strategy", "steps",
                                           "--save_steps", "3"))
    return tmp_path, metrics


def test_recipe_trains_the_dual_encoder_first_and_reports_both(recipe_run):
    tmp_path, metrics = recipe_run
    out = tmp_path / "out"
    dense = out / "dual_encoder"
    for name in ("model.safetensors", "image_index.json", "image_embeddings.safetensors", "processor_config.json",
                 "all_results.json", "README.md"):
        assert (dense / name).exists(), name  # a complete checkpoint of its own
    assert not list(dense.glob("checkpoint-*"))  # finished: only the final model is kept (and pushed)
    dense_results = json.loads((dense / "all_results.json").read_text())
    assert json.loads((dense / "trainer_state.json").read_text())["epoch"] == pytest.approx(2.0)
    results = json.loads((out / "all_results.json").read_text())
    for key in ("eval_hits@1", "eval_rerank_hits@1", "eval_rerank_hits@10", "seen_rerank_mrr@10",
                "dense_eval_hits@1", "dense_seen_hits@10", "dense_index_hits@1"):
        assert key in results and 0.0 <= results[key] <= 1.0, key
        assert results[key] == pytest.approx(metrics[key])
    assert results["dense_eval_hits@1"] == pytest.approx(dense_results["eval_hits@1"])
    assert not any(key.startswith("index_rerank") for key in results)  # image queries are not re-ranked
    # re-ranking only re-orders the beam's candidates: what is in the top 10 cannot change
    assert results["eval_rerank_hits@10"] == pytest.approx(results["eval_hits@10"])

    protocol = json.loads((out / "protocol.json").read_text())
    assert protocol["docid_scheme"] == "rq" and protocol["id_embeddings"].startswith("dense_first")
    info = protocol["docid_scheme_info"]
    assert info["num_levels"] == 3 and info["codes_per_level"] == [4, 4, 4]
    assert len(info["codes_used_per_level"]) == 3 and "colliding_images" in info
    assert protocol["rerank_with"] == {"model": str(dense), "weight": 0.5}
    index = json.loads((out / "image_index.json").read_text())
    assert index["scheme"] == "rq" and all(s.startswith("<l0_c") for s in index["id_strings"])
    card = (out / "README.md").read_text()
    assert "| held-out captions, dense re-ranked |" in card and "dual encoder (dense first)" in card
    # both models share one tokenizer: the generative one only adds the id tokens
    dense_vocab = json.loads((dense / "tokenizer.json").read_text())["model"]["vocab"]
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    assert dense_vocab == vocab


def test_retriever_reranks_with_the_dense_first_model(recipe_run):
    from vit_t5_dsi import DSIRetriever

    tmp_path, _ = recipe_run
    out = tmp_path / "out"
    plain = DSIRetriever.from_pretrained(str(out), device="cpu", rerank=False).retrieve(["a red circle"], top_k=5)[0]
    reranked = DSIRetriever.from_pretrained(str(out), device="cpu", rerank_with=str(out / "dual_encoder"),
                                            rerank_weight=1.0).retrieve(["a red circle"], top_k=5)[0]
    # by default the checkpoint's own dual_encoder/ re-ranks (weight 0.5), as rerank_with names it
    default = DSIRetriever.from_pretrained(str(out), device="cpu").retrieve(["a red circle"], top_k=5)[0]
    explicit = DSIRetriever.from_pretrained(str(out), device="cpu", rerank_with=str(out / "dual_encoder"))
    assert default == explicit.retrieve(["a red circle"], top_k=5)[0]
    assert {key for key, _ in reranked} == {key for key, _ in plain}  # the same candidates, re-ordered
    scores = [score for _, score in reranked]
    assert scores == sorted(scores, reverse=True)
    with pytest.raises(ValueError, match="re-orders a generative model's top-k"):
        DSIRetriever.from_pretrained(str(out / "dual_encoder"), device="cpu", rerank_with=str(out / "dual_encoder"))


def test_a_finished_dense_stage_is_reused_when_resuming(recipe_run, tmp_path, caplog):
    source, _ = recipe_run
    shutil.copytree(source / "out", tmp_path / "out")
    checkpoint = max((tmp_path / "out").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    before = (tmp_path / "out" / "dual_encoder" / "model.safetensors").read_bytes()
    with caplog.at_level("INFO"):
        run_dsi_image.main(tiny_args(tmp_path, *RECIPE, "--dense_first_epochs", "2", "--save_strategy", "steps",
                                     "--save_steps", "3", "--resume_from_checkpoint", str(checkpoint)))
    assert "reusing the dual encoder already trained" in caplog.text
    assert (tmp_path / "out" / "dual_encoder" / "model.safetensors").read_bytes() == before


def test_an_interrupted_dense_stage_resumes_from_its_checkpoint(tmp_path, caplog):
    # the dense stage is a dual-encoder run with the same flags: one killed after its first checkpoint leaves this
    killed = tmp_path / "killed"
    run_dsi_image.main(tiny_args(killed, "--variant", "dual_encoder", "--num_train_epochs", "2",
                                 "--save_strategy", "steps", "--save_steps", "3"))
    first = min((killed / "out").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert json.loads((first / "trainer_state.json").read_text())["epoch"] < 2
    dense = tmp_path / "out" / "dual_encoder"
    dense.mkdir(parents=True)
    shutil.copytree(first, dense / first.name)
    with caplog.at_level("INFO"):  # the same command again: the non-empty output_dir holds only the dense stage
        run_dsi_image.main(tiny_args(tmp_path, *RECIPE, "--dense_first_epochs", "2"))
    assert f"resuming from {dense / first.name}" in caplog.text
    assert json.loads((dense / "trainer_state.json").read_text())["epoch"] == pytest.approx(2.0)
    assert not list(dense.glob("checkpoint-*"))  # finished: its resume state is gone


def test_overwrite_replaces_the_dense_stage_too(recipe_run, tmp_path, caplog):
    source, _ = recipe_run
    shutil.copytree(source / "out", tmp_path / "out")
    with caplog.at_level("INFO"):
        run_dsi_image.main(tiny_args(tmp_path, *RECIPE, "--dense_first_epochs", "1", "--overwrite_output_dir",
                                     "True"))
    assert "reusing the dual encoder" not in caplog.text
    assert json.loads((tmp_path / "out" / "dual_encoder" / "trainer_state.json").read_text())["epoch"] == \
        pytest.approx(1.0)


@pytest.mark.parametrize("extra, message", [
    (["--dense_first", "--docid_scheme", "naive"], "--docid_scheme naive does not use embeddings"),
    (["--dense_first", "--variant", "dual_encoder"], "pass a generative --variant"),
    (["--dense_first", "--semantic_embeddings", "x.npy"], "excludes --semantic_embeddings"),
    (["--dense_first", "False", "--rerank_with", "dense_first"], "needs --dense_first"),
    (["--rerank_with", "somewhere", "--variant", "dual_encoder"], "the dual encoder ranks by itself"),
    (["--rerank_weight", "1.5"], r"--rerank_weight must be in \[0, 1\]"),
    (["--dense_first", "False", "--dense_first_epochs", "3"], "--dense_first_epochs needs --dense_first"),
    (["--dense_first", "False", "--pseudo_query_filter_top_k", "3"], "needs a dual encoder to filter with"),
    (["--pseudo_query_at", "1.5"], r"--pseudo_query_at must hold fractions in \(0, 1\)"),
    (["--docid_scheme", "rq", "--rq_codes_per_level", "1"], "--rq_codes_per_level must be >= 2"),
    (["--docid_scheme", "rq", "--rq_num_levels", "0"], "--rq_num_levels must be >= 1"),
])
def test_recipe_flags_that_cannot_go_together_fail_before_training(tmp_path, extra, message):
    with pytest.raises(run_dsi_image.UsageError, match=message):
        run_dsi_image.main(tiny_args(tmp_path, *extra))
    assert not (tmp_path / "out").exists()


def test_rerank_with_a_generative_checkpoint_is_refused(recipe_run, tmp_path):
    source, _ = recipe_run
    with pytest.raises(run_dsi_image.UsageError, match="--rerank_with .*dual_encoder checkpoint"):
        run_dsi_image.main(tiny_args(tmp_path, "--max_steps", "1", "--rerank_with", str(source / "out")))


def test_rerank_with_a_dual_encoder_of_another_collection_is_refused(recipe_run, tmp_path):
    source, _ = recipe_run
    with pytest.raises(run_dsi_image.UsageError, match="no embedding for .* it was trained on another collection"):
        run_dsi_image.main(tiny_args(tmp_path, "--max_steps", "1", "--demo_num_images", "45", "--rerank_with",
                                     str(source / "out" / "dual_encoder")))


def test_rq_ids_from_a_npy_file(tmp_path):
    import numpy as np

    np.save(tmp_path / "emb.npy", np.random.default_rng(0).normal(size=(40, 8)))
    run_dsi_image.main(tiny_args(tmp_path, "--max_steps", "2", "--docid_scheme", "rq", "--semantic_embeddings",
                                 str(tmp_path / "emb.npy")))
    protocol = json.loads((tmp_path / "out" / "protocol.json").read_text())
    assert protocol["docid_scheme"] == "rq" and protocol["id_embeddings"].endswith("emb.npy")
    np.save(tmp_path / "bad.npy", np.zeros((39, 8)))
    with pytest.raises(run_dsi_image.UsageError, match=r"shape \(39, 8\) for 40 indexed images"):
        run_dsi_image.main(tiny_args(tmp_path, "--max_steps", "2", "--docid_scheme", "rq", "--semantic_embeddings",
                                     str(tmp_path / "bad.npy"), "--overwrite_output_dir", "True"))


@pytest.mark.parametrize("data", [{}, {"karpathy_json": "data.json", "image_dir": "."}])
def test_every_collection_gets_the_recipe_unless_a_flag_turns_a_part_off(data):
    from vit_t5_dsi.training.arguments import DataArguments, ModelArguments
    from vit_t5_dsi.training.recipe import RECIPE_IDS, RECIPE_PSEUDO_QUERIES, resolve_recipe

    model_args, data_args = ModelArguments(), DataArguments(**data)  # the demo, or a user's own collection
    line = resolve_recipe(model_args, data_args)
    assert {name: getattr(model_args, name) for name in RECIPE_IDS} == RECIPE_IDS
    assert {name: getattr(data_args, name) for name in RECIPE_PSEUDO_QUERIES} == RECIPE_PSEUDO_QUERIES
    assert line.startswith("Recipe: rq ids from a dual encoder trained first") and "re-ranked" in line

    off = ModelArguments(dense_first=False)
    resolve_recipe(off, DataArguments(**data))
    assert off.rerank_with is None and not off.start_from_dense and off.docid_scheme == "rq"
    semantic = ModelArguments(docid_scheme="semantic")  # semantic ids are still cut from the dual encoder
    resolve_recipe(semantic, DataArguments(**data))
    assert semantic.dense_first and semantic.rerank_with == "dense_first"
    for chosen in (ModelArguments(docid_scheme="atomic"), ModelArguments(semantic_embeddings="e.npy")):
        resolve_recipe(chosen, DataArguments(**data))
        assert not chosen.dense_first and chosen.rerank_with is None
    no_rerank = ModelArguments(rerank_with="none")
    resolve_recipe(no_rerank, DataArguments(**data))
    assert no_rerank.dense_first and no_rerank.rerank_with is None
    continued = ModelArguments(model_name_or_path="ckpt")
    continued_data = DataArguments(**data)
    resolve_recipe(continued, continued_data)
    assert not continued.dense_first and continued_data.captioning_ratio == 0.0
    dense = ModelArguments(variant="dual_encoder")
    assert resolve_recipe(dense, DataArguments(**data)) == "Recipe: the dual encoder alone (dense baseline)."
    assert not dense.dense_first and dense.rerank_with is None
    tuned = ModelArguments(dense_first_epochs=20)
    resolve_recipe(tuned, DataArguments(**data))
    assert tuned.dense_first and tuned.docid_scheme == "rq" and tuned.dense_first_epochs == 20


def test_the_dense_stage_budget_follows_the_generative_one():
    from vit_t5_dsi.training.arguments import DataArguments, ModelArguments, parse_args
    from vit_t5_dsi.training.recipe import resolve_recipe
    from vit_t5_dsi.training.dense_stage import dense_stage_arguments

    for flags, epochs, max_steps in ((["--num_train_epochs", "150"], 100, -1),
                                     (["--max_steps", "300"], 200.0, 200),
                                     (["--num_train_epochs", "30", "--dense_first_epochs", "7"], 7, -1)):
        model_args, data_args, training_args = parse_args(["--output_dir", "unused", *flags])
        resolve_recipe(model_args, data_args, training_args)
        training = dense_stage_arguments(model_args, data_args, training_args)[2]
        assert training.max_steps == max_steps
        if max_steps < 0:
            assert training.num_train_epochs == pytest.approx(epochs)


def test_epochs_default_to_the_demo_schedule_only_on_the_demo():
    from vit_t5_dsi.training.arguments import DataArguments, ModelArguments, parse_args
    from vit_t5_dsi.training.recipe import DEMO_TRAIN_EPOCHS, TRAIN_EPOCHS, resolve_recipe

    for flags, data_args, expected in (([], DataArguments(), DEMO_TRAIN_EPOCHS),
                                       ([], DataArguments(karpathy_json="d.json", image_dir="."), TRAIN_EPOCHS),
                                       (["--num_train_epochs", "300"], DataArguments(), 300)):
        training_args = parse_args(["--output_dir", "unused", *flags])[2]
        resolve_recipe(ModelArguments(), data_args, training_args)
        assert training_args.num_train_epochs == expected


@pytest.mark.slow
def test_recipe_under_two_processes_matches_one_process(recipe_run, tmp_path):
    """The whole recipe trains under DDP; evaluating its checkpoint with re-ranking on two processes (padded last
    batches, query texts travelling with the batches) gives exactly the one-process figures."""


    launcher = accelerate_launcher()
    trained = run_script(tiny_args(tmp_path / "train", *RECIPE, "--use_cpu", "True", "--max_steps", "3"),
                         launcher=launcher, env={"MASTER_PORT": "29547"})
    assert trained.returncode == 0, trained.stderr[-4000:]
    results = json.loads((tmp_path / "train" / "out" / "all_results.json").read_text())
    assert results["world_size"] == 2 and "eval_rerank_hits@1" in results and "dense_eval_hits@1" in results

    source, _ = recipe_run
    checkpoint = str(source / "out")
    evaluate = ["--model_name_or_path", checkpoint, "--do_train", "False", "--demo_dir", str(source / "data"),
                "--demo_num_images", "40", "--per_device_eval_batch_size", "5", "--disable_tqdm", "True",
                "--rerank_with", str(source / "out" / "dual_encoder"), "--use_cpu", "True"]
    single = run_script(evaluate + ["--output_dir", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr[-4000:]
    double = run_script(evaluate + ["--output_dir", str(tmp_path / "two")], launcher=launcher,
                        env={"MASTER_PORT": "29548"})
    assert double.returncode == 0, double.stderr[-4000:]
    one = json.loads((tmp_path / "one" / "all_results.json").read_text())
    two = json.loads((tmp_path / "two" / "all_results.json").read_text())
    assert two["world_size"] == 2 and one["eval_num_queries"] == two["eval_num_queries"] == 24
    for key in ("eval_hits@1", "eval_rerank_hits@1", "eval_rerank_mrr@10", "seen_rerank_hits@5"):
        assert two[key] == pytest.approx(one[key], abs=1e-9), key


def test_retrieve_images_cli_reranks(recipe_run, capsys):
    import retrieve_images

    source, _ = recipe_run
    out = source / "out"
    assert retrieve_images.main(["--model", str(out), "--top_k", "3", "--device", "cpu", "--json", "--rerank_with",
                                 str(out / "dual_encoder"), "a red circle"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    keys = set(json.loads((out / "image_index.json").read_text())["keys"])
    assert result["query"] == "a red circle" and 1 <= len(result["results"]) <= 3
    assert {hit["image_key"] for hit in result["results"]} <= keys
    with pytest.raises(SystemExit):  # a generative checkpoint cannot re-rank
        retrieve_images.main(["--model", str(out), "--device", "cpu", "--rerank_with", str(out), "a red circle"])
