"""Model sources: turn a spec string into an ``nn.Module`` in eval mode, optionally with local weights.

Spec grammar: ``SOURCE:NAME[,key=value...]``; values are Python literals (``ast.literal_eval``),
anything else is kept as a string. Sources:

* ``torchvision:NAME`` — ``torchvision.models.get_model``;
* ``timm:NAME`` — ``timm.create_model`` (e.g. ``timm:vit_tiny_patch16_224,img_size=32,num_classes=10``);
* ``python:pkg.module:factory`` — ``factory(**options)``, which must return an ``nn.Module``;
* ``zoo:NAME`` — the built-in demo zoo (:mod:`zoocompiler.zoo`).

Checkpoints (``.pt``/``.pth``/``.bin`` via ``torch.load(weights_only=True)``, ``.safetensors``)
are matched key by key against the model; any mismatch is a :class:`CheckpointError`.

Specs read back from files (``slice.json``, an assembly ``plan.json``) go through
:func:`check_spec_from_file` first: a ``python:`` spec imports and calls code, so one found in a file is
refused unless the caller trusts the file (``trust_code=True``, ``--trust-code``) — the policy
``--allow-pickle`` applies to checkpoints. ``torchvision:``, ``timm:`` and ``zoo:`` specs are data.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .core.errors import CheckpointError, InputShapeError, UnknownModelError, ZooError
from .core.text import first_line

SOURCES = ("torchvision", "timm", "python", "zoo")
CODE_SOURCES = ("python",)  # sources whose specs import and call code: refused in files unless trusted
TRUST_CODE_FIX = "pass --trust-code (trust_code=True) only if you wrote that file yourself"
SHOWN_SPEC = 120  # characters of an untrusted spec quoted in an error
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile
TOLERATED_MISSING = ("num_batches_tracked",)  # BatchNorm fills these in for old checkpoints
SHOWN_KEYS = 5


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: ``source``, model ``name`` and constructor ``kwargs``."""

    source: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        options = "".join(f",{key}={value!r}" for key, value in self.kwargs.items())
        return f"{self.source}:{self.name}{options}"


# ----------------------------------------------------------------------------- spec parsing


def split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets or quotes (so ``img_size=(32,32)`` stays whole)."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part.strip() for part in parts]


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _suggest_sources_for(name: str) -> str:
    """``did you mean ...`` text for a spec written without a source."""
    hits = []
    try:
        import torchvision

        if name in torchvision.models.list_models():
            hits.append(f"torchvision:{name}")
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    try:
        import timm

        if timm.is_model(name):
            hits.append(f"timm:{name}")
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return f"; did you mean {' or '.join(hits)}?" if hits else ""


def parse_spec(spec: str) -> ModelSpec:
    """Parse ``SOURCE:NAME[,key=value...]``; raises ``UnknownModelError`` naming the problem."""
    text = spec.strip()
    if not text:
        raise UnknownModelError("empty model spec", "write SOURCE:NAME, e.g. torchvision:resnet18")
    if ":" not in text:
        name = split_top_level(text)[0]
        raise UnknownModelError(
            f"model spec '{text}' names no source",
            f"write SOURCE:NAME with SOURCE one of {', '.join(SOURCES)}{_suggest_sources_for(name)}",
        )
    source, rest = text.split(":", 1)
    source = source.strip().lower()
    if source not in SOURCES:
        close = difflib.get_close_matches(source, SOURCES, n=1)
        hint = f"did you mean '{close[0]}:{rest}'? " if close else ""
        raise UnknownModelError(f"unknown model source '{source}'", f"{hint}sources are: {', '.join(SOURCES)}")
    name, *options = split_top_level(rest)
    if not name:
        raise UnknownModelError(f"model spec '{text}' has no model name", f"write {source}:NAME")
    if source == "python" and ":" not in name:
        raise UnknownModelError(
            f"python spec '{text}' names no factory",
            "write python:package.module:factory (a callable returning a model)",
        )
    kwargs: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UnknownModelError(
                f"bad option '{option}' in model spec '{text}'", "write options as key=value, e.g. num_classes=10"
            )
        kwargs[key] = _parse_value(value.strip())
    return ModelSpec(source, name, kwargs)


