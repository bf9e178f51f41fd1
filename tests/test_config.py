import pytest
import yaml

from engine.config import ConfigError, ExperimentConfig, load_config


def write(tmp_path, data) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_defaults_and_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, {"run": {"name": "x", "seed": 3}, "dataset": {"source": "builtin"}}))
    assert cfg.run.name == "x" and cfg.run.seed == 3 and cfg.run.uri == "runs/x"
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
