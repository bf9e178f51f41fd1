import os

import pytest
import yaml

from engine.config import ConfigError, ExperimentConfig, load_config


def write(tmp_path, data) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_defaults_and_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, {"run": {"name": "x", "seed": 3}, "dataset": {"source": "builtin"}}))
    assert cfg.run.name == "x" and cfg.run.seed == 3 and cfg.run.uri == os.path.join(os.getcwd(), "runs", "x")
    again = load_config(write(tmp_path, yaml.safe_load(cfg.to_yaml())))
    assert again == cfg
    assert again.hash() == cfg.hash()


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, {}), ["run.seed=7", "dataset.subset.kind=few_shot", "dataset.subset.shots=5",
                                            "storage.storage_options={endpoint_url: http://x}", "dataset.skip_bad_images=true"])
    assert cfg.run.seed == 7 and cfg.dataset.subset.shots == 5 and cfg.dataset.skip_bad_images is True
    assert cfg.storage.storage_options == {"endpoint_url": "http://x"}
    assert cfg.hash() != load_config(None).hash()


def test_no_path_gives_defaults():
    assert load_config(None) == ExperimentConfig()


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["run.nmae=x"], "run.nmae: unknown key"),
        (["nosuchsection.a=1"], "nosuchsection: unknown key"),
        (["run.seed=abc"], "run.seed"),
        (["run.seed=-1"], "run.seed: Input should be greater than or equal to 0"),
        (["dataset.source=zip"], "dataset.source: Input should be 'builtin', 'imagefolder' or 'parquet'"),
        (["dataset.test_fraction=1.5"], "dataset.test_fraction"),
        (["dataset.class_names=[]"], "class list is empty"),
        (["dataset.source=imagefolder"], "dataset.uri is required"),
        (["dataset.subset.kind=few_shot"], "dataset.subset.shots is required"),
        (["dataset.subset.kind=long_tail", "dataset.subset.imbalance_factor=0.5"], "dataset.subset.imbalance_factor"),
        (["model.resolution=4"], "model.resolution"),
        (["run.name=a/b"], "run.name"),
        (["classify.worker_resources={CPU: 2}"], "classify.worker_resources: 'CPU' is not a custom "
                                                 "resource: use cpus_per_worker / use_gpu"),
        (["finetune.worker_resources={gpu_slot: 0}"], "finetune.worker_resources: resource 'gpu_slot' "
                                                      "must be > 0"),
        (["synthesis.actor_resources={GPU: 1}"], "use cpus_per_actor / num_gpus_per_actor"),
    ],
)
def test_bad_values_name_the_key(overrides, named):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert named in str(err.value)


def test_bad_override_syntax_and_files(tmp_path):
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["run.seed"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="run.name"):
        load_config(None, ["run.name.seed=1"])


def test_preset_sits_between_the_yaml_and_the_overrides(tmp_path):
    from engine.config import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text("preset: real-guidance\nsynthesis:\n  strategy: diff-mix\n  multiplier: 3\n")
    config = load_config(path)
    assert config.preset == "real-guidance" and config.synthesis.strategy == "real-aug"  # the preset wins over YAML
    assert config.synthesis.strengths == [0.1] and config.synthesis.multiplier == 3       # the rest is the YAML's
    over = load_config(path, ["synthesis.strengths=[0.2]", "preset=cutmix"])
    assert over.preset == "cutmix" and over.classify.cutmix_prob == 0.1 and over.synthesis.strengths == [0.2]
    assert over.synthesis.strategy == "diff-mix"                                         # cutmix sets no strategy
    assert load_config(None).preset is None
    # the preset's values leave the output hashes as if written out by hand
    by_hand = load_config(None, ["synthesis.strategy=real-aug", "synthesis.strengths=[0.1]", "classify.filtered=false"])
    assert load_config(None, ["preset=real-guidance"]).hash("synthesis", "classify") == by_hand.hash("synthesis", "classify")
    with pytest.raises(ConfigError, match="unknown preset 'diffmix'; known: .*cmo"):
        load_config(None, ["preset=diffmix"])
    with pytest.raises(ConfigError, match="preset must be a name"):
        load_config(None, ["preset=[cutmix]"])