def check_spec_from_file(spec: object, where: str, *, trust_code: bool = False, fix: str = TRUST_CODE_FIX) -> ModelSpec:
    """Parse a model spec read from a file, refusing one that would import code unless ``trust_code``.

    ``where`` names the file (and field) in the error, e.g. ``"sliced/slice.json (config.spec)"``;
    ``fix`` is the error's advice. A ``python:`` spec (see ``CODE_SOURCES``) raises ``ZooError`` before
    anything is imported; a value that is not a spec string raises ``UnknownModelError``. Nothing is
    imported or built here: pass the returned spec to :func:`load_model`.
    """
    if not isinstance(spec, str):
        raise UnknownModelError(f"{where} holds {type(spec).__name__}, not a model spec", "re-create the file")
    parsed = parse_spec(spec)
    if parsed.source in CODE_SOURCES and not trust_code:
        shown = spec.strip() if len(spec.strip()) <= SHOWN_SPEC else spec.strip()[: SHOWN_SPEC - 3] + "..."
        raise ZooError(
            f"{where} names the code spec {shown!r}; a spec read from a file may not import and run code", fix
        )
    return parsed


# ----------------------------------------------------------------------------- builders


def close_matches(name: str, names: list[str], n: int = 5) -> list[str]:
    """Names starting with ``name`` first, then the closest by ``difflib``; at most ``n``."""
    prefixed = sorted(candidate for candidate in names if candidate.startswith(name) and candidate != name)
    similar = difflib.get_close_matches(name, names, n=n, cutoff=0.6)
    merged = list(dict.fromkeys(similar[:2] + prefixed[: n - 2] + similar))
    return merged[:n]


def _unknown(source: str, name: str, names: list[str], listing: str) -> UnknownModelError:
    matches = close_matches(name, names)
    if matches:
        fix = "did you mean " + ", ".join(f"{source}:{match}" for match in matches) + f"? (all names: {listing})"
    else:
        fix = f"see {listing} for the names"
    return UnknownModelError(f"unknown {source} model '{name}'", fix)


