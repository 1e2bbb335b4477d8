import pytest
import yaml

from hpc_mto import config
from hpc_mto.errors import ConfigError

ROOT = __import__("pathlib").Path(__file__).parent.parent


def test_default_yaml_equals_built_in_defaults():
    built_in = config.Config().to_dict()
    from_file = config.load(ROOT / "configs" / "default.yaml").to_dict()
    assert from_file == built_in


def test_every_shipped_config_is_valid():
    for path in (ROOT / "configs").glob("*.yaml"):
        config.load(path)


def test_overrides_parse_yaml_values_and_scientific_notation():
    cfg = config.load(None, ["train.lr=1e-2", "transfer.blocks=[a.*, b]", "model.shared_init=true",
                             "splits=3"])
    assert cfg.train.lr == 0.01 and cfg.transfer.blocks == ["a.*", "b"]
    assert cfg.model.shared_init is True and cfg.splits == 3


def test_unknown_key_lists_valid_keys_and_suggests_the_close_one():
    with pytest.raises(ConfigError) as e:
        config.load(None, ["transfer.polcy=best"])
    msg = str(e.value)
    assert "transfer.polcy" in msg and "did you mean transfer.policy" in msg
    assert "transfer.min_gain" in msg  # the valid keys are listed


@pytest.mark.parametrize("override, rule", [
    ("splits=0", "splits must be >= 1"),
    ("data.val_fraction=1.5", "val_fraction must be in [0, 1)"),
    ("data.val_fraction=0", "no validation set for the CV matrix: set selection.rule=holdout"),
    ("data.val_fraction=0 selection.rule=holdout transfer.policy=best", "policy=best needs transfer.fitness=train"),
    ("selection.member=swa", "selection.member=swa needs train.swa_epochs >= 1"),
    ("selection.output=soup", "needs model.shared_init=true"),
    ("data.selection_holdout=0 selection.rule=holdout", "leaves nothing to choose on"),
    ("transfer.adopt_quantile=0", "adopt_quantile must be in (0, 1]"),
    ("transfer.interval=0", "interval must be >= 1"),
    ("train.lr=-0.1", "lr must be > 0"),
    ("transfer.policy=greedy", "valid: none, best, interpolate, average, distill"),
    ("train.epochs=ten", "train.epochs must be int"),
    ("checkpoint.signals=[USR9]", "unknown signal"),
])
def test_invalid_values_state_the_rule(override, rule):
    with pytest.raises(ConfigError) as e:
        config.load(None, override.split())
    assert rule in str(e.value)


def test_yaml_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("splits: 2\ntrain:\n  epochs: [1,\n  lr: 3\n")
    with pytest.raises(ConfigError) as e:
        config.load(bad)
    assert "line" in str(e.value) and str(bad) in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.yaml")


def test_resume_diff_allows_safe_keys_only():
    old = config.Config()
    new = config.load(None, ["train.epochs=50", "checkpoint.keep=5"])
    assert config.resume_diff(old, new) == []
    changed = config.load(None, ["train.lr=0.5"])
    assert config.resume_diff(old, changed) == ["train.lr: 0.001 -> 0.5"]


def test_dump_round_trips():
    cfg = config.load(None, ["transfer.policy=average", "train.epochs=7"])
    assert config.from_dict(yaml.safe_load(config.dump(cfg))) == cfg


def test_readme_config_table_matches_the_defaults_and_their_docs():
    readme = (ROOT / "README.md").read_text()
    rows = [f"| `{key}` | `{default}` | {text} |" for key, default, text in config.help_table()]
    stale = [row for row in rows if row not in readme]
    assert len(rows) == len(config.valid_keys()) and not stale, stale
