"""Typed config: defaults <- YAML <- overrides; errors name the dotted key."""
import pytest

from rafmedia.core.errors import UserError
from rafmedia.launch.config import load_config, packaged_configs


def test_packaged_defaults_and_overrides_merge_in_order(tmp_path):
    config = load_config()
    assert config.cohort.sites[2].noise_std == pytest.approx(3 * config.cohort.sites[0].noise_std)  # planted
    user = tmp_path / "mine.yaml"
    user.write_text("train:\n  steps: 50\ncohort:\n  num_subjects: 40\n")
    config = load_config(str(user), ["train.steps=70", "train.lr=1e-3", "cohort.sites.2.noise_std=0.2",
                                     "encoder.options.width=24", "evaluate.seeds=[4, 5]"])
    assert config.train.steps == 70 and config.cohort.num_subjects == 40
    assert config.train.lr == pytest.approx(1e-3) and isinstance(config.train.lr, float)
    assert config.cohort.sites[2].noise_std == 0.2 and config.cohort.sites[0].noise_std == 0.03
    assert config.encoder.options == {"width": 24} and config.evaluate.seeds == [4, 5]


def test_packaged_config_by_name():
    assert {"default", "tiny"} <= set(packaged_configs())
    assert load_config("tiny").cohort.num_subjects == 48


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key 'train.lrr'; did you mean 'train.lr'"),
    ("trian.lr=1", "unknown config key 'trian'; did you mean 'train'"),
    ("train.steps=abc", "config key 'train.steps' must be an integer, got 'abc'"),
    ("train.lr=fast", "config key 'train.lr' must be a number"),
    ("cohort.sites.7.noise_std=1", "config key 'cohort.sites.7': '7' is not an index"),
    ("cohort.sites.0.noise=1", "unknown config key 'cohort.sites.0.noise'; did you mean 'cohort.sites.0.noise_std'"),
    ("evaluate.seeds=3", "config key 'evaluate.seeds' must be a list"),
    ("train.steps", "override 'train.steps' is not of the form key=value (for example train.steps=100)"),
    ("train.steps.x=1", "'train.steps' is a value, not a section"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_missing_and_invalid_config_files(tmp_path):
    with pytest.raises(UserError, match="config file 'tinny' not found; did you mean 'tiny'"):
        load_config("tinny")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(bad))


def test_options_written_for_one_component_are_dropped_when_another_is_picked(tmp_path):
    default = load_config()
    assert default.task.options and default.encoder.options == {"width": 16}
    renamed = load_config(None, ["task.name=rotation", "task.options.crop_size=24", "encoder.name=vit_3d"])
    assert renamed.task.options == {"crop_size": 24} and renamed.encoder.options == {}
    same = load_config(None, ["task.name=contrastive_two_crop", "task.options.temperature=0.3"])
    assert same.task.options == {**default.task.options, "temperature": 0.3}  # same task: defaults kept
    user = tmp_path / "rotation.yaml"
    user.write_text("task:\n  name: rotation\n")
    assert load_config(str(user)).task.options == {}