def _is_download_error(err: BaseException) -> bool:
    """True if ``err`` (or anything in its cause chain) looks like a failed network fetch."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        module = type(current).__module__.split(".")[0]
        if isinstance(current, OSError) or module in ("huggingface_hub", "httpx", "requests", "urllib3"):
            return True
        current = current.__cause__ or current.__context__
    return False


def _construct(label: str, kwargs: dict[str, Any], pretrained: bool, make: Callable[[], nn.Module]) -> nn.Module:
    """Call ``make``; turn its failures into one-line ``ZooError``s (weights fetch vs bad options)."""
    try:
        return make()
    except ZooError:
        raise
    except Exception as err:  # noqa: BLE001 - any constructor failure becomes a user error
        if pretrained and _is_download_error(err):
            raise ZooError(
                f"cannot fetch pretrained weights for '{label}' ({first_line(err, limit=100)})",
                "download the weights where you have network and pass --checkpoint FILE",
            ) from err
        options = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no options"
        raise UnknownModelError(
            f"cannot build '{label}' with {options}: {first_line(err, limit=160)}",
            "check the option names and values the model's constructor accepts",
        ) from err


def _build_torchvision(name: str, kwargs: dict[str, Any], pretrained: bool) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        raise _unknown("torchvision", name, names, "torchvision.models.list_models()")
    weights = "DEFAULT" if pretrained else None
    return _construct(
        f"torchvision:{name}", kwargs, pretrained, lambda: torchvision.models.get_model(name, weights=weights, **kwargs)
    )


def _build_timm(name: str, kwargs: dict[str, Any], pretrained: bool) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise _unknown("timm", name, timm.list_models(), "timm.list_models()")
    return _construct(
        f"timm:{name}", kwargs, pretrained, lambda: timm.create_model(name, pretrained=pretrained, **kwargs)
    )


def _build_python(name: str, kwargs: dict[str, Any], pretrained: bool) -> nn.Module:
    module_name, _, factory_name = name.rpartition(":")
    label = f"python:{name}"
    if pretrained:
        raise ZooError(
            f"'{label}' has no pretrained weights to fetch",
            "pass --checkpoint FILE, or pretrained=True as a spec option if the factory accepts it",
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UnknownModelError(
            f"cannot import module '{module_name}' for '{label}' ({first_line(err, limit=160)})",
            "install it or add its directory to PYTHONPATH",
        ) from err
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        names = [attr for attr in dir(module) if not attr.startswith("_") and callable(getattr(module, attr))]
        matches = difflib.get_close_matches(factory_name, names, n=3)
        suggestions = ", ".join(f"python:{module_name}:{match}" for match in matches)
        hint = f"did you mean {suggestions}?" if matches else "check the name"
        raise UnknownModelError(f"module '{module_name}' has no factory '{factory_name}'", hint)
    model = _construct(label, kwargs, False, lambda: factory(**kwargs))
    if not isinstance(model, nn.Module):
        raise UnknownModelError(
            f"factory '{label}' returned {type(model).__name__}, not a torch.nn.Module",
            "make the factory return the model",
        )
    return model


def _build_zoo(name: str, kwargs: dict[str, Any], pretrained: bool) -> nn.Module:
    from .zoo import load_zoo_model

    if kwargs:
        raise UnknownModelError(
            f"zoo model '{name}' takes no options (got {', '.join(kwargs)})", "drop the options from the spec"
        )
    return load_zoo_model(name)  # zoo models are always trained: ``pretrained`` changes nothing


BUILDERS: dict[str, Callable[[str, dict[str, Any], bool], nn.Module]] = {
    "torchvision": _build_torchvision,
    "timm": _build_timm,
    "python": _build_python,
    "zoo": _build_zoo,
}


def load_model(
    spec: str | ModelSpec,
    *,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    allow_pickle: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Build the model ``spec`` names, in eval mode; keyword ``overrides`` win over spec options.

    ``pretrained`` fetches the source's default weights (a ``ZooError`` if they cannot be fetched);
    ``checkpoint`` loads local weights instead (see :func:`load_checkpoint`). Raises
    ``UnknownModelError`` (with close matches) for names no source knows.
    """
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    if pretrained and checkpoint is not None:
        raise ZooError("both pretrained weights and a checkpoint were requested", "pass only one of them")
    kwargs = {**parsed.kwargs, **overrides}
    model = BUILDERS[parsed.source](parsed.name, kwargs, pretrained)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, allow_pickle=allow_pickle, label=str(parsed))
    return model.eval()


# ----------------------------------------------------------------------------- checkpoints


def _corrupted(path: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"cannot read checkpoint '{path}': file is corrupted or not a checkpoint ({first_line(err, limit=100)})",
        "re-download it, or re-save it with torch.save(model.state_dict(), PATH)",
    )


