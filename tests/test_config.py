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


# --------------------------------------------------------------------------------------------
# Numeric bounds
# --------------------------------------------------------------------------------------------
def _config_classes():
    """Every section of the run config and of the study spec."""
    import dataclasses
    import typing

    from clip_backdoor.study.spec import StudySpec

    todo, seen = [TrainConfig, StudySpec], []
    while todo:
        cls = todo.pop()
        seen.append(cls)
        hints = typing.get_type_hints(cls)
        todo += [hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])]
    return seen


def test_every_numeric_field_of_every_config_has_a_bound():
    import dataclasses
    import typing

    missing = []
    assert len(_config_classes()) >= 12  # the walk reaches every section
    for cls in _config_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            scalar = set(typing.get_args(hints[f.name])) - {type(None)} or {hints[f.name]}  # int | None
            if scalar <= {int, float} and f.name not in getattr(cls, "BOUNDS", {}):
                missing.append(f"{cls.__name__}.{f.name}")
    assert missing == [], "declare these in the class's BOUNDS"


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1e-3", "optim.lr: -0.001 must be > 0"),
    ("optim.lr=0", "optim.lr: 0.0 must be > 0"),
    ("optim.lr=.inf", "optim.lr: inf is not a finite number"),
    ("optim.lr=.nan", "optim.lr: nan is not a finite number"),
    ("optim.beta1=1", "optim.beta1: 1.0 must lie in [0, 1)"),
    ("optim.beta2=-0.1", "optim.beta2: -0.1 must lie in [0, 1)"),
    ("optim.eps=0", "optim.eps: 0.0 must be > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay: -0.1 must be >= 0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps: -1 must be >= 0"),
    ("optim.grad_clip=0", "optim.grad_clip: 0.0 must be > 0"),
    ("epochs=0", "epochs: 0 must be >= 1"),
    ("batch_size=0", "batch_size: 0 must be >= 1"),
    ("threads=0", "threads: 0 must be >= 1"),
    ("save_every=-1", "save_every: -1 must be >= 0"),
    ("seed=-1", "seed: -1 must be >= 0"),
    ("data.workers=-1", "data.workers: -1 must be >= 0"),
    ("data.num_samples=0", "data.num_samples: 0 must be >= 1"),
    ("eval.n=0", "eval.n: 0 must be >= 1"),
    ("eval.every=-1", "eval.every: -1 must be >= 0"),
    ("eval.batch_size=0", "eval.batch_size: 0 must be >= 1"),
    ("objective.eda_alpha=1", "objective.eda_alpha: 1.0 must lie in (0, 1)"),
    ("objective.eda_alpha=0", "objective.eda_alpha: 0.0 must lie in (0, 1)"),
    ("objective.ssl_weight=-1", "objective.ssl_weight: -1.0 must be >= 0"),
])
def test_out_of_bounds_numbers_are_one_line_naming_the_key(override, message):
    with pytest.raises(UserError) as info:
        load_config(TrainConfig, None, [override])
    assert str(info.value) == f"config.{message}"


@pytest.mark.parametrize("override", ["optim.beta1=0", "optim.beta2=0.999", "optim.grad_clip=null",
                                      "threads=null", "optim.warmup_steps=0", "eval.every=0", "save_every=0",
                                      "data.workers=0",
                                      "objective.eda_alpha=0.5", "objective.mmcl_weight=0"])
def test_values_on_the_edge_of_their_bound_are_accepted(override):
    load_config(TrainConfig, None, [override])


def test_a_yaml_file_error_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: -1.0e-3\n")
    with pytest.raises(UserError, match=r"c\.yaml\.optim\.lr: -0\.001 must be > 0"):
        load_config(TrainConfig, path)


def test_configs_built_in_code_are_checked_by_the_loop(tmp_path):
    from clip_backdoor.config import OptimConfig
    from clip_backdoor.train.loop import train

    with pytest.raises(UserError, match="config.optim.lr: -1.0 must be > 0"):
        train(TrainConfig(run_dir=str(tmp_path / "r"), optim=OptimConfig(lr=-1.0)))


def test_the_study_spec_states_the_training_bounds_once():
    from clip_backdoor.config import OptimConfig
    from clip_backdoor.study.spec import CleaningSpec, PretrainSpec

    assert PretrainSpec.BOUNDS["lr"] is OptimConfig.BOUNDS["lr"]
    assert PretrainSpec.BOUNDS["weight_decay"] == CleaningSpec.BOUNDS["weight_decay"] == ">= 0"
    assert PretrainSpec.BOUNDS["epochs"] == TrainConfig.BOUNDS["epochs"]
