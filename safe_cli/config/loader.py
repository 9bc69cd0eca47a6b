"""Load a profile: find it, merge ``extends`` and ``--set``, validate, and check it against the world.

Every problem is collected and reported together, each with the file and key path at fault,
so a user fixes a profile in one pass instead of one error per run.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from pydantic import BaseModel, ValidationError

from .schema import Profile
from .variants import VariantError, resolve_variants

BUILTIN_PACKAGE = "safe_cli.profiles"


@dataclass(frozen=True)
class Issue:
    source: str
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}: {self.key}" if self.key else self.source
        return f"{where}: {self.message}"


class ProfileError(Exception):
    """One or more problems in a profile; str() lists every one on its own line."""

    def __init__(self, issues: Iterable[Issue]):
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


# --------------------------------------------------------------------------- finding profiles


def builtin_profiles() -> dict[str, Path]:
    """Built-in profile name -> file, searched recursively inside the installed package."""
    root = Path(str(resources.files(BUILTIN_PACKAGE)))
    return {p.stem: p for p in sorted(root.rglob("*.yaml"))}


def find_profile(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    builtins = builtin_profiles()
    if name_or_path in builtins:
        return builtins[name_or_path]
    looks_like_path = path.suffix in (".yaml", ".yml") or os.sep in name_or_path
    reason = "file not found" if looks_like_path else "no such file and no built-in profile of that name"
    raise ProfileError(
        [Issue(str(name_or_path), "", f"{reason} (built-in profiles: {', '.join(builtins)})")]
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError([Issue(str(path), "", f"not UTF-8 text (byte {exc.start})")]) from None
    except OSError as exc:
        raise ProfileError([Issue(str(path), "", f"cannot read: {exc.strerror or exc}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ProfileError([Issue(str(path), "", f"invalid YAML: {where}{problem}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProfileError([Issue(str(path), "", f"expected a mapping at the top, got {type(data).__name__}")])
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` wins; nested mappings merge, everything else (lists included) is replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _load_raw(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        names = " -> ".join(str(p) for p in chain + (resolved,))
        raise ProfileError([Issue(str(path), "extends", f"cycle: {names}")])
    data = _read_yaml(path)
    parent_ref = data.get("extends")
    if parent_ref is None:
        return data
    if not isinstance(parent_ref, str):
        raise ProfileError([Issue(str(path), "extends", "expected a profile name or path")])
    parent_path = path.parent / parent_ref
    if not parent_path.is_file():
        try:
            parent_path = find_profile(parent_ref)
        except ProfileError as exc:
            raise ProfileError([Issue(str(path), "extends", exc.issues[0].message)]) from None
    parent = _load_raw(parent_path, chain + (resolved,))
    parent.pop("name", None)  # a child is its own profile; it must name itself
    return deep_merge(parent, data)


# --------------------------------------------------------------------------- --set overrides

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` strings; values are parsed as YAML so the schema types them."""
    data = copy.deepcopy(data)
    issues = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not _KEY_RE.match(key):
            issues.append(Issue("--set", item, "expected key.path=value, e.g. training.stage_a.steps=50"))
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                issues.append(Issue("--set", key, f"{'.'.join(parts[: depth + 1])} is not a section"))
                break
            node = child
        else:
            node[parts[-1]] = value
    if issues:
        raise ProfileError(issues)
    return data


# --------------------------------------------------------------------------- validation


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


def _pydantic_issues(source: str, error: ValidationError, overridden: Iterable[str] = ()) -> list[Issue]:
    issues = []
    overridden = list(overridden)
    for err in error.errors():
        loc = _loc(err["loc"])
        # Blame --set, not the file, for a value the user gave on the command line.
        from_set = any(loc == key or loc.startswith(key + ".") for key in overridden)
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "missing":
            message = "required key is missing"
        elif "input" in err and not isinstance(err["input"], (dict, list)):
            message = f"{message} (got {err['input']!r})"
        issues.append(Issue(f"--set (over {source})" if from_set else source, loc, message))
    return issues


def _looks_like_local_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value.endswith((".pt", ".pth", ".bin"))


def _local_hf_config(name_or_path: str) -> Optional[dict[str, Any]]:
    config_file = Path(name_or_path).expanduser() / "config.json"
    if config_file.is_file():
        try:
            return json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError):
            return None
    return None


def llm_depth(profile: Profile) -> Optional[int]:
    """Number of LLM decoder layers of the base, when it can be known without a download."""
    base = profile.base
    if base.kind == "tiny-llava":
        return base.tiny.num_layers
    config = _local_hf_config(base.name_or_path or "")
    if config is None:
        return None
    text = config.get("text_config") or {}
    return text.get("num_hidden_layers") or config.get("num_hidden_layers")


