import pytest

from clip_backdoor.config import TrainConfig, apply_overrides, dump_yaml, from_dict, load_config, to_dict
from clip_backdoor.errors import UserError


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = TrainConfig()
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(TrainConfig, path) == cfg


def test_overrides_parse_like_yaml_and_reach_nested_sections():
    cfg = load_config(TrainConfig, None, ["optim.lr=1e-4", "epochs=3", "data.kind=csv", "eval.target=null",
                                          "objective.ssl_weight=2", "resume=false"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.epochs == 3 and cfg.data.kind == "csv" and cfg.eval.target is None
    assert cfg.objective.ssl_weight == 2.0 and cfg.resume is False


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\noptim:\n  lr: 0.01\n")
    cfg = load_config(TrainConfig, path, ["optim.lr=0.5"])
    assert cfg.epochs == 7 and cfg.optim.lr == 0.5 and cfg.optim.warmup_steps == 50


def test_unknown_key_names_its_path_and_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(UserError, match=r"c\.yaml\.optim\.learning_rate: unknown key"):
        load_config(TrainConfig, path)


@pytest.mark.parametrize("override, where", [("epochs=three", "epochs"), ("optim.lr=true", "optim.lr"),
                                             ("resume=3", "resume"), ("data=5", "data")])
def test_wrong_types_are_rejected_with_the_key(override, where):
    with pytest.raises(UserError, match=where):
        load_config(TrainConfig, None, [override])


def test_override_without_equals_sign():
    with pytest.raises(UserError, match="KEY=VALUE"):
        apply_overrides({}, ["optim.lr"])


def test_int_is_accepted_where_float_is_expected():
    cfg = from_dict(TrainConfig, {"optim": {"lr": 1}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert to_dict(cfg)["optim"]["lr"] == 1.0
