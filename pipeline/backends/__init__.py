"""Backends: the exchangeable model behind a stage (VAD, diarization, ASR, dialogue classifier).

Every kind has the same shape:

* a registry in ``pipeline/backends/<kind>/__init__.py``: ``BACKENDS = Registry("ASR", {name:
  "module:Class"})``, imported lazily (a backend's libraries load only when it is chosen);
* a backend class with ``Options`` (a pydantic model: its section of the stage config, named
  after the backend with ``-`` as ``_``, unless the class sets ``section``) and one constructor,
  ``Backend(options, device="cpu", num_threads=1)``, which loads the model;
* the stage's config derives from :class:`BackendSections`: it gets a validated section for every
  registered backend, so that adding a backend is one new file plus one registry line, and never
  an edit of the stage.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, model_validator
from pydantic_core import PydanticCustomError


class Registry:
    """Backend name -> class (given as ``"module:Class"`` and imported on first use, or a class)."""

    def __init__(self, kind: str, entries: dict[str, str | type]):
        self.kind = kind
        self._entries: dict[str, str | type] = dict(entries)

    def register(self, name: str, target: str | type) -> None:
        self._entries[name] = target

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> type:
        target = self._entries.get(name)
        if target is None:
            raise KeyError(f"unknown {self.kind} backend {name!r}; known: {', '.join(self._entries)}")
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
        return target

    def section(self, name: str) -> str:
        """The config key of a backend's options."""
        return getattr(self.get(name), "section", None) or name.replace("-", "_")

    def sections(self) -> dict[str, type[BaseModel]]:
        """Config key -> options model, for every registered backend that has options (backends
        may share one)."""
        out: dict[str, type[BaseModel]] = {}
        for name in self._entries:
            options = self.get(name).Options
            if options.model_fields:
                out.setdefault(self.section(name), options)
        return out

    def build(self, name: str, options: BaseModel | dict[str, Any] | None = None, device: str = "cpu",
              num_threads: int = 1, cls: type | None = None):
        """Backend ``name`` with its model loaded. ``options``: its config section (a dict or its
        ``Options`` model)."""
        cls = cls or self.get(name)
        if not isinstance(options, cls.Options):
            options = cls.Options.model_validate(options or {})
        return cls(options, device=device, num_threads=num_threads)


class BackendSections(BaseModel):
    """Base of a stage config with one options section per registered backend (the sections of
    backends not chosen are validated too: a typo fails at load time, whatever the backend).

    A stage config derives from ``(StageConfig, BackendSections)`` (in this order: the last base
    gives the model config). Subclasses set ``registry`` and ``backend_fields``: the fields that
    name backends (a name, or a mapping of names), each with the other values it may take. The
    classes of the registered backends travel with the validated config, so that a backend
    registered at run time (a plugin, a test) reaches the Ray workers."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    registry: ClassVar[Registry]
    backend_fields: ClassVar[dict[str, tuple[str, ...]]] = {"backend": ()}
    _classes: dict[str, type] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _backend_sections(cls, data: Any, handler) -> Any:
        if not isinstance(data, dict):
            return handler(data)
        sections = cls.registry.sections()
        errors: list[dict] = []
        for field, others in cls.backend_fields.items():
            value = data.get(field)
            named = value.items() if isinstance(value, dict) else [(None, value)] if value is not None else []
            for key, name in named:
                if isinstance(name, str) and name not in cls.registry and name not in others:
                    known = ", ".join([*others, *cls.registry.names()])
                    errors.append({"type": PydanticCustomError(
                        "unknown_backend", "unknown {kind} backend '{name}'; known: {known}",
                        {"kind": cls.registry.kind, "name": name, "known": known}),
                        "loc": (field,) if key is None else (field, key), "input": name})
        fields = {}
        for key, value in data.items():
            if key in cls.model_fields:
                fields[key] = value
            elif key not in sections:
                errors.append({"type": "extra_forbidden", "loc": (key,), "input": value})
        for key, options in sections.items():
            value = data.get(key)
            try:
                fields[key] = value if isinstance(value, options) else options.model_validate(value or {})
            except ValidationError as e:
                errors += _details(e, (key,))
        try:
            model = handler(fields)
        except ValidationError as e:
            # Reported together with the section errors: every mistake of a config at once.
            errors = _details(e) + errors
            model = None
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return model

    @model_validator(mode="after")
    def _resolve(self) -> "BackendSections":
        self._classes = {name: self.registry.get(name) for name in self.registry.names()}
        return self

    def backend_class(self, name: str) -> type:
        classes = (self.__pydantic_private__ or {}).get("_classes") or {}
        return classes.get(name) or self.registry.get(name)

    def options(self, name: str) -> BaseModel:
        cls = self.backend_class(name)
        if not cls.Options.model_fields:
            return cls.Options()
        return getattr(self, getattr(cls, "section", None) or name.replace("-", "_"))

    def build_backend(self, name: str, device: str = "cpu", num_threads: int = 1, **update: Any):
        """Backend ``name`` built from its section (``update``: fields the stage sets, e.g. a
        section shared by several backends)."""
        options = self.options(name)
        if update:
            options = options.model_copy(update=update)
        return self.registry.build(name, options, device, num_threads, cls=self.backend_class(name))


def _details(e: ValidationError, prefix: tuple = ()) -> list[dict]:
    """The errors of ``e`` as details a new ValidationError takes, their locations under ``prefix``."""
    # Each error keeps its type and its message as written (custom types included).
    return [{"type": PydanticCustomError(err["type"], err["msg"]), "loc": (*prefix, *err["loc"]),
             "input": err.get("input")} for err in e.errors()]
