"""Unit tests of the profile library: loading, extends, --set, variants, dumping, env overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

import safe_cli
from safe_cli.config import (
    BUILTIN_VARIANTS,
    Profile,
    ProfileError,
    RetentionVariant,
    dump_profile,
    load_profile,
    resolve_variants,
)
from safe_cli.config.loader import apply_overrides
from safe_cli.config.variants import VariantError

PROFILES_DIR = Path(safe_cli.__file__).parent / "profiles"
BUILTIN_FILES = sorted(PROFILES_DIR.rglob("*.yaml"))
BUILTIN_NAMES = [p.stem for p in BUILTIN_FILES]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No SAFE_DATA_ROOT leaking in from the caller, and no stray files in the cwd."""
    monkeypatch.delenv("SAFE_DATA_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def issue_keys(exc: ProfileError) -> list[str]:
    return [issue.key for issue in exc.issues]


# --------------------------------------------------------------------------- built-in profiles


def test_expected_builtins_are_present():
    assert {"demo", "llava15-7b-whisper-small", "llava15-13b-clap", "blip2-opt27b-clap"} <= set(BUILTIN_NAMES)
    assert len(BUILTIN_NAMES) == len(set(BUILTIN_NAMES)), "two built-in profiles share a file stem"


@pytest.mark.parametrize("path", BUILTIN_FILES, ids=BUILTIN_NAMES)
def test_every_builtin_profile_loads(path):
    by_name = load_profile(path.stem)
    assert isinstance(by_name, Profile)
    assert by_name.name == path.stem
    # Loading by file path gives the same profile as loading by name.
    assert load_profile(str(path)) == by_name


@pytest.mark.parametrize(
    "name, kind, hub_id",
    [
        ("llava15-7b-whisper-small", "hf-llava", "llava-hf/llava-1.5-7b-hf"),
        ("llava15-13b-clap", "hf-llava", "llava-hf/llava-1.5-13b-hf"),
        ("blip2-opt27b-clap", "hf-blip2", "Salesforce/blip2-opt-2.7b"),
    ],
)
def test_real_profiles_wrap_the_real_models(name, kind, hub_id):
    profile = load_profile(name)
    assert profile.base.kind == kind
    assert profile.base.name_or_path == hub_id


def test_demo_is_tiny_and_offline():
    profile = load_profile("demo")
    assert profile.base.kind == "tiny-llava"
    assert profile.audio_encoder.kind == "tiny-whisper"
    assert profile.data.source == "synthetic"


# --------------------------------------------------------------------------- --set


def test_set_values_are_typed_by_the_schema():
    overrides = ["training.stage_a.steps=50", "fusion.layers=[0,2]", "base.dtype=bfloat16"]
    raw = apply_overrides({"name": "x"}, overrides)
    assert raw["training"]["stage_a"]["steps"] == 50 and type(raw["training"]["stage_a"]["steps"]) is int
    assert raw["fusion"]["layers"] == [0, 2]

    profile = load_profile("demo", overrides)
    assert profile.training.stage_a.steps == 50
    assert type(profile.training.stage_a.steps) is int
    assert profile.fusion.layers == [0, 2]
    assert profile.base.dtype == "bfloat16"
    # Untouched keys keep the profile's values.
    assert profile.training.device == "cpu"
    assert profile.training.stage_a.batch_size == load_profile("demo").training.stage_a.batch_size


def test_apply_overrides_does_not_mutate_its_input():
    data = {"training": {"stage_a": {"steps": 1}}}
    apply_overrides(data, ["training.stage_a.steps=9"])
    assert data == {"training": {"stage_a": {"steps": 1}}}


def test_bad_set_value_is_blamed_on_set():
    with pytest.raises(ProfileError) as info:
        load_profile("demo", ["training.stage_a.steps=lots"])
    (issue,) = info.value.issues
    assert issue.source.startswith("--set")
    assert issue.key == "training.stage_a.steps"
    assert "lots" in issue.message


def test_bad_file_value_is_blamed_on_the_file_even_with_other_sets(tmp_path):
    path = write(tmp_path / "p.yaml", "extends: demo\nname: p\ntraining:\n  stage_a:\n    steps: -1\n")
    with pytest.raises(ProfileError) as info:
        load_profile(str(path), ["fusion.lora_rank=4"])
    (issue,) = info.value.issues
    assert issue.source == str(path)
    assert issue.key == "training.stage_a.steps"


@pytest.mark.parametrize("item", ["training.stage_a.steps", "=5", "bad key=1"])
def test_malformed_set_is_an_error(item):
    with pytest.raises(ProfileError) as info:
        apply_overrides({}, [item])
    (issue,) = info.value.issues
    assert issue.source == "--set"
    assert "key.path=value" in issue.message


def test_set_into_a_non_section_is_an_error():
    with pytest.raises(ProfileError) as info:
        load_profile("demo", ["fusion.layers.first=1"])
    (issue,) = info.value.issues
    assert issue.source == "--set"
    assert "fusion.layers is not a section" in issue.message


# --------------------------------------------------------------------------- extends


def test_extends_merges_sections_and_replaces_lists(tmp_path):
    path = write(
        tmp_path / "mine.yaml",
        "extends: demo\n"
        "name: mine\n"
        "fusion:\n  lora_rank: 4\n"
        "policy:\n  token_budgets: [0, 6]\n"
        "projector:\n  num_tokens: 6\n"
        "training:\n  stage_a:\n    steps: 7\n",
    )
    demo = load_profile("demo")
    mine = load_profile(str(path))
    assert mine.name == "mine"
    assert mine.description == demo.description  # inherited
    # Nested sections merge: the overridden key changes, its siblings stay the parent's.
    assert mine.fusion.lora_rank == 4
    assert mine.fusion.layers == demo.fusion.layers == [1, 3]
    assert mine.training.stage_a.steps == 7
    assert mine.training.device == "cpu"
    # Lists replace, never concatenate or merge element-wise.
    assert mine.policy.token_budgets == [0, 6]
    assert mine.projector.num_tokens == 6


def test_extends_child_must_name_itself(tmp_path):
    path = write(tmp_path / "nameless.yaml", "extends: demo\nseed: 3\n")
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    assert "name" in issue_keys(info.value)


def test_extends_a_file_relative_to_the_child(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "parent.yaml", "extends: demo\nname: parent\nseed: 11\n")
    child = write(tmp_path / "sub" / "child.yaml", "extends: parent.yaml\nname: child\nfusion:\n  lora_rank: 2\n")
    profile = load_profile(str(child))
    assert (profile.name, profile.seed, profile.fusion.lora_rank) == ("child", 11, 2)
    assert profile.base.kind == "tiny-llava"


def test_extends_cycle_is_an_error(tmp_path):
    a = write(tmp_path / "a.yaml", "extends: b.yaml\nname: a\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\nname: b\n")
    with pytest.raises(ProfileError) as info:
        load_profile(str(a))
    (issue,) = info.value.issues
    assert issue.key == "extends"
    assert "cycle" in issue.message


def test_extends_unknown_profile_is_an_error(tmp_path):
    path = write(tmp_path / "p.yaml", "extends: no-such-profile\nname: p\n")
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    (issue,) = info.value.issues
    assert (issue.source, issue.key) == (str(path), "extends")


# --------------------------------------------------------------------------- retention variants


def test_builtin_variants_have_the_documented_weights():
    # The seed's five, with the KL weight raised from 0.2 to 3.0 (variants.py says why).
    v = resolve_variants({})
    assert list(v) == ["no_retention", "soft_retention", "fisher_retention", "nullspace_retention", "full_retention"]

    assert v["no_retention"].retention_loss_weight == 0.0
    assert v["no_retention"].distillation_weight == 0.0
    assert v["no_retention"].fisher_weight == 0.0
    assert v["no_retention"].enable_null_space is False

    assert v["soft_retention"].retention_loss_weight == 1.0
    assert v["soft_retention"].distillation_weight == 3.0
    assert v["soft_retention"].fisher_weight == 0.0
    assert v["soft_retention"].enable_null_space is False

    assert v["fisher_retention"].distillation_weight == 3.0
    assert v["fisher_retention"].fisher_weight == 0.1
    assert v["fisher_retention"].enable_null_space is False

    nullspace = v["nullspace_retention"]
    assert (nullspace.distillation_weight, nullspace.fisher_weight) == (3.0, 0.0)
    assert nullspace.enable_null_space is True
    assert (nullspace.null_space_rank, nullspace.null_space_min_samples, nullspace.null_space_refresh_interval) == (
        8,
        128,
        4000,
    )

    full = v["full_retention"]
    assert (full.retention_loss_weight, full.distillation_weight, full.fisher_weight) == (1.0, 3.0, 0.1)
    assert full.enable_null_space is True
    assert (full.null_space_rank, full.null_space_min_samples, full.null_space_refresh_interval) == (8, 128, 4000)


def test_variant_extends_inherits_unset_fields():
    v = resolve_variants({"mine": RetentionVariant(extends="soft_retention", fisher_weight=0.5)})
    assert v["mine"].distillation_weight == 3.0
    assert v["mine"].fisher_weight == 0.5
    assert v["mine"].retention_loss_weight == 1.0
    assert v["mine"].extends is None
    # The built-ins are still there and untouched.
    assert v["soft_retention"] == BUILTIN_VARIANTS["soft_retention"]
    assert v["soft_retention"].fisher_weight == 0.0


def test_variant_extends_through_a_profile_file(tmp_path):
    path = write(
        tmp_path / "p.yaml",
        "extends: demo\nname: p\nretention:\n  default_variant: mine\n  variants:\n"
        "    mine:\n      extends: soft_retention\n      fisher_weight: 0.5\n"
        "sweep:\n  variants: [mine, no_retention]\n",
    )
    profile = load_profile(str(path))
    mine = resolve_variants(profile.retention.variants)["mine"]
    assert (mine.distillation_weight, mine.fisher_weight) == (3.0, 0.5)


def test_variant_chain_of_custom_variants():
    v = resolve_variants(
        {
            "b": RetentionVariant(extends="a", null_space_rank=4),
            "a": RetentionVariant(extends="nullspace_retention", distillation_weight=0.3),
        }
    )
    assert (v["b"].distillation_weight, v["b"].enable_null_space, v["b"].null_space_rank) == (0.3, True, 4)


def test_override_of_builtin_keeps_its_other_fields():
    v = resolve_variants({"full_retention": RetentionVariant(fisher_weight=0.3)})
    full = v["full_retention"]
    assert full.fisher_weight == 0.3
    assert full.distillation_weight == 3.0
    assert full.enable_null_space is True
    assert (full.null_space_rank, full.null_space_min_samples, full.null_space_refresh_interval) == (8, 128, 4000)
    assert full.description == BUILTIN_VARIANTS["full_retention"].description


def test_variant_without_extends_starts_from_defaults():
    v = resolve_variants({"fresh": RetentionVariant(fisher_weight=0.7)})
    assert v["fresh"] == RetentionVariant(fisher_weight=0.7)


def test_unknown_variant_extends_names_its_key():
    with pytest.raises(VariantError) as info:
        resolve_variants({"mine": RetentionVariant(extends="nope_retention")})
    assert info.value.key == "retention.variants.mine.extends"
    assert "nope_retention" in str(info.value)


def test_unknown_variant_extends_in_a_profile(tmp_path):
    path = write(
        tmp_path / "p.yaml",
        "extends: demo\nname: p\nretention:\n  variants:\n    mine:\n      extends: nope_retention\n",
    )
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    assert issue_keys(info.value) == ["retention.variants.mine.extends"]


def test_variant_extends_cycle_is_an_error():
    with pytest.raises(VariantError) as info:
        resolve_variants({"a": RetentionVariant(extends="b"), "b": RetentionVariant(extends="a")})
    assert info.value.key.startswith("retention.variants.")
    assert info.value.key.endswith(".extends")
    assert "cycle" in str(info.value)


# --------------------------------------------------------------------------- every problem at once


def test_all_problems_in_a_file_are_reported_together(tmp_path):
    path = write(
        tmp_path / "many.yaml",
        "extends: demo\n"
        "name: many\n"
        "bogus: 1\n"
        "base:\n  dtype: float64\n"
        "fusion:\n  lyers: [1]\n  lora_dropout: 1.5\n"
        "training:\n  stage_a:\n    steps: -3\n"
        "evaluation:\n  tolerance: 2\n",
    )
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    keys = issue_keys(info.value)
    expected = [
        "bogus",
        "base.dtype",
        "fusion.lyers",
        "fusion.lora_dropout",
        "training.stage_a.steps",
        "evaluation.tolerance",
    ]
    assert len(info.value.issues) >= 3
    for key in expected:
        assert key in keys, f"{key} not reported; got {keys}"
    assert all(issue.source == str(path) for issue in info.value.issues)
    # str() lists one problem per line, each with file and key path.
    text = str(info.value)
    for key in expected:
        assert f"{path}: {key}: " in text


def test_all_semantic_problems_are_reported_together(tmp_path):
    path = write(
        tmp_path / "sem.yaml",
        "extends: demo\nname: sem\n"
        "fusion:\n  layers: [1, 9]\n"
        "policy:\n  token_budgets: [0, 4, 40]\n"
        "retention:\n  default_variant: nope\n"
        "sweep:\n  variants: [soft_retention, nope2]\n",
    )
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    keys = issue_keys(info.value)
    for key in ["fusion.layers", "policy.token_budgets", "retention.default_variant", "sweep.variants.1"]:
        assert key in keys, f"{key} not reported; got {keys}"


def test_fusion_layers_must_fit_the_tiny_model_depth():
    assert load_profile("demo", ["fusion.layers=[0,3]"]).fusion.layers == [0, 3]  # the 4-layer demo's last
    with pytest.raises(ProfileError) as info:
        load_profile("demo", ["fusion.layers=[3,4]"])
    assert issue_keys(info.value) == ["fusion.layers"]
    assert "[4]" in info.value.issues[0].message
    # The depth follows base.tiny.num_layers.
    assert load_profile("demo", ["fusion.layers=[3,4]", "base.tiny.num_layers=5"]).fusion.layers == [3, 4]


def test_budget_equal_to_num_tokens_is_fine():
    profile = load_profile("demo", ["policy.token_budgets=[0,6]", "projector.num_tokens=6"])
    assert profile.policy.token_budgets == [0, 6]
    with pytest.raises(ProfileError) as info:
        load_profile("demo", ["policy.token_budgets=[0,7]", "projector.num_tokens=6"])
    assert issue_keys(info.value) == ["policy.token_budgets"]


# --------------------------------------------------------------------------- dump_profile


def _descriptions(model_cls: type[BaseModel]) -> set[str]:
    found = set()
    for field in model_cls.model_fields.values():
        if field.description:
            found.add(field.description)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found |= _descriptions(annotation)
    return found


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_dump_round_trips(name):
    profile = load_profile(name)
    text = dump_profile(profile)
    assert Profile.model_validate(yaml.safe_load(text)) == profile
    plain = dump_profile(profile, comments=False)
    assert Profile.model_validate(yaml.safe_load(plain)) == profile


def test_dump_round_trips_with_custom_variants_and_awkward_strings(tmp_path):
    path = write(
        tmp_path / "p.yaml",
        "extends: demo\nname: p\ndescription: 'yes: a \"quoted\" # not a comment'\n"
        "retention:\n  variants:\n    mine:\n      extends: soft_retention\n      fisher_weight: 0.5\n"
        "    full_retention:\n      fisher_weight: 0.3\n"
        "sweep:\n  slurm:\n    time: '1-02:00:00'\n    setup: ['module load cuda', 'echo: hi']\n",
    )
    profile = load_profile(str(path))
    text = dump_profile(profile)
    assert Profile.model_validate(yaml.safe_load(text)) == profile


def test_dump_contains_field_descriptions_as_comments():
    text = dump_profile(load_profile("demo"))
    comments = {line.strip()[2:] for line in text.splitlines() if line.strip().startswith("# ")}
    missing = _descriptions(Profile) - comments
    assert not missing, f"descriptions not written as comments: {sorted(missing)[:5]}"
    assert "# Optimizer steps." in text
    # Comments sit directly above their key.
    lines = [line.strip() for line in text.splitlines()]
    i = lines.index("# Profile name; part of every run directory.")
    assert lines[i + 1] == "name: demo"


# --------------------------------------------------------------------------- SAFE_DATA_ROOT


def test_safe_data_root_env_sets_data_root(monkeypatch, tmp_path):
    assert load_profile("demo").data.root is None
    monkeypatch.setenv("SAFE_DATA_ROOT", str(tmp_path / "data"))
    assert load_profile("demo").data.root == str(tmp_path / "data")


def test_set_data_root_wins_over_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFE_DATA_ROOT", str(tmp_path / "from-env"))
    profile = load_profile("demo", [f"data.root={tmp_path / 'from-set'}"])
    assert profile.data.root == str(tmp_path / "from-set")


def test_safe_data_root_env_wins_over_file(monkeypatch, tmp_path):
    path = write(tmp_path / "p.yaml", "extends: demo\nname: p\ndata:\n  root: /from/file\n")
    assert load_profile(str(path)).data.root == "/from/file"
    monkeypatch.setenv("SAFE_DATA_ROOT", "/from/env")
    assert load_profile(str(path)).data.root == "/from/env"


def test_custom_variant_extending_itself_is_a_cycle_not_a_crash():
    with pytest.raises(VariantError) as caught:
        resolve_variants({"mine": RetentionVariant(extends="mine")})
    assert caught.value.key == "retention.variants.mine.extends"
    assert "cycle" in str(caught.value)


def test_non_utf8_profile_is_a_clear_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ProfileError) as caught:
        load_profile(str(path))
    assert "not UTF-8" in str(caught.value) and str(path) in str(caught.value)


@pytest.mark.parametrize("variant_name", ["2024", "on", "null", "yes"])
def test_dump_round_trips_variant_names_yaml_would_retype(tmp_path, variant_name):
    profile = load_profile("demo", [f"retention.variants.{variant_name}.fisher_weight=0.3"])
    assert Profile.model_validate(yaml.safe_load(dump_profile(profile))) == profile


def test_a_section_set_in_part_keeps_the_rest_of_its_own_default():
    # base.vision_pretrain defaults to 1200 x 128 at 6e-3, a bare PretrainConfig to 2500 x 32 at
    # 2e-3: setting its steps alone must not also change its batch and rate.
    profile = load_profile("demo", ["base.vision_pretrain.steps=800", "audio_encoder.tiny_pretrain.batch_size=16"])
    assert profile.base.vision_pretrain.model_dump() == {
        "steps": 800, "batch_size": 128, "lr": 6e-3, "warmup_steps": 50, "weight_decay": 0.01}
    assert (profile.audio_encoder.tiny_pretrain.steps, profile.audio_encoder.tiny_pretrain.batch_size) == (600, 16)
    assert load_profile("demo", ["base.pretrain.lr=1e-3"]).base.pretrain.steps == 1500