def _torch_load(path: Path, allow_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if unsafe is None:
            raise _corrupted(path, err) from err
        if not allow_pickle:
            raise CheckpointError(
                f"checkpoint '{path}' holds a pickled Python object ({unsafe.group(1)}) that safe loading refuses",
                "pass --allow-pickle (allow_pickle=True) if you trust the file",
            ) from err
    except (RuntimeError, EOFError, ValueError, OSError, IndexError, KeyError) as err:
        raise _corrupted(path, err) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - unpickling can raise anything
        raise CheckpointError(
            f"cannot unpickle checkpoint '{path}': {first_line(err, limit=160)}",
            "import the code defining its classes first, or re-save it as a state dict",
        ) from err


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a plain state dict, one nested under a known key, or a pickled module's."""
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                return dict(inner.state_dict())
            if _is_state_dict(inner):
                return dict(inner)
        keys = ", ".join(map(str, list(obj)[:SHOWN_KEYS])) or "none"
        raise CheckpointError(
            f"checkpoint '{path}' is a dict (keys: {keys}) with no state dict under {'/'.join(STATE_DICT_KEYS)}",
            "save model.state_dict(), or nest it under the key 'state_dict'",
        )
    raise CheckpointError(
        f"checkpoint '{path}' holds a {type(obj).__name__}, not a state dict", "save model.state_dict() instead"
    )


def read_state_dict(path: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read the tensors of a ``.safetensors`` or ``torch.save`` checkpoint (CPU); no model needed."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is a directory, not a checkpoint file",
                              "pass the .safetensors/.pt file inside it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist", "check the path")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as err:  # noqa: BLE001 - SafetensorError is not importable as a stable name
            raise _corrupted(path, err) from err
    return _extract_state_dict(_torch_load(path, allow_pickle), path)


def _strip_wrapper_prefixes(state: dict[str, torch.Tensor], expected: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state) and not all(k.startswith(prefix) for k in expected):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return f"[{shown}{', ...' if len(keys) > SHOWN_KEYS else ''}]"


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], *, label: str = "the model") -> None:
    """Raise ``CheckpointError`` listing missing/unexpected keys and shape mismatches (up to 5 each)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(TOLERATED_MISSING)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = [
        f"{len(keys)} {what} {_listed(keys)}"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        if keys
    ]
    if problems:
        raise CheckpointError(
            f"checkpoint does not match {label}: {'; '.join(problems)}",
            "build the model with the options it was trained with (e.g. num_classes=N) or use the matching checkpoint",
        )


def load_checkpoint(
    model: nn.Module, path: str | Path, *, allow_pickle: bool = False, label: str | None = None
) -> nn.Module:
    """Load the checkpoint at ``path`` into ``model`` (in place, strict key/shape match); returns ``model``.

    ``.safetensors`` or ``torch.save`` files; a plain state dict or one nested under
    ``state_dict``/``model``/``model_state_dict``; ``module.`` prefixes are stripped. Pickled
    Python objects are refused unless ``allow_pickle``.
    """
    state = read_state_dict(path, allow_pickle=allow_pickle)
    state = _strip_wrapper_prefixes(state, model.state_dict())
    check_state_dict(model, state, label=label or type(model).__name__)
    model.load_state_dict(state, strict=False)  # strictness checked above, with a better message
    return model


# ----------------------------------------------------------------------------- input shapes


def _timm_input_shape(cfg: Mapping[str, Any], kwargs: Mapping[str, Any]) -> tuple[int, int, int]:
    channels, height, width = cfg["input_size"]
    channels = kwargs.get("in_chans", channels)
    size = kwargs.get("img_size")
    if isinstance(size, int):
        height = width = size
    elif isinstance(size, list | tuple) and len(size) == 2:
        height, width = size
    return (int(channels), int(height), int(width))


def _torchvision_input_shape(name: str) -> tuple[int, int, int]:
    import torchvision

    try:  # the classification weights' eval crop, e.g. 299 for inception_v3
        crop = torchvision.models.get_model_weights(name).DEFAULT.transforms().crop_size
        return (3, int(crop[0]), int(crop[-1]))
    except (ValueError, AttributeError, TypeError, IndexError, KeyError):
        return (3, 224, 224)


def default_input_shape(model: nn.Module, spec: str | ModelSpec) -> tuple[int, int, int]:
    """The (C, H, W) input a model built from ``spec`` expects.

    zoo: the entry's input shape; timm: ``pretrained_cfg["input_size"]`` adjusted by the
    ``in_chans``/``img_size`` options; torchvision: the default weights' crop (3, 224, 224 for
    most); python: the model's ``input_shape`` attribute. Otherwise ``InputShapeError``.
    """
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    if parsed.source == "zoo":
        from .zoo import get_entry

        return tuple(int(d) for d in get_entry(parsed.name).input_shape)  # type: ignore[return-value]
    declared = getattr(model, "input_shape", None)
    if isinstance(declared, tuple | list) and len(declared) == 3:
        return tuple(int(d) for d in declared)  # type: ignore[return-value]
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and len(cfg.get("input_size") or ()) == 3:
        return _timm_input_shape(cfg, parsed.kwargs)
    if parsed.source == "torchvision":
        return _torchvision_input_shape(parsed.name)
    raise InputShapeError(
        f"cannot tell the input shape of '{parsed}'",
        "pass --input-shape C,H,W (or give the model an input_shape attribute)",
    )
