"""The config dataclasses as command-line flags and files: a flag per field
(``--latent-dim``, ``--model.latent-dim``), TOML/JSON config files, and
:func:`build_config`, which resolves preset < config file < flags into a
:class:`vaekit.config.RunConfig`. Used by :mod:`vaekit.cli`; a config error names the
field, and the preset when the value came from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path

from .presets import DEFAULT_PRESET, PRESETS

TYPE_CHECKING = False  # (typing's own would cost the import of typing)
if TYPE_CHECKING:
    from .config import RunConfig

__all__ = ["build_config", "UsageError"]

# Set by the run itself (the data decide the input shape), so no flag offers them.
_DERIVED = {("model", "input_shape")}


class UsageError(ValueError):
    """Bad command-line input: reported in one line with exit status 2."""


def _groups():
    from .config import GROUPS

    return GROUPS


def _field_docs(klass) -> dict[str, str]:
    """Field descriptions from the 'Attributes:' section of a dataclass docstring."""
    doc = klass.__doc__ or ""
    out: dict[str, str] = {}
    cur = None
    for line in doc.split("Attributes:", 1)[-1].splitlines():
        m = re.match(r"\s{4,8}(\w+):\s*(.*)", line)
        if m and m.group(1) in {f.name for f in dataclasses.fields(klass)}:
            cur = m.group(1)
            out[cur] = m.group(2).strip()
        elif cur and line.strip():
            out[cur] += " " + line.strip()
        elif not line.strip():
            cur = None
    return {k: _plain(v) for k, v in out.items()}


def _plain(doc: str) -> str:
    """Docstring text as --help shows it: ``:func:`x``` and ````x```` become ``x``."""
    doc = re.sub(r":\w+:`~?([^`]+)`", r"\1", doc)
    return re.sub(r"``([^`]+)``", r"\1", doc)


def _shown(value) -> str:
    """A default as the flag takes it: a tuple as ``256,128``, anything else as its repr."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else repr(value)


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        return float(text)


_number.__name__ = "number"  # argparse shows it: "invalid number value: 'abc'"


def _int_tuple(text: str):
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 256,128, got {text!r}") from None


def _flag_type(default):
    if isinstance(default, bool):
        return None
    if isinstance(default, tuple):
        return _int_tuple
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return _number
    return str