def test_relative_paths_are_made_absolute_where_the_config_is_loaded(tmp_path, monkeypatch):
    """Every path key (defaults included) is resolved once, against the loading process's working directory;
    URIs, model names and hub ids are left alone; `~` is expanded. A process that validates the dumped config
    again elsewhere (a Tune trial, a Train worker) gets the same absolute paths, whatever its own directory."""
    from engine.config import shared_local_paths, validate

    (tmp_path / "models" / "sd").mkdir(parents=True)
    (tmp_path / "mymodel").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["dataset.source=imagefolder", "dataset.uri=file://data/birds", "model.base=mymodel",
                             "model.clip=openai/clip-vit-base-patch32", "classify.synthetic=s3://b/set",
                             "classify.pretrained=./weights.pt", "evaluate.classifier=../other/classify",
                             "metrics.sets=[sets/a, gs://b/c]", "tracking.mlflow_uri=mlruns", "model.cache_dir=~/c"])
    at = lambda *p: os.path.join(str(tmp_path), *p)  # noqa: E731
    assert (cfg.run.output, cfg.dataset.uri, cfg.model.base, cfg.model.clip, cfg.classify.synthetic) == (
        at("runs"), at("data", "birds"), at("mymodel"), "openai/clip-vit-base-patch32", "s3://b/set")
    assert (cfg.classify.pretrained, cfg.evaluate.classifier, cfg.metrics.sets, cfg.tracking.mlflow_uri) == (
        at("weights.pt"), os.path.join(os.path.dirname(str(tmp_path)), "other", "classify"), [at("sets", "a"),
                                                                                              "gs://b/c"], at("mlruns"))
    assert cfg.model.cache_dir == os.path.expanduser("~/c") and cfg.cost.cluster_yaml == at("cluster.yaml")
    assert load_config(None, ["model.base=tiny"]).model.base == "tiny"
    assert load_config(None, ["model.base=org/name", "tracking.mlflow_uri=databricks"]).model.base == "org/name"
    cfg.run.output = "elsewhere"  # an assignment is validated too
    assert cfg.run.output == at("elsewhere")
    monkeypatch.chdir(tmp_path / "models")
    again = validate(cfg.model_dump(mode="json"))
    assert again == cfg
    # what every node must reach: the local ones among them (not the per-node cache or the driver's files)
    assert sorted(k for k, _ in shared_local_paths(cfg)) == ["classify.pretrained", "dataset.uri",
                                                           "evaluate.classifier", "metrics.sets", "model.base",
                                                           "run.output", "tracking.mlflow_uri"]


def test_a_relative_output_in_a_submitted_jobs_working_dir_is_warned_about(tmp_path, monkeypatch, caplog):
    """Under `ray job submit --working-dir`, the driver runs in the job's unpacked copy of that folder (Ray puts
    the job's runtime_env in its environment): a relative input there is a file shipped with the job, fine; a
    relative output would be written into the copy, which Ray deletes later: a warning names it."""
    import json
    import logging

    monkeypatch.chdir(tmp_path)
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    with caplog.at_level(logging.WARNING, logger="engine.locations"):
        cfg = load_config(None, ["dataset.source=imagefolder", "dataset.uri=data/birds", "run.output=/abs/runs",
                                 "classify.output=out/classify"])
    assert cfg.dataset.uri == str(tmp_path / "data" / "birds")
    assert cfg.classify.output == str(tmp_path / "out" / "classify")
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "'out/classify' is relative" in warned[0] and str(tmp_path) in warned[0], warned
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    caplog.clear()
    load_config(None, ["run.output=runs"])
    assert not caplog.records
