"""The config tree: presets, one override path, unknown keys and bad values named."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from mirage.cli import main
from mirage.config import Config, ConfigError, load_config, resolve_paths
from mirage.errors import MirageError


@pytest.mark.parametrize("preset", ["demo", "paper"])
def test_presets_load(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    assert cfg.data.subjects == ["sub-01", "sub-02", "sub-03", "sub-05"]


def test_paper_preset_is_the_published_setup():
    cfg = load_config("paper")
    d = cfg.data
    assert (d.tr, d.window_trs, d.stride_trs, d.hrf_delay_trs, d.n_parcels, d.zscore) == (1.49, 100, 100, 3, 1000, True)
    assert d.train[-1] == "movie10:*" and d.val == ["friends:s6"] and d.test == ["friends:s7", "ood:*"]
    # field defaults are the published setup too
    assert Config().data.model_dump() == {**d.model_dump(), "synth": Config().data.synth.model_dump()}


def test_every_field_is_documented():
    def walk(model: type[BaseModel], where: str):
        for name, field in model.model_fields.items():
            assert field.description or (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)), \
                f"{where}{name} has no description"
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, f"{where}{name}.")

    walk(Config, "")


def test_override_path():
    cfg = load_config("demo", ["data.window_trs=12", "data.synth.seasons=[1, 2]", "data.train=['friends:s1']"])
    assert cfg.data.window_trs == 12 and cfg.data.synth.seasons == [1, 2] and cfg.data.train == ["friends:s1"]
    again = cfg.with_overrides({"data.synth.snr": 2.5})
    assert again.data.synth.snr == 2.5 and cfg.data.synth.snr != 2.5  # a copy
    assert again.with_overrides(["data.tr=2"]).data.tr == 2.0


@pytest.mark.parametrize(
    "override,named",
    [
        ("data.windw_trs=3", "'data.windw_trs'"),
        ("dta.root=/x", "'dta'"),
        ("data.synth.colour=red", "'data.synth.colour'"),
    ],
)
def test_unknown_key_is_named(override, named):
    with pytest.raises(ConfigError, match=f"unknown config key {named}"):
        load_config("demo", [override])


@pytest.mark.parametrize(
    "override,field",
    [
        ("data.window_trs=abc", "data.window_trs"),
        ("data.tr=-1", "data.tr"),
        ("data.synth.channels=3", "data.synth.channels"),
        ("data.subjects=5", "data.subjects"),
        ("data.zscore=maybe", "data.zscore"),
    ],
)
def test_bad_value_is_named(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config("demo", [override])


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  window_trs: 4\n  strde_trs: 2\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'data.strde_trs'"):
        load_config(str(p))
    p.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")
    assert issubclass(ConfigError, MirageError)


def test_resolve_paths_absolute(tmp_path):
    cfg = resolve_paths(load_config("demo", ["data.root=rel/data"]), base=tmp_path)
    assert cfg.data.root == str(tmp_path / "rel" / "data")
    assert cfg.features.store.startswith(str(tmp_path)) and cfg.tracking.uri.startswith("sqlite:////")


def test_cli_config_error_is_one_line(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path), "--set", "data.n_parcel=3"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown config key 'data.n_parcel'" in err and "Traceback" not in err
    assert main(["data", "synth", str(tmp_path / "x"), "--set", "data.synth.fps=zero"]) == 1
    assert "data.synth.fps" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------ --set by field type


def test_set_keeps_a_string_field_a_string():
    cfg = load_config("demo", ["features.revision=20240101", "sweep.name=007", "tracking.experiment=true"])
    assert cfg.features.revision == "20240101" and cfg.sweep.name == "007" and cfg.tracking.experiment == "true"


def test_set_converts_numbers_booleans_and_optionals_by_field_type():
    cfg = load_config("demo", [
        "data.tr=2", "train.lr=1e-4", "data.zscore=no", "train.use_gpu=True",
        "features.video_min_pixels=4096", "features.video_max_pixels=null",
    ])
    assert cfg.data.tr == 2.0 and isinstance(cfg.data.tr, float) and cfg.train.lr == 1e-4
    assert cfg.data.zscore is False and cfg.train.use_gpu is True
    assert cfg.features.video_min_pixels == 4096 and cfg.features.video_max_pixels is None


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.epochs=3.5", "invalid value '3.5', in override train.epochs; expected an integer"),
        ("data.tr=fast", "invalid value 'fast', in override data.tr; expected a number"),
        ("data.zscore=maybe", "invalid value 'maybe', in override data.zscore; expected a boolean"),
        ("features.dtype=bfloat", "expected one of ['bfloat16', 'float16', 'float32']; did you mean 'bfloat16'?"),
    ],
)
def test_set_rejects_a_value_naming_key_value_and_type(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    assert message in str(e.value)


# ----------------------------------------------------------------- did you mean


@pytest.mark.parametrize(
    "override,suggested",
    [("train.epoch=3", "train.epochs"), ("trian.epochs=3", "train.epochs"), ("data.synth.sed=1", "data.synth.seed")],
)
def test_unknown_key_suggests_the_nearest_key(override, suggested):
    with pytest.raises(ConfigError, match=rf"did you mean '{suggested}'\?"):
        load_config("demo", [override])


def test_unknown_key_in_a_file_names_the_file_and_the_nearest_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  strde_trs: 2\n")
    with pytest.raises(ConfigError, match=rf"'data.strde_trs', in config file {p}; did you mean 'data.stride_trs'\?"):
        load_config(str(p))


def test_unknown_preset_suggests_the_nearest_preset():
    with pytest.raises(ConfigError, match=r"unknown preset 'dmeo'.*did you mean 'demo'\?"):
        load_config("dmeo")


# ------------------------------------------------------------------ presets


def test_presets_are_package_data():
    from importlib.resources import files

    from mirage.config import preset_names, preset_path

    assert preset_names() == ["demo", "paper"]
    shipped = files("mirage").joinpath("presets")
    for name in preset_names():
        assert preset_path(name).read_text() == shipped.joinpath(f"{name}.yaml").read_text()
    root = Path(__file__).resolve().parents[1]
    assert not list(root.glob("configs/*.yaml")), "presets live in platform/mirage/presets only"