def _flag_names() -> dict[tuple[str, str], list[str]]:
    """``(group, field) -> flags``: ``--group.field-name`` always, ``--field-name`` when unique."""
    counts: dict[str, int] = {}
    for klass in _groups().values():
        for f in dataclasses.fields(klass):
            counts[f.name] = counts.get(f.name, 0) + 1
    names = {}
    for group, klass in _groups().items():
        for f in dataclasses.fields(klass):
            if (group, f.name) in _DERIVED:
                continue
            dashed = f.name.replace("_", "-")
            flags = [f"--{group}.{dashed}"]
            if group == "objective" and f.name == "name":
                flags.insert(0, "--objective")
            elif group == "train" and f.name == "seed":
                flags.insert(0, "--seed")
            elif counts[f.name] == 1:
                flags.insert(0, f"--{dashed}")
            names[(group, f.name)] = flags
    return names


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per config field; its help shows the value a plain ``vaekit train`` uses
    (the default preset's, which overrides many of the dataclass defaults)."""
    effective = build_config()
    for (group, name), flags in _flag_names().items():
        klass = _groups()[group]
        f = next(f for f in dataclasses.fields(klass) if f.name == name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        doc = _field_docs(klass).get(name, "")
        help_ = f"({group}) {doc} [default: {_shown(getattr(getattr(effective, group), name))}]".replace("%", "%%")
        kw = dict(dest=f"{group}.{name}", default=argparse.SUPPRESS, help=help_)
        if isinstance(default, bool):
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(*flags, type=_flag_type(default), metavar=name.upper(), **kw)


def _read_config_file(path: str) -> dict:
    from .io import file_problem

    p = Path(path)
    problem = file_problem(p)
    if problem is not None:
        raise UsageError(f"--config {path}: {problem}")
    try:
        text_bytes = p.read_bytes()
    except OSError as e:  # a name too long, no permission
        raise UsageError(f"--config {path}: cannot be read ({e.strerror or e})") from None
    try:
        if p.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            return tomllib.loads(text_bytes.decode("utf-8"))
        data = json.loads(text_bytes.decode("utf-8-sig"),  # a byte-order mark is not an error
                          object_pairs_hook=lambda pairs: _no_key_twice(pairs, path))
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"--config {path}: cannot be read as {'TOML' if p.suffix.lower() == '.toml' else 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: must hold a table/object of sections, got {type(data).__name__}")
    return data


def _no_key_twice(pairs: list, path: str) -> dict:
    """A JSON object's pairs as a dict, refused where a key comes twice (``json`` keeps the
    last one silently, dropping a whole section given twice; TOML refuses it)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise UsageError(f"--config {path}: key {key!r} is given twice in one object; give each key once")
        out[key] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in over.items():
        if isinstance(v, dict) and k in out and not isinstance(out[k], dict):
            raise UsageError(f"config section {k!r} must be a table of settings, got {type(out[k]).__name__}")
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def build_config(preset: str | None = None, config_file: str | None = None,
                 overrides: Mapping[str, object] | None = None) -> RunConfig:
    """The resolved :class:`vaekit.config.RunConfig`: preset, then file, then overrides
    (``{"group.field": value}``)."""
    from .config import RunConfig

    _check_overrides(overrides)
    name = preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise UsageError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    from_file = user = _read_config_file(config_file) if config_file else {}
    try:
        for key, value in (overrides or {}).items():  # (a file's section that is no table is refused here)
            group, field_ = key.split(".", 1)
            user = _merge(user, {group: {field_: list(value) if isinstance(value, tuple) else value}})
        config = RunConfig.from_dict(_without_the_presets_inert(_merge(PRESETS[name], user), user, overrides))
        _check_cuda(config.train.device)
    except (TypeError, ValueError) as e:
        said = _schedule_needs_steps(str(e), overrides or {}, config_file, from_file)
        if said:
            raise UsageError(said) from None
        blamed = _blame_the_preset(e, name, user)
        named = _name_the_flag(blamed, overrides or {}, config_file, from_file)
        if named is blamed:  # the field it opens with is not the user's: another it names may be
            named = type(e)(_said_as_set(str(blamed), name, overrides or {}, config_file, from_file, blame=False))
        raise named from None
    asked = user.get("objective") if isinstance(user.get("objective"), dict) else {}
    if asked.get("name") == "iwae" and config.objective.iw_samples == 1:
        # one importance sample: the bound is the ELBO (estimated with its KL sampled), which
        # a user asking for the IWAE bound did not mean (a forgotten --iw-samples)
        raise UsageError(_iwae_of_one(overrides or {}, config_file, from_file))
    return config


def _check_overrides(overrides) -> None:
    """``overrides`` None or a mapping of ``"group.field"`` to a value, each a field of a
    config section: an unknown one named as the overrides' (merged with a ``--config``
    file's settings, it was blamed on the file)."""
    expected = 'a dict of "group.field": value'
    if overrides is None:
        return
    if not isinstance(overrides, Mapping):
        raise TypeError(f"overrides must be {expected}, got {type(overrides).__name__}")
    from .config import GROUPS

    for key in overrides:
        if not isinstance(key, str):
            raise TypeError(f"overrides must be {expected}, got key {key!r} ({type(key).__name__})")
        group, dot, field_ = key.partition(".")
        if not (group and dot and field_):
            raise ValueError(f"overrides must be {expected}, got key {key!r}")
        if group not in GROUPS:
            raise ValueError(f"overrides: unknown config section {group!r} in {key!r}; known: {', '.join(GROUPS)}")
        known = sorted(f.name for f in dataclasses.fields(GROUPS[group]))
        if field_ not in known:
            raise ValueError(f"overrides: unknown key {field_!r} in config section {group!r} ({key!r}); "
                             f"known: {', '.join(known)}")


def _iwae_of_one(overrides: Mapping, config_file: str | None, from_file: dict) -> str:
    """The refusal of an IWAE objective with one sample, naming where the user set each."""
    in_file = from_file.get("objective") if isinstance(from_file.get("objective"), dict) else {}
    if "objective.name" in overrides:
        k = "--iw-samples 1" if "objective.iw_samples" in overrides else (
            f"objective.iw_samples in {config_file}" if "iw_samples" in in_file else "--iw-samples, default 1")
        return (f"--objective iwae: with iw_samples=1 ({k}) the IWAE bound is the ELBO; give --iw-samples K with "
                f"K >= 2 (Burda et al. use 5 or 50), or --objective elbo")
    k = "--iw-samples 1" if "objective.iw_samples" in overrides else (
        "set in the file" if "iw_samples" in in_file else "the default")
    return (f"--config {config_file}: objective.name is 'iwae' with iw_samples=1 ({k}), and that IWAE bound is the "
            f"ELBO; set objective.iw_samples to K >= 2 (Burda et al. use 5 or 50), or objective.name to 'elbo'")


def _check_cuda(device: str) -> None:
    """A CUDA device asked for where there is none: said before any data are read."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"TrainConfig.device must be auto or cpu on this machine (no CUDA device is "
                             f"available), got {device!r}")


def _without_the_presets_inert(merged: dict, user: dict, overrides: Mapping | None = None) -> dict:
    """``merged`` with each field the preset set (and the user did not) that the user's own
    settings leave with no effect back at its default: ``--preset mnist-pixelcnn
    --pixelcnn-layers 0`` drops the preset's head width, ``--preset mnist-large --objective
    elbo`` its ``iw_samples``. A user's own setting with no effect stays, to be refused
    (an old run's ``config.json`` may record an earlier version's default: a flag, in
    ``overrides``, is refused whatever its value)."""
    from .data import data_without_inert
    from .model_config import model_without_inert
    from .objectives import without_inert

    out = dict(merged)
    for section, reset in (("data", data_without_inert), ("model", model_without_inert), ("objective", without_inert)):
        mine = user.get(section, {})
        if isinstance(out.get(section), dict) and isinstance(mine, dict):
            keep = frozenset(mine)
            if section == "objective":
                given = frozenset(k.partition(".")[2] for k in (overrides or {}) if k.startswith("objective."))
                out[section] = reset(out[section], keep=keep, given=given)
            else:
                out[section] = reset(out[section], keep=keep)
    return out


def _sections() -> dict:
    """A config class's name -> its section in a run's config (``"TrainConfig"`` -> ``"train"``)."""
    from .config import GROUPS

    return {klass.__name__: group for group, klass in GROUPS.items()}


def _blame_the_preset(error: Exception, preset: str, user: dict) -> Exception:
    """``error``, saying which of the fields it names the preset set and the user did not
    (``--preset mnist-large --objective elbo`` meets the preset's ``iw_samples=5``)."""
    msg = str(error)
    section = re.match(r"(\w+Config)\.", msg)
    group = _sections().get(section.group(1)) if section else None
    if group is None:
        return error
    preset_fields = PRESETS[preset].get(group, {})
    blamed = [k for k in preset_fields if k not in user.get(group, {}) and re.search(rf"\b{k}\b", msg)]
    if not blamed:
        return error
    flags = _flag_names()
    said = ", ".join(f"{k}={preset_fields[k]!r} ({flags[(group, k)][0]})" for k in blamed)
    return type(error)(f"{msg}; the preset {preset!r} sets {said}: override it")


def _name_the_flag(error: Exception, overrides: Mapping, config_file: str | None = None,
                   from_file: dict | None = None) -> Exception:
    """``error`` led by where the user set the field it opens with: its flag (``--seed:
    TrainConfig.seed must be ...``), else the ``--config`` file and its key (``--config
    run.json: train.seed must be ...``). A field the user did not set is not blamed on
    either (a message may open with one field of several: "beta and beta_schedule are
    unused ..."). An unknown key or section, or a section that is no table, can only be
    the file's: it is led by the file."""
    msg = str(error)
    if config_file and re.match(r"(unknown (key\(s\) in )?)?config section", msg):  # the flags and presets hold none
        return type(error)(f"--config {config_file}: {msg}")
    found = re.match(r"(\w+Config)\.(\w+)", msg)
    group = _sections().get(found.group(1)) if found else None
    if group is None:
        return error
    field = found.group(2)
    if f"{group}.{field}" in overrides:  # a flag overrides the file
        flags = _flag_names().get((group, field))
        return type(error)(f"{flags[0]}: {msg}") if flags else error
    section = (from_file or {}).get(group)
    if isinstance(section, dict) and field in section:
        return type(error)(f"--config {config_file}: {group}.{field}{msg[found.end():]}")
    return error


def _schedule_needs_steps(msg: str, overrides: Mapping, config_file: str | None, from_file: dict) -> str | None:
    """ObjectiveConfig's refusal of a schedule without its length (``--beta-schedule linear``
    and no ``--warmup-steps``) said by where the user asked for the schedule; None for any
    other message, or a schedule the user did not set."""
    found = re.match(r"ObjectiveConfig\.(warmup_steps|cycle_steps) must be >= 1 with the '(\w+)' beta schedule, "
                     r"got 0$", msg)
    if not found:
        return None
    steps, schedule = found.groups()
    flag = _flag_names()[("objective", steps)][0]
    in_file = from_file.get("objective") if isinstance(from_file.get("objective"), dict) else {}
    if "objective.beta_schedule" in overrides:
        where = f" (set by --config {config_file})" if steps in in_file and f"objective.{steps}" not in overrides \
            else ""
        return f"--beta-schedule {schedule} needs {flag} N >= 1, got 0{where}"
    if "beta_schedule" in in_file and f"objective.{steps}" not in overrides:
        return (f"--config {config_file}: objective.beta_schedule {schedule!r} needs objective.{steps} >= 1 "
                f"(or {flag} N), got 0")
    return None


# A config field named in a message: ``train.amp``, ``DataConfig.data_dir`` or, followed by
# its value, a bare ``val_size=``.
_FIELD = re.compile(r"(?<![\w./-])(?:(\w+Config|model|data|train|objective)\.(\w+)|(\w+)(?==))")
# A value as a message shows it (its repr) after ``field=``.
_VALUE = r"('[^']*'|True|False|None|-?\d+(?:\.\d+)?(?:e[+-]?\d+)?)"


def _fields_named(msg: str) -> list:
    """``(group, field, match)`` of each config field ``msg`` names, in order: qualified by
    its section, or bare where its name is one section's alone."""
    from .config import GROUPS

    sections, bare = _sections(), {}
    for group, klass in GROUPS.items():
        for f in dataclasses.fields(klass):
            bare.setdefault(f.name, []).append(group)
    out = []
    for m in _FIELD.finditer(msg):
        if m.group(3):
            group, field_ = (bare[m.group(3)][0] if len(bare.get(m.group(3), ())) == 1 else None), m.group(3)
        else:
            group, field_ = sections.get(m.group(1), m.group(1)), m.group(2)
        if group in GROUPS and field_ in {f.name for f in dataclasses.fields(GROUPS[group])}:
            out.append((group, field_, m))
    return out


def _as_given(flag: str, value) -> str:
    """A flag with its value as the user gives it: ``--amp tf32``, ``--no-adam-kernel``."""
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return f"{flag} {value if isinstance(value, str) else _shown(value)}"


def _said_as_set(msg: str, preset: str | None, overrides: Mapping, config_file: str | None = None,
                 from_file: dict | None = None, *, blame: bool = True) -> str:
    """``msg``, an error that names config fields as the Python API does (``train.amp='tf32'
    is CUDA's arithmetic ...; use amp='none'``), as the command line says it: led by the
    first field it names that the user set, by its flag and value (``--amp tf32: ...``,
    its advice ``use amp='none'`` then ``use --amp none``) or by the ``--config`` file
    (its key qualified: ``--config run.toml: data.val_size=...``); a field it opens with
    that neither the user nor the preset set followed by its flag (``DataConfig.data_dir
    (--data-dir) is required ...``); with ``blame``, the fields the preset set and the user
    did not said to be the preset's, as :func:`_blame_the_preset` says them."""
    named = _fields_named(msg)
    if msg.startswith("-") or not named:
        return msg
    flags, from_file = _flag_names(), from_file or {}
    name = preset or DEFAULT_PRESET

    def the_users(group, field_):
        section = from_file.get(group)
        return f"{group}.{field_}" in overrides or (isinstance(section, dict) and field_ in section)

    def the_presets(group, field_):
        return field_ in PRESETS[name].get(group, {}) and not the_users(group, field_)

    named = [(g, f, m) for g, f, m in named if (g, f) in flags]
    if not named:
        return msg
    lead = next(((g, f, m) for g, f, m in named if the_users(g, f)), None)
    by_flag = lead is not None and f"{lead[0]}.{lead[1]}" in overrides
    inserts = []  # (position, text), made from the last back
    g, f, first = named[0]
    if not the_users(g, f) and not the_presets(g, f):
        value = re.compile(_VALUE).match(msg, first.end() + 1) if msg[first.end():first.end() + 1] == "=" else None
        inserts.append(((value or first).end(), f" ({flags[(g, f)][0]})"))
    if lead is not None and not by_flag and not lead[2].group(1):  # a bare name: the file's key
        inserts.append((lead[2].start(), f"{lead[0]}."))
    for at, text in sorted(inserts, reverse=True):
        msg = msg[:at] + text + msg[at:]
    if by_flag:
        def use(m):
            found = _fields_named(f"{m.group(1)}=")
            if not found or found[0][:2] not in flags:
                return m.group(0)
            value = m.group(2).strip("'")
            return f"use {_as_given(flags[found[0][:2]][0], {'True': True, 'False': False}.get(value, value))}"

        msg = re.sub(rf"\buse (\w+)={_VALUE}", use, msg)
        msg = f"{_as_given(flags[lead[:2]][0], overrides[f'{lead[0]}.{lead[1]}'])}: {msg}"
    elif lead is not None:
        msg = f"--config {config_file}: {msg}"
    if blame:
        blamed = list(dict.fromkeys((g, f) for g, f, _ in named if the_presets(g, f)))
        if blamed:
            said = ", ".join(f"{f}={PRESETS[name][g][f]!r} ({flags[(g, f)][0]})" for g, f in blamed)
            msg = f"{msg}; the preset {name!r} sets {said}: override it"
    return msg