def semantic_issues(profile: Profile, source: str) -> list[Issue]:
    """Checks that need the whole profile (and the file system), run after the schema passed."""
    issues: list[Issue] = []

    def add(key: str, message: str) -> None:
        issues.append(Issue(source, key, message))

    base = profile.base
    if base.kind != "tiny-llava" and base.name_or_path and _looks_like_local_path(base.name_or_path):
        if not Path(base.name_or_path).expanduser().is_dir():
            add("base.name_or_path", f"local model directory not found: {base.name_or_path}")

    depth = llm_depth(profile)
    if depth is not None:
        outside = [layer for layer in profile.fusion.layers if layer >= depth]
        if outside:
            add("fusion.layers", f"layers {outside} are outside the base LLM's {depth} decoder layers (0..{depth - 1})")

    if max(profile.policy.token_budgets) > profile.projector.num_tokens:
        add(
            "policy.token_budgets",
            f"largest budget {max(profile.policy.token_budgets)} exceeds projector.num_tokens "
            f"{profile.projector.num_tokens}",
        )

    enc = profile.audio_encoder
    if enc.kind in ("whisper", "both"):
        import whisper  # deferred: importing whisper costs ~1 s

        from ..models.package_paths import PackagePathError, resolve_package_path

        try:
            name = resolve_package_path(enc.whisper.name_or_path, "audio_encoder.whisper.name_or_path")
        except PackagePathError as exc:
            add("audio_encoder.whisper.name_or_path", exc.detail)
            name = None
        local = Path(name or "").expanduser()
        if name is None:
            pass
        elif name not in whisper.available_models() and not (local / "model.bin").is_file():  # a CTranslate2 folder
            if not _looks_like_local_path(name) and not Path(name).suffix:
                add(
                    "audio_encoder.whisper.name_or_path",
                    f"{name!r} is neither a whisper model name ({', '.join(whisper.available_models())}) "
                    "nor a .pt checkpoint path nor a CTranslate2 Whisper folder",
                )
            elif local.is_dir():
                add("audio_encoder.whisper.name_or_path", f"{name}: a folder without model.bin; expected a .pt "
                    "checkpoint or a CTranslate2 Whisper folder (model.bin, config.json, vocabulary)")
            elif not local.is_file():
                add("audio_encoder.whisper.name_or_path", f"whisper checkpoint not found: {name}")
    if enc.whisper.backend == "ctranslate2":
        if enc.kind != "whisper":
            add("audio_encoder.whisper.backend", f"ctranslate2 runs audio_encoder.kind whisper only, not {enc.kind}")
        elif name is not None and not (Path(name).expanduser() / "model.bin").is_file():
            add("audio_encoder.whisper.backend", "ctranslate2 needs audio_encoder.whisper.name_or_path to be a "
                f"CTranslate2 Whisper folder (model.bin), not {enc.whisper.name_or_path!r}")
        if enc.dtype != "float32":
            add("audio_encoder.dtype", f"{enc.dtype} with backend ctranslate2: set "
                "audio_encoder.whisper.compute_type instead (dtype stays float32)")
    if enc.kind in ("clap", "both"):
        name = enc.clap.name_or_path
        if _looks_like_local_path(name) and not Path(name).expanduser().is_dir():
            add("audio_encoder.clap.name_or_path", f"local model directory not found: {name}")

    try:
        variants = resolve_variants(profile.retention.variants)
    except VariantError as exc:
        add(exc.key, str(exc))
        variants = None
    if variants is not None:
        known = ", ".join(sorted(variants))
        if profile.retention.default_variant not in variants:
            add("retention.default_variant", f"unknown variant {profile.retention.default_variant!r} (known: {known})")
        for i, name in enumerate(profile.sweep.variants):
            if name not in variants:
                add(f"sweep.variants.{i}", f"unknown variant {name!r} (known: {known})")

    data = profile.data
    if data.source == "fsdd-mnist" and data.root:
        # A root that is given must be complete; one not given yet is asked for when data is read.
        from ..data.avdigits import check_data_root
        from ..errors import SafeError

        try:
            check_data_root(data.root)
        except SafeError as exc:
            add("data.root", str(exc).removeprefix("data.root: "))
    if data.source == "manifest":
        if not data.train_manifests and not data.eval_manifests:
            add("data.train_manifests", "source manifest needs train_manifests or eval_manifests")
        for name in ("train_manifests", "validation_manifests", "eval_manifests"):
            for i, value in enumerate(getattr(data, name)):
                if value and not Path(value).expanduser().is_file():
                    add(f"data.{name}.{i}", f"manifest not found: {value}")
    return issues


def load_profile(name_or_path: str = "demo", overrides: Iterable[str] = ()) -> Profile:
    """Find, merge, override, validate and check a profile; raises ProfileError with every issue."""
    overrides = list(overrides)
    path = find_profile(name_or_path)
    source = str(path)
    raw = _load_raw(path)
    # Precedence: file < SAFE_DATA_ROOT < --set, so CI and clusters can point at their data.
    if os.environ.get("SAFE_DATA_ROOT") and isinstance(raw.get("data", {}), dict):
        raw.setdefault("data", {})["root"] = os.environ["SAFE_DATA_ROOT"]
    raw = apply_overrides(raw, overrides)
    raw.pop("extends", None)  # already merged; keep the resolved profile self-contained
    try:
        profile = Profile.model_validate(raw)
    except ValidationError as exc:
        overridden = [item.partition("=")[0].strip() for item in overrides]
        raise ProfileError(_pydantic_issues(source, exc, overridden)) from None
    issues = semantic_issues(profile, source)
    if issues:
        raise ProfileError(issues)
    return profile


def dump_profile(profile: Profile, comments: bool = True) -> str:
    """The resolved profile as YAML, saved beside every checkpoint; each key under its description."""
    if not comments:
        return yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False)
    lines: list[str] = []

    def scalar(value: Any) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()

    def emit(model: BaseModel, indent: int) -> None:
        pad = "  " * indent
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if field.description:
                lines.append(f"{pad}# {field.description}")
            if isinstance(value, BaseModel):
                lines.append(f"{pad}{name}:")
                emit(value, indent + 1)
            elif isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
                lines.append(f"{pad}{name}:")
                for key, item in value.items():
                    lines.append(f"{pad}  {scalar(key)}:")
                    emit(item, indent + 2)
            else:
                dumped = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
                lines.append(f"{pad}{name}: {scalar(dumped)}")

    emit(profile, 0)
    return "\n".join(lines) + "\n"
